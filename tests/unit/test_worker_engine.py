"""The continuous-batching engine, on a tiny model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shared.attribution.perturbation import explain
from worker.engine import BatchEngine, default_max_batch


@pytest.fixture
def engine(tiny):
    eng = BatchEngine(tiny, max_batch=4).start()
    yield eng
    eng.stop()


def test_results_equal_solo_runs(engine, tiny, cfg, images):
    configs = [cfg, cfg.replace(seed=5, iterations=9), cfg.replace(mask_size=4, l1_coeff=0.1)]
    futures = [engine.submit(images[i % 2], i + 1, c) for i, c in enumerate(configs)]
    for i, (c, f) in enumerate(zip(configs, futures)):
        got = f.result(timeout=60)
        alone = explain(tiny, images[i % 2], i + 1, c)
        assert got.iterations_run == c.iterations
        np.testing.assert_allclose(got.mask, alone.mask, atol=1e-5)


def test_jobs_share_batches(tiny, cfg, images):
    gate = threading.Event()
    eng = BatchEngine(tiny, max_batch=3)
    # the first job waits in its first callback until the others are queued
    first = eng.submit(images[0], 1, cfg, on_step=lambda it, total, losses: gate.wait(10) and None)
    others = [eng.submit(images[1], 2, cfg.replace(seed=s)) for s in (1, 2, 3)]
    gate.set()
    for f in [first, *others]:
        f.result(timeout=60)
    eng.stop()
    assert eng.max_seen_batch == 3  # capped by max_batch
    # 4 jobs x 15 iterations in batches of at most 3 take fewer steps than 60
    assert eng.steps < 4 * cfg.iterations


def test_late_joiner_and_cancel_leave_others_alone(engine, tiny, cfg, images):
    long_cfg = cfg.replace(iterations=40)
    started = threading.Event()
    a = engine.submit(images[0], 1, long_cfg, on_step=lambda it, t, l: started.set())
    started.wait(10)
    b = engine.submit(images[1], 3, cfg, on_step=lambda it, t, l: it >= 2)  # cancels itself
    c = engine.submit(images[1], 4, cfg)  # joins mid-way
    rb = b.result(timeout=60)
    assert rb.cancelled and rb.iterations_run == 2
    np.testing.assert_allclose(a.result(timeout=60).mask, explain(tiny, images[0], 1, long_cfg).mask, atol=1e-5)
    np.testing.assert_allclose(c.result(timeout=60).mask, explain(tiny, images[1], 4, cfg).mask, atol=1e-5)


def test_bad_job_fails_alone(engine, cfg, images):
    bad = engine.submit(images[0], 99, cfg)
    good = engine.submit(images[0], 1, cfg)
    with pytest.raises(ValueError, match="target"):
        bad.result(timeout=60)
    assert good.result(timeout=60).iterations_run == cfg.iterations


def test_groups_by_input_size(engine, cfg, images):
    small = engine.submit(images[0], 1, cfg.replace(input_size=32, mask_size=4))
    big = engine.submit(images[0], 1, cfg)
    assert small.result(timeout=60).mask_upsampled.shape == (32, 32)
    assert big.result(timeout=60).mask_upsampled.shape == (64, 64)


def test_stop_fails_pending(tiny, cfg, images):
    eng = BatchEngine(tiny, max_batch=1).start()
    eng.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        eng.submit(images[0], 1, cfg)


def test_bad_max_batch(tiny):
    with pytest.raises(ValueError, match="max_batch"):
        BatchEngine(tiny, max_batch=0)
    assert default_max_batch("cpu") == 4


def test_extremal_jobs_interleave_with_batched_ones_and_equal_solo_runs(engine, tiny, cfg, images):
    from shared.attribution.extremal import extremal

    ext = cfg.replace(method="extremal", game="preservation", areas=(0.1, 0.3), iterations=8)
    mp = engine.submit(images[0], 1, cfg)
    ex = engine.submit(images[1], 2, ext)
    got = ex.result(timeout=60)
    alone = extremal(tiny, images[1], 2, (0.1, 0.3), iterations=8, param_size=cfg.mask_size,
                     input_size=cfg.input_size, game="preservation")
    assert [a.area for a in got.areas] == [0.1, 0.3]
    for g, a in zip(got.areas, alone):
        np.testing.assert_allclose(g.mask, a.mask, atol=1e-6)
    np.testing.assert_allclose(got.saliency, (alone[0].mask + alone[1].mask) / 2, atol=1e-6)
    assert got.config.method == "extremal" and got.iterations_run == 8
    np.testing.assert_allclose(mp.result(timeout=60).mask, explain(tiny, images[0], 1, cfg).mask, atol=1e-5)


def test_call_runs_alone_on_the_engine_thread(engine, tiny, cfg, images):
    seen = []
    started = threading.Event()

    def on_step(it, total, losses):
        seen.append(("step", threading.current_thread().name))
        started.set()

    job = engine.submit(images[0], 1, cfg.replace(iterations=30), on_step=on_step)
    started.wait(10)
    result = engine.call(lambda clf: (seen.append(("call", threading.current_thread().name)), clf)[1])
    assert result.result(timeout=60) is tiny
    job.result(timeout=60)
    assert {name for _, name in seen} == {"ebb-batch-engine"}
    kinds = [k for k, _ in seen]
    # the call ran between two steps of the running job
    assert 0 < kinds.index("call") < len(kinds) - 1


def test_call_exceptions_reach_the_caller(engine):
    def boom(_clf):
        raise ValueError("no good")

    with pytest.raises(ValueError, match="no good"):
        engine.call(boom).result(timeout=30)
    assert engine.call(lambda clf: 42).result(timeout=30) == 42  # the engine carries on



def test_extremal_jobs_share_batches(tiny, cfg, images):
    from shared.attribution.extremal import extremal

    gate = threading.Event()
    eng = BatchEngine(tiny, max_batch=3)
    ext = cfg.replace(method="extremal", game="preservation", areas=(0.1, 0.3), iterations=6)
    first = eng.submit(images[0], 1, ext, on_step=lambda it, total, losses: gate.wait(10) and None)
    others = [eng.submit(images[1], t, ext.replace(areas=(0.2,))) for t in (2, 3)]
    gate.set()
    results = [f.result(timeout=60) for f in [first, *others]]
    eng.stop()
    assert eng.max_seen_batch == 3 and eng.steps < 3 * ext.iterations  # stepped together
    for got, (image, target, areas) in zip(results, [(images[0], 1, (0.1, 0.3)), (images[1], 2, (0.2,)),
                                                      (images[1], 3, (0.2,))]):
        alone = extremal(tiny, image, target, areas, iterations=6, param_size=cfg.mask_size,
                         input_size=cfg.input_size)
        for g, a in zip(got.areas, alone):
            np.testing.assert_allclose(g.mask, a.mask, atol=1e-5)


def test_memory_budget_bounds_every_batch(tiny, cfg, images):
    """Four jobs that fit max_batch but not the memory budget run two at a time."""
    from shared.cost import item_memory

    item = item_memory("tiny", cfg.input_size)  # an unknown model: the default (largest) costs
    eng = BatchEngine(tiny, max_batch=4, reproducible=False, memory_budget=2 * item).start()
    try:
        futures = [eng.submit(images[0], i + 1, cfg.replace(seed=i)) for i in range(4)]
        for f in futures:
            assert f.result(timeout=60).iterations_run == cfg.iterations
    finally:
        eng.stop()
    assert eng.max_seen_batch == 2
    assert 0 < eng.max_planned_memory <= 2 * item


def test_reproducible_layout_counts_its_padding(tiny, cfg):
    from shared.cost import item_memory

    eng = BatchEngine(tiny, max_batch=4, reproducible=True, layout_width=4)
    item = item_memory("tiny", cfg.input_size)
    assert eng.planned_memory([cfg]) == 4 * item  # one job still steps 4 samples
    ext = cfg.replace(method="extremal", areas=(0.1, 0.2, 0.3))
    assert eng.planned_memory([ext, ext]) == 6 * item_memory("tiny", cfg.input_size, "extremal")


def test_job_over_the_memory_budget_fails_alone_with_a_clear_message(tiny, cfg, images):
    from shared.cost import item_memory

    eng = BatchEngine(tiny, max_batch=4, reproducible=False,
                      memory_budget=item_memory("tiny", 64) + 1).start()
    try:
        big = eng.submit(images[0], 1, cfg.replace(input_size=128))
        small = eng.submit(images[0], 2, cfg)
        with pytest.raises(MemoryError, match="EBB_DEVICE_MEMORY"):
            big.result(timeout=60)
        assert small.result(timeout=60).iterations_run == cfg.iterations
    finally:
        eng.stop()
