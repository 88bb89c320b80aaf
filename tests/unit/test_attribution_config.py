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
