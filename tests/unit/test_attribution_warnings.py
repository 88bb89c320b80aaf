"""Warnings on weak explanations, and the live (noise-free) score of a run."""

from __future__ import annotations

import numpy as np
import pytest

from shared.attribution.config import PerturbationConfig
from shared.attribution.perturbation import explain
from shared.attribution.warnings import explanation_warnings


def _codes(ws):
    return [w["code"] for w in ws]


class _Fake:
    def __init__(self, before, after, mask, config=PerturbationConfig(), label="flute", target=558):
        self.score_before, self.score_after, self.mask = before, after, np.asarray(mask, np.float32)
        self.config, self.label, self.target = config, label, target


def test_good_explanation_has_no_warnings():
    mask = np.ones((28, 28)); mask[10:18, 10:18] = 0
    assert explanation_warnings(_Fake(0.9, 0.05, mask), (480, 640, 3)) == []


def test_tiny_black_image_warnings():
    ws = explanation_warnings(_Fake(0.021, 0.021, np.ones((28, 28))), (1, 1, 3))
    assert _codes(ws) == ["low_confidence", "score_not_halved", "mask_unchanged", "small_input"]
    assert all(w["message"] for w in ws)
    assert "0.021" in ws[0]["message"] and "1×1" in ws[3]["message"]


def test_puppies_style_failure_score_up_mask_all_ones():
    mask = np.full((28, 28), 0.995)
    ws = explanation_warnings(_Fake(0.896, 0.930, mask), (400, 600, 3))
    assert _codes(ws) == ["score_not_halved", "mask_unchanged"]
    assert "noise_std" in ws[1]["message"]


def test_preservation_game_rules():
    cfg = PerturbationConfig(game="preservation")
    mask = np.full((28, 28), 0.5); mask[:5] = 1.0; mask[5:] = 0.1
    assert _codes(explanation_warnings(_Fake(0.6, 0.4, mask, cfg))) == ["score_not_raised"]
    assert explanation_warnings(_Fake(0.6, 0.8, mask, cfg)) == []
    assert _codes(explanation_warnings(_Fake(0.6, 0.8, np.full((28, 28), 0.5), cfg))) == ["mask_unchanged"]


def test_extremal_skips_the_mask_rules():
    cfg = PerturbationConfig(method="extremal", game="preservation")
    assert explanation_warnings(_Fake(0.6, 0.9, np.full((28, 28), 0.5), cfg), (300, 300, 3)) == []


@pytest.mark.parametrize("bf16", [False, True])
def test_live_score_is_the_noise_free_score_of_the_mask_at_that_step(tiny, cfg, images, bf16):
    cfg = cfg.replace(iterations=9, seed=3, noise_std=0.5, precision="bf16" if bf16 else "fp32")
    live: dict[int, float] = {}
    noisy: dict[int, float] = {}

    def on_step(iteration, total, losses):
        assert "live_score" in losses and losses.target == 2 and losses.label == "c2"
        if iteration % 3 == 0:
            live[iteration] = losses["live_score"]
            noisy[iteration] = losses["score"]

    full = explain(tiny, images[0], 2, cfg, on_step)
    assert full.score_before == pytest.approx(0, abs=1) and 0 <= full.score_after <= 1
    for k in (3, 6, 9):
        # a run stopped after k steps: its final score is the noise-free score of the mask at step k
        assert live[k] == explain(tiny, images[0], 2, cfg.replace(iterations=k)).score_after
    assert live[9] == full.score_after
    assert any(live[k] != noisy[k] for k in live)  # not the noisy optimisation score


def test_live_score_is_computed_only_when_read(tiny, cfg, images, monkeypatch):
    from shared.attribution import perturbation

    calls = []
    real = perturbation.MaskOptimisation.live_score
    monkeypatch.setattr(perturbation.MaskOptimisation, "live_score",
                        lambda self: calls.append(1) or real(self))
    def on_step(it, total, losses):
        assert "live_score" in losses and losses["score"] >= 0
        if it == 4:
            losses["live_score"], losses["live_score"]  # computed once, then cached

    assert explain(tiny, images[0], 1, cfg.replace(iterations=4), on_step).iterations_run == 4
    assert len(calls) == 1
