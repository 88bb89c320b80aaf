"""The paper's variants of Meaningful Perturbation: preservation game, constant and noise perturbations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.attribution.config import GAMES, PERTURBATIONS, PerturbationConfig
from shared.attribution.perturbation import (
    MaskOptimisation,
    blend,
    blurred_copy,
    explain,
    explain_batch,
    perturbation_baseline,
    prepare_image,
    step_batch,
    upsample_mask,
)

# ----------------------------------------------------------------------- config


def test_defaults_are_the_reference():
    c = PerturbationConfig()
    assert c.game == "deletion" and c.perturbation == "blur"
    assert GAMES == ("deletion", "preservation")
    assert PERTURBATIONS == ("blur", "constant", "noise")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("game", "keep", "game must be one of deletion, preservation, got 'keep'"),
        ("game", 1, "game must be one of deletion, preservation"),
        ("perturbation", "zeros", "perturbation must be one of blur, constant, noise, got 'zeros'"),
        ("perturbation", None, "perturbation must be one of blur, constant, noise"),
    ],
)
def test_validation_names_field_and_allowed_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        PerturbationConfig(**{field: value})


def test_variant_fields_round_trip():
    c = PerturbationConfig(game="preservation", perturbation="noise", seed=4)
    assert PerturbationConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


# ----------------------------------------------------------------------- perturbations


@pytest.fixture
def x(images) -> torch.Tensor:
    return prepare_image(images[0], 32)


def test_blur_perturbation_is_the_blurred_copy(x):
    assert torch.equal(perturbation_baseline(x, "blur", "gaussian"), blurred_copy(x, "gaussian"))
    assert torch.equal(perturbation_baseline(x), blurred_copy(x, "mean"))


def test_constant_perturbation_is_the_mean_colour(x):
    c = perturbation_baseline(x, "constant")
    assert c.shape == x.shape
    mean = x.mean(dim=(2, 3))[0]
    for ch in range(3):
        assert torch.allclose(c[0, ch], torch.full_like(c[0, ch], float(mean[ch])))


def test_noise_perturbation_fixed_seed(x):
    a = perturbation_baseline(x, "noise", seed=3)
    b = perturbation_baseline(x, "noise", seed=3)
    c = perturbation_baseline(x, "noise", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    # around the image's mean colour, with spatially independent pixels
    assert torch.allclose(a.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.05)
    assert torch.allclose(a.std(dim=(2, 3)), x.std(dim=(2, 3)), rtol=0.2)


def test_unknown_perturbation_rejected(x):
    with pytest.raises(ValueError, match="perturbation must be one of blur, constant, noise"):
        perturbation_baseline(x, "zeros")


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_optimisation_uses_the_configured_perturbation(tiny, images, perturbation):
    cfg = PerturbationConfig(iterations=2, input_size=32, mask_size=8, perturbation=perturbation, seed=5)
    run = MaskOptimisation.create(tiny, images[0], 1, cfg)
    expected = perturbation_baseline(prepare_image(images[0], 32), perturbation, cfg.blur, 5)
    assert torch.equal(run.blurred, expected)
    # a mask of zeros feeds exactly the perturbation to the model
    with torch.no_grad():
        run.mask.zero_()
    assert torch.allclose(run.perturbed_input(noise=False), tiny.normalise(expected), atol=1e-6)


# ----------------------------------------------------------------------- preservation game


def test_preservation_starts_halfway_and_matches_its_formula(tiny, images):
    cfg = PerturbationConfig(iterations=1, input_size=32, mask_size=8, noise_std=0.0, game="preservation")
    run = MaskOptimisation.create(tiny, images[0], 4, cfg)
    assert torch.equal(run.mask.detach(), torch.full((1, 1, 8, 8), 0.5))
    with torch.no_grad():
        mixed = blend(run.image_n, run.blurred_n, torch.full((1, 1, 32, 32), 0.5))
        expected_score = float(torch.softmax(tiny.module(mixed), 1)[0, 4])
    e = explain(tiny, images[0], 4, cfg)
    # at mask == 0.5: kept area mean|m| = 0.5, TV = 0, loss = l1 * 0.5 - score
    assert e.history["l1"][0] == pytest.approx(0.5)
    assert e.history["tv"][0] == 0
    assert e.history["score"][0] == pytest.approx(expected_score, abs=1e-6)
    assert e.history["total"][0] == pytest.approx(0.01 * 0.5 - expected_score, abs=1e-6)


def test_preservation_keeps_the_score_and_saliency_is_the_mask(tiny, images):
    cfg = PerturbationConfig(iterations=20, input_size=32, mask_size=8, game="preservation")
    e = explain(tiny, images[0], 2, cfg)
    assert e.history["score"][-1] > e.history["score"][0]  # the kept score grows
    np.testing.assert_array_equal(e.saliency, e.mask_upsampled)
    d = explain(tiny, images[0], 2, cfg.replace(game="deletion"))
    np.testing.assert_allclose(d.saliency, 1 - d.mask_upsampled)


def test_preservation_l1_pulls_the_mask_down(tiny, images):
    """With only the L1 term (TV off, huge l1), the kept area shrinks toward 0."""
    cfg = PerturbationConfig(
        iterations=10, input_size=32, mask_size=8, game="preservation", l1_coeff=100.0, tv_coeff=0.0
    )
    e = explain(tiny, images[0], 2, cfg)
    assert e.mask.max() == 0.0


# ----------------------------------------------------------------------- batching guarantees


VARIANTS = [
    dict(game="preservation"),
    dict(perturbation="constant"),
    dict(perturbation="noise", seed=9),
    dict(game="preservation", perturbation="noise", mask_size=6, iterations=9),
]


def test_batched_equals_solo_for_the_variants(tiny, cfg, images):
    imgs = [images[0], images[1], images[0], images[1]]
    targets = [1, 3, 5, 7]
    cfgs = [cfg.replace(**v) for v in VARIANTS]
    batched = explain_batch(tiny, imgs, targets, cfgs)
    for img, t, c, b in zip(imgs, targets, cfgs, batched):
        alone = explain(tiny, img, t, c)
        assert b.iterations_run == alone.iterations_run
        np.testing.assert_allclose(b.mask, alone.mask, atol=1e-5)
        assert b.score_after == pytest.approx(alone.score_after, abs=1e-5)
        assert b.history["total"] == pytest.approx(alone.history["total"], abs=1e-5)


def test_variant_joining_a_deletion_batch_later(tiny, cfg, images):
    first = MaskOptimisation.create(tiny, images[0], 1, cfg)
    late = MaskOptimisation.create(tiny, images[1], 3, cfg.replace(game="preservation", perturbation="constant"))
    for _ in range(4):
        step_batch(tiny, [first])
    while not (first.done and late.done):
        step_batch(tiny, [first, late])
    np.testing.assert_allclose(first.result(tiny).mask, explain(tiny, images[0], 1, cfg).mask, atol=1e-5)
    np.testing.assert_allclose(late.result(tiny).mask, explain(tiny, images[1], 3, late.config).mask, atol=1e-5)


def test_deterministic_noise_variant(tiny, cfg, images):
    c = cfg.replace(perturbation="noise", game="preservation")
    a, b = explain(tiny, images[0], 1, c), explain(tiny, images[0], 1, c)
    assert np.array_equal(a.mask, b.mask)


def test_final_perturbed_image_uses_the_variant(tiny, images):
    cfg = PerturbationConfig(iterations=1, input_size=32, mask_size=8, perturbation="constant")
    e = explain(tiny, images[0], 1, cfg)
    x = prepare_image(images[0], 32)
    expected = blend(x, perturbation_baseline(x, "constant"), upsample_mask(torch.from_numpy(e.mask)[None, None], 32))
    got = torch.from_numpy(e.perturbed).permute(2, 0, 1).float() / 255
    assert (got - expected[0]).abs().max() <= 1 / 255 + 1e-6
