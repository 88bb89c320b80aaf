"""PerturbationConfig: reference defaults and every validation error."""

from __future__ import annotations

import json
import math

import pytest

from shared.attribution.config import PerturbationConfig


def test_reference_defaults():
    c = PerturbationConfig()
    assert c.iterations == 500
    assert c.learning_rate == 0.1
    assert c.mask_size == 28
    assert c.l1_coeff == 0.01
    assert c.tv_coeff == 0.2
    assert c.tv_beta == 3
    assert c.noise_std == 0.2
    assert c.blur == "mean"
    assert c.input_size == 224
    assert c.seed == 0
    assert c.precision == "fp32"


def test_frozen():
    with pytest.raises(Exception):
        PerturbationConfig().iterations = 3  # type: ignore[misc]


def test_json_round_trip():
    c = PerturbationConfig(iterations=7, blur="median", seed=3)
    assert PerturbationConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("iterations", 0, "iterations must be between 1 and 10000"),
        ("iterations", -1, "iterations must be between 1 and 10000"),
        ("iterations", 10**9, "iterations must be between 1 and 10000"),
        ("iterations", 2.5, "iterations must be an integer"),
        ("iterations", "abc", "iterations must be a number"),
        ("iterations", True, "iterations must be a number"),
        ("mask_size", 3, "mask_size must be between 4 and 224"),
        ("mask_size", 225, "mask_size must be between 4 and 224"),
        ("learning_rate", 0.0, "learning_rate must be between"),
        ("learning_rate", math.nan, "learning_rate must be finite"),
        ("l1_coeff", -0.1, "l1_coeff must be between"),
        ("l1_coeff", math.inf, "l1_coeff must be finite"),
        ("tv_coeff", -1, "tv_coeff must be between"),
        ("tv_beta", 0.5, "tv_beta must be between"),
        ("noise_std", -0.2, "noise_std must be between"),
        ("noise_std", -math.inf, "noise_std must be finite"),
        ("input_size", 16, "input_size must be between"),
        ("seed", -1, "seed must be between"),
        ("blur", "box", "blur must be one of mean, gaussian, median"),
        ("precision", "fp8", "precision must be one of fp32, bf16"),
        ("method", "gradcam", "method must be one of meaningful_perturbation, extremal"),
        ("areas", [], "areas must list 1 to 5 fractions"),
        ("areas", [0.1] * 6, "areas must list 1 to 5 fractions"),
        ("areas", [0.0], "areas must be fractions strictly between 0 and 1"),
        ("areas", [1.0], "areas must be fractions strictly between 0 and 1"),
        ("areas", [math.nan], "areas must be fractions strictly between 0 and 1"),
        ("areas", [True], "areas must be fractions strictly between 0 and 1"),
        ("areas", [0.1, 0.1], "areas must not repeat"),
        ("areas", "0.1", "areas must be a list"),
    ],
)
def test_validation_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        PerturbationConfig(**{field: value})


def test_mask_larger_than_input_rejected():
    with pytest.raises(ValueError, match="mask_size must be at most input_size"):
        PerturbationConfig(mask_size=200, input_size=128)


def test_unknown_fields_rejected():
    with pytest.raises(ValueError, match="unknown config field"):
        PerturbationConfig.from_dict({"iterations": 3, "bogus": 1})


def test_integral_floats_normalised_to_int():
    c = PerturbationConfig(iterations=10.0)
    assert c.iterations == 10 and isinstance(c.iterations, int)


def test_method_and_areas_defaults_and_json():
    c = PerturbationConfig()
    assert c.method == "meaningful_perturbation" and c.areas == (0.05, 0.1, 0.2) and not c.is_extremal
    e = PerturbationConfig(method="extremal", areas=[0.2, 0.05])
    assert e.is_extremal and e.areas == (0.2, 0.05)  # the order given is kept
    data = json.loads(json.dumps(e.to_dict()))
    assert data["areas"] == [0.2, 0.05]
    assert PerturbationConfig.from_dict(data) == e
    assert PerturbationConfig(areas=0.3).areas == (0.3,)


def test_configs_stored_before_the_new_fields_still_load():
    old = {k: v for k, v in PerturbationConfig().to_dict().items() if k not in ("method", "areas")}
    assert PerturbationConfig.from_dict(old) == PerturbationConfig()
