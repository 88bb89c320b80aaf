"""Deletion / insertion AUC on hand-built models where the exact curves are known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tests.unit.conftest import TinyNet

from shared.attribution.classifier import Classifier
from shared.attribution.metrics import (
    FaithfulnessScores,
    auc,
    deletion_insertion,
    pixel_order,
    step_fractions,
)
from shared.attribution.perturbation import blurred_copy, prepare_image

S = 32  # 4 steps of 32 * 8 = 256 pixels


class RegionNet(nn.Module):
    """Class 0's logit reads only the red channel's contrast in the top-left 16×16
    square (256 pixels = exactly one step at 32×32); class 1's logit is 5."""

    def forward(self, x):
        r = x[:, 0, :16, :16]
        contrast = ((r - 0.5) ** 2).flatten(1).mean(1)
        return torch.stack([40 * contrast, torch.full_like(contrast, 5.0)], dim=1)


@pytest.fixture
def region() -> Classifier:
    return Classifier(module=RegionNet(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), name="region")


@pytest.fixture
def checker() -> np.ndarray:
    """Grey image with a red/black checkerboard in the top-left 16×16 square."""
    img = np.full((S, S, 3), 128, np.uint8)
    yy, xx = np.mgrid[:16, :16]
    img[:16, :16, 0] = np.where((yy + xx) % 2 == 0, 255, 0)
    return img


@pytest.fixture
def region_saliency() -> np.ndarray:
    sal = np.zeros((S, S), np.float32)
    sal[:16, :16] = 1
    return sal


def _p(classifier, x) -> float:
    with torch.no_grad():
        return float(torch.softmax(classifier.module(classifier.normalise(x)), 1)[0, 0])


@pytest.fixture
def p_image(region, checker) -> float:
    return _p(region, prepare_image(checker, S))


@pytest.fixture
def p_blur(region, checker) -> float:
    return _p(region, blurred_copy(prepare_image(checker, S), "mean"))


def test_fixture_model_separates_image_and_blur(p_image, p_blur):
    assert p_image > 0.99 and p_blur < 0.05


def test_right_saliency_deletes_the_class_at_the_first_step(region, checker, region_saliency, p_image, p_blur):
    s = deletion_insertion(region, checker, region_saliency, 0, input_size=S)
    assert s.curves["fraction"] == [0, 0.25, 0.5, 0.75, 1.0]
    assert s.curves["deletion"] == pytest.approx([p_image] + [p_blur] * 4, abs=1e-6)
    assert s.curves["insertion"] == pytest.approx([p_blur] + [p_image] * 4, abs=1e-6)
    assert s.deletion_auc == pytest.approx(0.25 * ((p_image + p_blur) / 2 + 3 * p_blur), abs=1e-6)
    assert s.insertion_auc == pytest.approx(0.25 * ((p_image + p_blur) / 2 + 3 * p_image), abs=1e-6)
    assert s.deletion_auc < 0.2 and s.insertion_auc > 0.8


def test_reversed_saliency_scores_worse(region, checker, region_saliency, p_image, p_blur):
    good = deletion_insertion(region, checker, region_saliency, 0, input_size=S)
    bad = deletion_insertion(region, checker, 1 - region_saliency, 0, input_size=S)
    assert bad.curves["deletion"] == pytest.approx([p_image] * 4 + [p_blur], abs=1e-6)
    assert bad.curves["insertion"] == pytest.approx([p_blur] * 4 + [p_image], abs=1e-6)
    assert bad.deletion_auc == pytest.approx(0.25 * (3 * p_image + (p_image + p_blur) / 2), abs=1e-6)
    assert bad.deletion_auc > good.deletion_auc + 0.5
    assert bad.insertion_auc < good.insertion_auc - 0.5


def test_endpoints_are_the_full_image_and_full_blur(tiny, images):
    rs = np.random.RandomState(1)
    sal = rs.rand(40, 40).astype(np.float32)
    s = deletion_insertion(tiny, images[0], sal, 3, input_size=40, blur="gaussian")
    x = prepare_image(images[0], 40)
    full, blur = _prob(tiny, x, 3), _prob(tiny, blurred_copy(x, "gaussian"), 3)
    assert s.curves["deletion"][0] == pytest.approx(full, abs=1e-5)
    assert s.curves["deletion"][-1] == pytest.approx(blur, abs=1e-5)
    assert s.curves["insertion"][0] == pytest.approx(blur, abs=1e-5)
    assert s.curves["insertion"][-1] == pytest.approx(full, abs=1e-5)


def _prob(classifier, x, target) -> float:
    with torch.no_grad():
        return float(torch.softmax(classifier.module(classifier.normalise(x)), 1)[0, target])


def test_step_count_generalises():
    # 224: 28 steps of 224 * 8 pixels
    per_step, counts = step_fractions(224, 224)
    assert per_step == 224 * 8 and len(counts) == 29 and counts[-1] == 224 * 224
    # 36: ceil(1296 / 288) = 5 steps, the last one shorter
    per_step, counts = step_fractions(36, 36)
    assert per_step == 288 and counts == [0, 288, 576, 864, 1152, 1296]


def test_curve_lengths_and_fractions(tiny, images):
    s = deletion_insertion(tiny, images[1], np.random.RandomState(0).rand(36, 36), 1, input_size=36)
    assert len(s.curves["fraction"]) == len(s.curves["deletion"]) == len(s.curves["insertion"]) == 6
    assert s.curves["fraction"][0] == 0 and s.curves["fraction"][-1] == 1
    assert s.curves["fraction"][1] == pytest.approx(288 / 1296)
    assert 0 <= s.deletion_auc <= 1 and 0 <= s.insertion_auc <= 1
    assert s.deletion_auc == pytest.approx(auc(s.curves["fraction"], s.curves["deletion"]))


def test_auc_trapezoid():
    assert auc([0, 0.5, 1], [1, 1, 0]) == pytest.approx(0.75)
    assert auc([0, 1], [0.2, 0.2]) == pytest.approx(0.2)


def test_ties_broken_deterministically_in_raster_order():
    sal = np.array([[0.5, 1.0], [0.5, 1.0]])
    assert pixel_order(sal).tolist() == [1, 3, 0, 2]
    assert pixel_order(np.zeros((2, 2))).tolist() == [0, 1, 2, 3]


def test_constant_saliency_is_deterministic(tiny, images):
    sal = np.ones((32, 32))
    a = deletion_insertion(tiny, images[0], sal, 2, input_size=32)
    b = deletion_insertion(tiny, images[0], sal, 2, input_size=32)
    assert a.curves == b.curves


def test_batch_size_does_not_change_the_result(tiny, images):
    sal = np.random.RandomState(2).rand(32, 32)
    a = deletion_insertion(tiny, images[0], sal, 2, input_size=32, batch_size=1)
    b = deletion_insertion(tiny, images[0], sal, 2, input_size=32, batch_size=64)
    np.testing.assert_allclose(a.curves["deletion"], b.curves["deletion"], atol=1e-6)
    np.testing.assert_allclose(a.curves["insertion"], b.curves["insertion"], atol=1e-6)


def test_saliency_is_resized_and_tensors_accepted(tiny, images):
    small = np.random.RandomState(4).rand(8, 8).astype(np.float32)
    s = deletion_insertion(tiny, images[0], small, 2, input_size=32)
    t = deletion_insertion(tiny, images[0], torch.from_numpy(small), 2, input_size=32)
    assert len(s.curves["deletion"]) == 5 and s.curves == t.curves


def test_json_and_timing(tiny, images):
    s = deletion_insertion(tiny, images[0], np.ones((32, 32)), 2, input_size=32)
    assert isinstance(s, FaithfulnessScores) and s.seconds > 0
    data = json.loads(json.dumps(s.to_json()))
    assert set(data) == {"target", "deletion_auc", "insertion_auc", "curves", "seconds"}
    assert set(data["curves"]) == {"fraction", "deletion", "insertion"}


def test_model_state_restored(images):
    net = TinyNet()
    net.train()
    deletion_insertion(net, images[0], np.ones((32, 32)), 2, input_size=32)
    assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(saliency=np.ones((2, 3, 3))), "saliency must be a 2-D"),
        (dict(saliency=np.full((32, 32), np.nan)), "saliency must be finite"),
        (dict(blur="box"), "blur must be one of mean, gaussian, median"),
        (dict(target=10), "target must be between 0 and 9"),
        (dict(target=-1), "target must be a non-negative class index"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(input_size=4), "input_size must be an integer"),
    ],
)
def test_bad_arguments(tiny, images, kwargs, message):
    args = dict(saliency=np.ones((32, 32)), target=2, input_size=32)
    args.update(kwargs)
    sal, target = args.pop("saliency"), args.pop("target")
    with pytest.raises(ValueError, match=message):
        deletion_insertion(tiny, images[0], sal, target, **args)
