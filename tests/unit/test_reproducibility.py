"""Bit-for-bit reproducibility under load: a job's mask is the same whether it
runs alone in the engine, is submitted together with identical jobs, or joins
a batch beside unrelated jobs (fixed batch layout + per-job noise streams)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from shared.attribution.classifier import Classifier
from shared.attribution.perturbation import MaskOptimisation, step_batch
from worker.engine import BatchEngine


def _three_ways(model, image, other, target, cfg, max_batch=4, layout_width=None):
    """The job's explanation solo, submitted with 2 identical copies, and beside 2 unrelated jobs."""
    eng = BatchEngine(model, max_batch=max_batch, channels_last=False, reproducible=True,
                      layout_width=layout_width or max_batch)
    try:
        solo = eng.submit(image, target, cfg).result(timeout=300)

        together = [eng.submit(image, target, cfg) for _ in range(3)]
        together = [f.result(timeout=300) for f in together]

        # an unrelated job runs first; ours joins mid-way (slot 1), and a third joins too
        started = threading.Event()
        long_cfg = cfg.replace(iterations=cfg.iterations + 4, seed=cfg.seed + 1, l1_coeff=0.05)
        first = eng.submit(other, None, long_cfg, on_step=lambda it, t, l: started.set())
        assert started.wait(120)
        beside = eng.submit(image, target, cfg)
        third = eng.submit(other, target, cfg.replace(seed=3))
        beside = beside.result(timeout=300)
        first.result(timeout=300), third.result(timeout=300)
        assert eng.max_seen_batch == 3
    finally:
        eng.stop()
    return solo, together, beside


def _assert_identical(solo, others):
    for e in others:
        assert np.array_equal(e.mask, solo.mask)
        assert e.score_after == solo.score_after
        assert e.history["score"] == solo.history["score"]


def test_tiny_model_bit_equal_alone_together_beside(tiny, cfg, images):
    cfg = cfg.replace(iterations=12, seed=77)
    solo, together, beside = _three_ways(tiny, images[0], images[1], 2, cfg)
    _assert_identical(solo, [*together, beside])
    assert not np.array_equal(solo.mask, np.ones_like(solo.mask))  # the mask did move


def test_tiny_model_bit_equal_with_narrower_layout(tiny, cfg, images):
    """layout_width 2 of max_batch 4: three jobs fill two fixed batches of 2."""
    cfg = cfg.replace(iterations=10, seed=21)
    solo, together, beside = _three_ways(tiny, images[1], images[0], 3, cfg, max_batch=4, layout_width=2)
    _assert_identical(solo, [*together, beside])


def test_tiny_model_bf16_bit_equal(tiny, cfg, images):
    cfg = cfg.replace(iterations=8, seed=5, precision="bf16")
    solo, together, beside = _three_ways(tiny, images[1], images[0], 4, cfg, max_batch=3)
    _assert_identical(solo, [*together, beside])


def test_step_batch_layout_slot_and_neighbours(tiny, cfg, images):
    """step_batch(width=...) alone: the same run in another slot beside other runs."""
    cfg = cfg.replace(iterations=6, seed=11)

    def run(slot, neighbours):
        runs = [MaskOptimisation.create(tiny, images[0], 1, cfg)]
        runs += [MaskOptimisation.create(tiny, images[1], t, cfg.replace(seed=t)) for t in neighbours]
        slots = [slot] + [s for s in range(4) if s != slot][: len(neighbours)]
        while not runs[0].done:
            step_batch(tiny, runs, width=4, slots=slots)
        return runs[0].mask.detach().clone()

    ref = run(0, [])
    for slot, neighbours in [(3, []), (2, [5, 6]), (1, [7, 8, 9])]:
        assert torch.equal(run(slot, neighbours), ref)


def test_step_batch_layout_rejects_bad_slots(tiny, cfg, images):
    runs = [MaskOptimisation.create(tiny, images[0], 1, cfg) for _ in range(2)]
    with pytest.raises(ValueError, match="slots"):
        step_batch(tiny, runs, width=2, slots=[1, 1])
    with pytest.raises(ValueError, match="slots"):
        step_batch(tiny, runs, width=2, slots=[0, 2])


@pytest.fixture(scope="module")
def lite() -> Classifier:
    from shared.models.registry import load_model

    return load_model("efficientnet_lite0")


def test_efficientnet_lite0_bit_equal(lite, images):
    from shared.attribution.config import PerturbationConfig

    cfg = PerturbationConfig(iterations=4, input_size=128, seed=77)
    image = (np.random.RandomState(0).rand(120, 150, 3) * 255).astype(np.uint8)
    try:
        solo, together, beside = _three_ways(lite, image, images[0], None, cfg, max_batch=4)
    finally:
        lite.module.to(memory_format=torch.contiguous_format)
    _assert_identical(solo, [*together, beside])


def test_layout_settings_from_the_environment():
    from worker.engine import default_layout_width, wants_reproducible

    assert wants_reproducible({}) is True
    assert wants_reproducible({"EBB_REPRODUCIBLE": "0"}) is False
    with pytest.raises(ValueError, match="EBB_REPRODUCIBLE"):
        wants_reproducible({"EBB_REPRODUCIBLE": "maybe"})
    assert default_layout_width(4, "cpu", {}) == 4
    assert default_layout_width(64, "cuda:0", {}) == 8
    assert default_layout_width(4, "cpu", {"EBB_LAYOUT_WIDTH": "2"}) == 2
    assert default_layout_width(4, "cpu", {"EBB_LAYOUT_WIDTH": "16"}) == 4  # at most max_batch
    with pytest.raises(ValueError, match="EBB_LAYOUT_WIDTH"):
        default_layout_width(4, "cpu", {"EBB_LAYOUT_WIDTH": "0"})

