"""Extremal perturbations: the named steps with hand-computed values, and the driver on TinyNet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.unit.conftest import TinyNet

from shared.attribution.classifier import Classifier
from shared.attribution.extremal import (
    ExtremalResult,
    area_loss,
    blur_pyramid,
    extremal,
    pyramid_perturbation,
    regulariser_weight,
    smooth_mask,
    smooth_max,
)
from shared.attribution.perturbation import gaussian_blur, prepare_image

FAST = dict(iterations=40, input_size=32, param_size=8, sigma=1.0)

# ----------------------------------------------------------------------- steps


def test_smooth_max_between_mean_and_max():
    z = torch.tensor([[0.1, 0.5, 0.9, 0.2]])
    for t in (0.01, 0.1, 1.0, 10.0):
        v = float(smooth_max(z, 1, t))
        assert float(z.mean()) <= v <= 0.9
    assert float(smooth_max(z, 1, 0.001)) == pytest.approx(0.9, abs=1e-6)
    assert float(smooth_max(z, 1, 1e4)) == pytest.approx(float(z.mean()), abs=1e-3)
    # hand-computed at T = 1: sum z e^z / sum e^z
    e = np.exp([0.1, 0.5, 0.9, 0.2])
    assert float(smooth_max(z, 1, 1.0)) == pytest.approx(float((e * [0.1, 0.5, 0.9, 0.2]).sum() / e.sum()), abs=1e-6)


def test_smooth_mask_of_constant_parameters():
    ones = smooth_mask(torch.ones(2, 1, 8, 8), 32, sigma=1.5)
    assert ones.shape == (2, 1, 32, 32)
    assert torch.allclose(ones, torch.ones_like(ones), atol=1e-6)
    zeros = smooth_mask(torch.zeros(1, 1, 8, 8), 32)
    assert torch.equal(zeros, torch.zeros_like(zeros))


def test_smooth_mask_is_a_smooth_blob_at_the_parameter():
    p = torch.zeros(1, 1, 8, 8)
    p[0, 0, 2, 5] = 1.0
    m = smooth_mask(p, 32, sigma=1.0, temperature=0.01)[0, 0]
    assert 0 <= m.min() and m.max() <= 1
    y, x = np.unravel_index(int(m.argmax()), m.shape)
    # grid cell (2, 5) covers pixels 8-11 x 20-23 at 4 pixels per cell
    assert 8 <= y <= 11 and 20 <= x <= 23
    assert m.max() > 0.9 and m[0, 0] < 0.01 and m[31, 0] < 0.01
    # smooth: neighbouring pixels differ little
    assert (m[1:] - m[:-1]).abs().max() < 0.2 and (m[:, 1:] - m[:, :-1]).abs().max() < 0.2


def test_smooth_mask_passes_gradients_to_neighbours():
    p = torch.full((1, 1, 6, 6), 0.3, requires_grad=True)
    smooth_mask(p, 24, sigma=1.0)[0, 0, 10, 10].backward()
    assert (p.grad != 0).sum() > 1


def test_blur_pyramid_levels():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pyr = blur_pyramid(x, max_blur=4.0, levels=3)
    assert pyr.shape == (1, 3, 3, 32, 32)
    assert torch.equal(pyr[:, 0], x)
    assert torch.allclose(pyr[:, 1], gaussian_blur(x, 13, 2.0))
    assert torch.allclose(pyr[:, 2], gaussian_blur(x, 25, 4.0))
    # blurrier levels have less contrast
    assert pyr[:, 2].std() < pyr[:, 1].std() < pyr[:, 0].std()
    with pytest.raises(ValueError, match="levels"):
        blur_pyramid(x, 4.0, 1)


def test_pyramid_perturbation_selects_levels():
    pyr = torch.stack([torch.full((1, 3, 4, 4), float(v)) for v in (0.0, 1.0, 2.0)], dim=1)  # level l == l
    assert torch.equal(pyramid_perturbation(pyr, torch.ones(1, 1, 4, 4)), pyr[:, 0])
    assert torch.equal(pyramid_perturbation(pyr, torch.zeros(1, 1, 4, 4)), pyr[:, 2])
    assert torch.allclose(pyramid_perturbation(pyr, torch.full((1, 1, 4, 4), 0.5)), pyr[:, 1])
    # m = 0.75 -> t = 0.5: halfway between levels 0 and 1
    mid = pyramid_perturbation(pyr, torch.full((2, 1, 4, 4), 0.75))
    assert mid.shape == (2, 3, 4, 4) and torch.allclose(mid, torch.full_like(mid, 0.5))


def test_area_loss_hand_computed():
    perfect = torch.zeros(1, 1, 2, 5)
    perfect[0, 0, 1, :2] = 1  # 2 of 10 pixels
    assert area_loss(perfect, 0.2).tolist() == [0.0]
    # same mask against a 30% target: one sorted value differs by 1 -> 1/10
    assert area_loss(perfect, 0.3).tolist() == pytest.approx([0.1])
    half = torch.full((1, 1, 2, 5), 0.5)
    assert area_loss(half, 0.2).tolist() == pytest.approx([0.25])
    # per-sample areas; the order of the pixels does not matter
    masks = torch.stack([perfect[0], perfect[0].flip(-1)])
    assert area_loss(masks, torch.tensor([0.2, 0.1])).tolist() == pytest.approx([0.0, 0.1])


def test_regulariser_weight_schedule():
    assert regulariser_weight(0, 11, 1.0, 100.0) == pytest.approx(1.0)
    assert regulariser_weight(10, 11, 1.0, 100.0) == pytest.approx(100.0)
    assert regulariser_weight(5, 11, 1.0, 100.0) == pytest.approx(10.0)
    ws = [regulariser_weight(t, 11, 1.0, 100.0) for t in range(11)]
    assert ws == sorted(ws)
    assert regulariser_weight(0, 1, 1.0, 100.0) == 100.0


# ----------------------------------------------------------------------- driver


@pytest.fixture(scope="module")
def runs() -> list[ExtremalResult]:
    """Computed once per module (the ``tiny`` / ``images`` fixtures, rebuilt here)."""
    model = Classifier(module=TinyNet(), labels=[f"c{i}" for i in range(10)], name="tiny")
    image = (np.random.RandomState(3).rand(80, 96, 3) * 255).astype(np.uint8)
    return extremal(model, image, 2, areas=(0.1, 0.3), **FAST)


def test_runs_fixture_matches_the_shared_fixtures(images):
    assert np.array_equal(images[0], (np.random.RandomState(3).rand(80, 96, 3) * 255).astype(np.uint8))


def test_shapes_and_fields(runs):
    assert [r.area for r in runs] == [0.1, 0.3]
    for r in runs:
        assert r.mask.shape == (32, 32) and r.mask.dtype == np.float32
        assert r.params.shape == (8, 8)
        assert r.perturbed.shape == (32, 32, 3) and r.perturbed.dtype == np.uint8
        assert 0 <= r.mask.min() and r.mask.max() <= 1
        assert r.target == 2 and r.label == "c2" and r.game == "preservation"
        assert r.iterations_run == 40 and not r.cancelled
        assert set(r.history) == {"total", "score", "area_loss", "lambda"}
        assert all(len(v) == 40 for v in r.history.values())
        assert r.history["lambda"][0] == pytest.approx(1.0) and r.history["lambda"][-1] == pytest.approx(500.0)
        np.testing.assert_array_equal(r.saliency, r.mask)
        json.dumps(r.to_json())


def test_area_achieved_within_tolerance(runs):
    for r in runs:
        assert abs(r.area_achieved - r.area) < 0.05
        assert r.history["area_loss"][-1] < r.history["area_loss"][0]
    assert runs[0].area_achieved < runs[1].area_achieved


def test_deterministic(tiny, images, runs):
    again = extremal(tiny, images[0], 2, areas=(0.1, 0.3), **FAST)
    for a, b in zip(runs, again):
        np.testing.assert_array_equal(a.mask, b.mask)


def test_areas_are_independent(tiny, images, runs):
    """Optimising several areas in one batch equals optimising each alone."""
    alone = extremal(tiny, images[0], 2, areas=(0.3,), **FAST)[0]
    np.testing.assert_allclose(alone.mask, runs[1].mask, atol=1e-5)


def test_deletion_game_and_probability_score(tiny, images):
    (r,) = extremal(tiny, images[0], 2, areas=(0.2,), game="deletion", score="probability", **FAST)
    assert r.game == "deletion" and abs(r.area_achieved - 0.2) < 0.05
    assert r.score_after < r.score_before  # removing the region lowers the class


def test_preservation_keeps_more_than_the_fully_blurred_image(tiny, images):
    (r,) = extremal(tiny, images[0], 2, areas=(0.3,), score="probability", **FAST)
    x = prepare_image(images[0], 32)
    with torch.no_grad():
        gone = blur_pyramid(x, 20 * 32 / 224, 8)[:, -1]
        p_gone = float(torch.softmax(tiny.module(tiny.normalise(gone)), 1)[0, 2])
    assert r.score_after > p_gone
    assert r.score_after == pytest.approx(r.history["score"][-1], abs=0.05)


def test_default_target_is_top1(tiny, images):
    (r,) = extremal(tiny, images[0], None, areas=(0.2,), **{**FAST, "iterations": 2})
    x = prepare_image(images[0], 32)
    with torch.no_grad():
        assert r.target == int(tiny.module(tiny.normalise(x)).argmax())


def test_cancel_and_progress(tiny, images):
    calls = []

    def on_step(i, total, losses):
        calls.append((i, total, set(losses)))
        return i >= 3

    out = extremal(tiny, images[0], 2, areas=(0.1, 0.2), on_step=on_step, **FAST)
    assert [c[0] for c in calls] == [1, 2, 3] and calls[0][1] == 40
    assert calls[0][2] == {"total", "score", "area_loss", "lambda", "live_score"}
    assert all(r.cancelled and r.iterations_run == 3 and len(r.history["total"]) == 3 for r in out)


def test_model_state_restored(images):
    net = TinyNet()
    net.train()
    net.head.bias.requires_grad_(False)
    before = {n: p.requires_grad for n, p in net.named_parameters()}
    extremal(net, images[0], 1, areas=(0.2,), **{**FAST, "iterations": 3})
    assert net.training
    assert {n: p.requires_grad for n, p in net.named_parameters()} == before
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(areas=()), "areas must list at least one"),
        (dict(areas=(0.0,)), "areas must be fractions strictly between 0 and 1"),
        (dict(areas=(1.0,)), "areas must be fractions"),
        (dict(iterations=0), "iterations must be between"),
        (dict(iterations=2.5), "iterations must be an integer"),
        (dict(param_size=64), "param_size must be between 4 and 32"),
        (dict(sigma=0.0), "sigma must be between"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(levels=1), "levels must be between"),
        (dict(game="both"), "game must be one of preservation, deletion"),
        (dict(score="rank"), "score must be one of logit, probability"),
        (dict(target=10), "target must be between 0 and 9"),
        (dict(target="cat"), "target must be a class index"),
    ],
)
def test_bad_arguments(tiny, images, kwargs, message):
    args = {**FAST, "iterations": 1, "areas": (0.1,), "target": 2}
    args.update(kwargs)
    target, areas = args.pop("target"), args.pop("areas")
    with pytest.raises(ValueError, match=message):
        extremal(tiny, images[0], target, areas, **args)


def test_batched_runs_equal_solo_runs(tiny, images):
    from shared.attribution.extremal import ExtremalOptimisation, extremal_step_batch

    options = [dict(areas=(0.1, 0.3), game="preservation"), dict(areas=(0.2,), game="deletion", sigma=2.0),
               dict(areas=(0.05, 0.1, 0.2), iterations=5, temperature=0.1)]
    runs = [ExtremalOptimisation.create(tiny, images[i % 2], i + 1, iterations=opt.pop("iterations", 8),
                                        input_size=64, param_size=8, **opt) for i, opt in enumerate(options)]
    while not all(r.done for r in runs):
        extremal_step_batch(tiny, runs)
    for i, run in enumerate(runs):
        got = run.result(tiny)
        alone = extremal(tiny, images[i % 2], i + 1, run.areas, iterations=run.iterations, input_size=64,
                         param_size=8, game=run.game, score=run.score, sigma=run.sigma,
                         temperature=run.temperature)
        assert got[0].iterations_run == run.iterations
        for g, a in zip(got, alone):
            np.testing.assert_allclose(g.mask, a.mask, atol=1e-5)
            assert g.score_after == pytest.approx(a.score_after, abs=1e-5)


def test_batched_runs_must_share_the_input_size(tiny, images):
    from shared.attribution.extremal import ExtremalOptimisation, extremal_step_batch

    a = ExtremalOptimisation.create(tiny, images[0], 1, (0.1,), iterations=2, input_size=64, param_size=8)
    b = ExtremalOptimisation.create(tiny, images[0], 1, (0.1,), iterations=2, input_size=32, param_size=8)
    with pytest.raises(ValueError, match="must share input_size"):
        extremal_step_batch(tiny, [a, b])
