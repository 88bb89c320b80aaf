"""The admission cost model (shared/cost.py) and its settings."""

from __future__ import annotations

import sys

import pytest

from shared import cost
from shared import settings as settings_mod
from shared.attribution.config import PerturbationConfig

GiB = 2**30

#: The issue's request: iterations=10000 top_k=5 input_size=1024 mask_size=224
#: method=extremal areas=0.05,0.1,0.2,0.3,0.4.
ISSUE = PerturbationConfig(iterations=10000, input_size=1024, mask_size=224, method="extremal",
                           areas=(0.05, 0.1, 0.2, 0.3, 0.4))


def _check(config, n=1, model="efficientnet_lite0", w=640, h=480, **limits):
    limits.setdefault("max_memory", 4 * GiB)
    limits.setdefault("max_work", 100_000)
    c = cost.estimate(config, model, w, h, n)
    cost.check(c, config, n_targets=n, width=w, height=h, **limits)
    return c


def test_the_issues_request_is_refused_and_names_input_size():
    c = cost.estimate(ISSUE, "vgg19", 640, 480, 5)
    assert c.items == 25 and c.work == 5 * 10000 * 5
    assert c.memory_bytes > 50 * GiB
    with pytest.raises(cost.TooExpensive) as info:
        _check(ISSUE, 5, model="vgg19")
    assert info.value.field == "input_size"
    assert "EBB_MAX_JOB_MEMORY" in info.value.message and "1024" in info.value.message


def test_defaults_are_admitted_for_every_method_and_five_targets():
    for method in ("meaningful_perturbation", "extremal"):
        config = PerturbationConfig(method=method)
        for model in ("efficientnet_lite0", "vgg19", "resnet50"):
            c = _check(config, 5, model=model, w=5000, h=5000)
            assert c.memory_bytes < 4 * GiB


def test_largest_single_mask_fits_the_default_memory_limit():
    _check(PerturbationConfig(input_size=1024, mask_size=28), 1, model="vgg19")


def test_work_limit_names_the_largest_factor():
    with pytest.raises(cost.TooExpensive) as info:
        _check(PerturbationConfig(iterations=10000, method="extremal", areas=(0.1, 0.2, 0.3)), 5)
    assert info.value.field == "iterations" and "EBB_MAX_JOB_WORK" in info.value.message
    with pytest.raises(cost.TooExpensive) as info:  # 5 areas x 5 targets x 1000 iterations
        _check(PerturbationConfig(iterations=1000, method="extremal", areas=(0.1, 0.2, 0.3, 0.4, 0.5)),
               5, max_memory=None, max_work=20_000)
    assert info.value.field in ("areas", "top_k")


def test_memory_limit_names_targets_when_they_dominate():
    config = PerturbationConfig(input_size=224)
    with pytest.raises(cost.TooExpensive) as info:
        cost.check(cost.estimate(config, "vgg19", 64, 64, 5), config, max_memory=400 * 2**20,
                   max_work=None, n_targets=5, targets_field="targets")
    assert info.value.field == "targets"


def test_a_huge_image_names_the_image():
    config = PerturbationConfig()
    c = cost.estimate(config, "efficientnet_lite0", 20000, 10000, 1)
    with pytest.raises(cost.TooExpensive) as info:
        cost.check(c, config, max_memory=4 * GiB, max_work=None, width=20000, height=10000)
    assert info.value.field == "image"


def test_memory_and_time_grow_with_the_inputs():
    base = cost.estimate(PerturbationConfig(), "efficientnet_lite0", 640, 480)
    bigger = cost.estimate(PerturbationConfig(input_size=448), "efficientnet_lite0", 640, 480)
    more = cost.estimate(PerturbationConfig(), "efficientnet_lite0", 640, 480, 3)
    longer = cost.estimate(PerturbationConfig(iterations=1000), "efficientnet_lite0", 640, 480)
    assert bigger.memory_bytes > base.memory_bytes and bigger.seconds > base.seconds
    assert more.memory_bytes > base.memory_bytes and more.work == 3 * base.work
    assert longer.seconds == pytest.approx(2 * base.seconds) and longer.work == 2 * base.work
    pixels = cost.estimate(PerturbationConfig(), "efficientnet_lite0", 6400, 4800)
    assert pixels.memory_bytes - base.memory_bytes == (6400 * 4800 - 640 * 480) * cost.IMAGE_BYTES_PER_PIXEL


def test_estimate_accepts_the_stored_config_dict():
    config = PerturbationConfig(method="extremal")
    assert cost.estimate(config.to_dict(), "vgg19", 10, 10, 2) == cost.estimate(config, "vgg19", 10, 10, 2)


def test_timeout_for():
    small = cost.Cost(memory_bytes=1, work=1, seconds=3.0)
    assert cost.timeout_for(small) == 600.0
    assert cost.timeout_for(cost.Cost(memory_bytes=1, work=1, seconds=100.0)) == 1000.0
    assert cost.timeout_for(small, 30) == 30.0


@pytest.mark.parametrize("text, value", [
    ("4GiB", 4 * GiB), ("4 gib", 4 * GiB), ("512MiB", 512 * 2**20), ("2GB", 2_000_000_000),
    ("1000", 1000), ("1.5GiB", int(1.5 * GiB)), ("64k", 64000), (123, 123),
])
def test_parse_bytes(text, value):
    assert cost.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "0", "4 GiBs", "1e9", True])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError):
        cost.parse_bytes(text)


def test_settings_defaults_and_parsing():
    s = settings_mod.load({})
    assert (s.max_job_memory, s.max_job_work, s.max_pixels) == (4 * GiB, 100_000, 25_000_000)
    assert (s.job_timeout_s, s.max_artifact_side, s.device_memory, s.test_slow_scoring_s) == (None, 2048, None, 0.0)
    s = settings_mod.load({"EBB_MAX_JOB_MEMORY": "1GiB", "EBB_MAX_JOB_WORK": "500", "EBB_MAX_PIXELS": "1000",
                           "EBB_JOB_TIMEOUT": "12.5", "EBB_MAX_ARTIFACT_SIDE": "512",
                           "EBB_DEVICE_MEMORY": "8GiB", "EBB_TEST_SLOW_SCORING_SECONDS": "2"})
    assert (s.max_job_memory, s.max_job_work, s.max_pixels, s.job_timeout_s) == (GiB, 500, 1000, 12.5)
    assert (s.max_artifact_side, s.device_memory, s.test_slow_scoring_s) == (512, 8 * GiB, 2.0)
    assert settings_mod.load({"EBB_JOB_TIMEOUT": "auto"}).job_timeout_s is None


@pytest.mark.parametrize("env", [
    {"EBB_MAX_JOB_MEMORY": "much"}, {"EBB_MAX_JOB_WORK": "0"}, {"EBB_MAX_PIXELS": "x"},
    {"EBB_JOB_TIMEOUT": "-5"}, {"EBB_JOB_TIMEOUT": "soon"}, {"EBB_MAX_ARTIFACT_SIDE": "-1"},
    {"EBB_DEVICE_MEMORY": "1 parsec"},
])
def test_bad_settings_are_refused_with_the_name(env):
    with pytest.raises(ValueError, match=next(iter(env))):
        settings_mod.load(env)


def test_cost_module_imports_no_torch_nor_numpy():
    import subprocess

    code = "import sys, shared.cost; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
