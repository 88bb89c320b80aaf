"""Grad-CAM baseline through pytorch-grad-cam, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.unit.conftest import TinyNet

pytest.importorskip("pytorch_grad_cam")

from shared.attribution.classifier import Classifier  # noqa: E402
from shared.attribution.gradcam import default_target_layer, gradcam_saliency  # noqa: E402


class BrightNet(nn.Module):
    """Class 0 = how bright the red channel is (after a ReLU'd 1x1 conv); class 1 = constant."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].bias.zero_()
            self.features[0].weight[0, 0, 1, 1] = 1.0  # channel 0 copies red
            self.features[0].weight[1, 1, 1, 1] = 1.0  # channel 1 copies green
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


@pytest.fixture
def bright() -> Classifier:
    return Classifier(module=BrightNet(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=32)


@pytest.fixture
def red_square() -> np.ndarray:
    img = np.zeros((32, 32, 3), np.uint8)
    img[20:28, 4:12, 0] = 255  # red square (the class-0 evidence)
    img[2:10, 20:30, 1] = 255  # green square (ignored by class 0)
    return img


def test_saliency_on_the_evidence(bright, red_square):
    sal = gradcam_saliency(bright, red_square, 0)
    assert sal.shape == (32, 32) and sal.dtype == np.float32
    assert 0 <= sal.min() and sal.max() <= 1 and sal.max() > 0.99
    y, x = np.unravel_index(int(sal.argmax()), sal.shape)
    assert 20 <= y < 28 and 4 <= x < 12
    assert sal[2:10, 20:30].max() < 0.05  # the green square plays no part in class 0


def test_default_layers():
    tiny = TinyNet()
    assert default_target_layer(tiny) is tiny.features[-1]

    class VggLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
            self.classifier = nn.Linear(4, 2)

    vgg = VggLike()
    assert default_target_layer(vgg) is vgg.features[-1]

    class ResLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer4 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))

    res = ResLike()
    assert default_target_layer(res) is res.layer4[-1]

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)
            self.fc = nn.Linear(4, 2)

    plain = Plain()
    assert default_target_layer(plain) is plain.b
    with pytest.raises(ValueError, match="target_layer must be given"):
        default_target_layer(nn.Linear(3, 2))


def test_default_layer_of_efficientnet_lite0():
    timm = pytest.importorskip("timm")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    assert default_target_layer(net) is net.bn2


def test_model_state_restored_and_hooks_removed(images):
    net = TinyNet()
    net.train()
    net.head.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in net.named_parameters()}
    sal = gradcam_saliency(net, images[0], 3)
    assert sal.shape == (224, 224)  # Classifier.wrap's default input size
    assert net.training
    assert {n: p.requires_grad for n, p in net.named_parameters()} == before
    assert all(p.grad is None for p in net.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())


def test_layer_by_name_and_input_size(tiny, images):
    a = gradcam_saliency(tiny, images[0], 1, target_layer="features.1", input_size=64)
    b = gradcam_saliency(tiny, images[0], 1, target_layer=tiny.module.features[1], input_size=64)
    assert a.shape == (64, 64)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target=10), "target must be between 0 and 9"),
        (dict(target=1.5), "target must be a class index"),
        (dict(target_layer="nope.3"), "target_layer 'nope.3' is not a submodule"),
        (dict(target_layer=nn.Conv2d(3, 3, 1)), "target_layer must be a submodule"),
        (dict(target_layer=3), "target_layer must be None, a module or a dotted name"),
    ],
)
def test_bad_arguments(tiny, images, kwargs, message):
    args = dict(target=1, input_size=32)
    args.update(kwargs)
    target = args.pop("target")
    with pytest.raises(ValueError, match=message):
        gradcam_saliency(tiny, images[0], target, **args)
