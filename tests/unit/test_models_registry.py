"""Model registry: names, weights sources and their failures, efficientnet_lite0 offline."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

from shared.attribution.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from shared.models import efficientnet_lite, registry
from shared.models.registry import WeightsUnavailableError, available_models, describe, load_model


@pytest.fixture
def images_dir() -> Path:
    """The example images in ``tests/data/images`` (skips when absent)."""
    path = Path(__file__).resolve().parents[1] / "data" / "images"
    if not path.is_dir():
        pytest.skip(f"example images not found at {path}")
    return path


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def lite() -> Classifier:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model("efficientnet_lite0")


def _probabilities(classifier: Classifier, image: Path) -> torch.Tensor:
    """``(1000,)`` softmax of the model on ``image`` resized to 224x224 RGB."""
    import numpy as np
    from PIL import Image

    with Image.open(image) as im:
        rgb = im.convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().unsqueeze(0) / 255.0  # (1, 3, 224, 224) in [0, 1]
    with torch.no_grad():
        return classifier.module(classifier.normalise(x)).softmax(dim=1)[0]


# --------------------------------------------------------------------------- names


def test_registry_import_is_light():
    code = "import sys, shared.models.registry; sys.exit(any(m in sys.modules for m in ('torch', 'timm')))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_available_models():
    names = available_models()
    assert names == sorted(names)
    for name in ("vgg19", "efficientnet_lite0", "resnet18", "squeezenet1_0"):
        assert name in names
    assert "fasterrcnn_resnet50_fpn" not in names  # detection models are not classifiers


@pytest.mark.parametrize("name", ["resnet-19", "nope", "", "  "])
def test_unknown_name(name):
    with pytest.raises(ValueError, match="vgg19"):
        load_model(name)


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="Did you mean.*resnet18"):
        load_model("resnet19")


def test_bad_device():
    with pytest.raises(ValueError, match="device"):
        load_model("efficientnet_lite0", device="gpu")


def test_describe_torchvision(empty_torch_home):
    info = describe("VGG19")
    assert info["name"] == "vgg19"
    assert info["input_size"] == 224
    assert info["mean"] == IMAGENET_MEAN and info["std"] == IMAGENET_STD
    assert info["offline"] is False
    assert info["source"] == "torchvision"
    assert info["weights_path"] == str(empty_torch_home / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth")
    assert info["url"].endswith("/vgg19-dcbb9e9d.pth")
    assert describe("inception_v3")["input_size"] == 299


def test_describe_lite():
    info = describe("efficientnet-lite0")
    assert info["name"] == "efficientnet_lite0"
    assert info["offline"] is True
    assert info["mean"] == (0.5, 0.5, 0.5) and info["std"] == (0.5, 0.5, 0.5)
    assert Path(info["weights_path"]).name == efficientnet_lite.CHECKPOINT_NAME


# --------------------------------------------------------------------------- torchvision weights


def test_missing_weights_name_the_file(empty_torch_home, monkeypatch):
    """Offline: the error says which file to put where (download simulated failing)."""

    def offline(url, destination):
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setattr(registry, "_download", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("resnet18")
    expected = empty_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    message = str(info.value)
    assert "'resnet18'" in message
    assert str(expected) in message
    assert "EBB_WEIGHTS_FILE" in message and "simulated: no network" in message
    assert info.value.model == "resnet18"
    assert info.value.expected_path == str(expected)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def _network_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_missing_weights_real_download_fails_cleanly(empty_torch_home):
    """The real download path, on a machine without internet."""
    if _network_reachable():
        pytest.skip("network reachable: the download would succeed")
    with pytest.raises(WeightsUnavailableError, match=r"squeezenet1_0-b66bff10\.pth"):
        load_model("squeezenet1_0")


def test_cached_weights_are_used_without_download(empty_torch_home, monkeypatch):
    def no_download(url, destination):  # pragma: no cover - must not be called
        raise AssertionError("downloaded although the file is cached")

    monkeypatch.setattr(registry, "_download", no_download)
    source = torchvision.models.squeezenet1_0(num_classes=1000).state_dict()
    cached = empty_torch_home / "hub" / "checkpoints" / "squeezenet1_0-b66bff10.pth"
    cached.parent.mkdir(parents=True)
    torch.save(source, cached)
    assert describe("squeezenet1_0")["offline"] is True
    classifier = load_model("squeezenet1_0")
    assert torch.equal(classifier.module.state_dict()["classifier.1.weight"], source["classifier.1.weight"])


def test_weights_file(tmp_path):
    source = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18-random.pth"
    torch.save(source, path)
    classifier = load_model("resnet18", weights_file=str(path))
    assert isinstance(classifier, Classifier)
    assert classifier.name == "resnet18"
    assert classifier.module.training is False
    assert torch.equal(classifier.module.state_dict()["fc.weight"], source["fc.weight"])
    assert torch.equal(classifier.module.state_dict()["layer1.0.bn1.running_var"], source["layer1.0.bn1.running_var"])
    assert classifier.mean == IMAGENET_MEAN and classifier.std == IMAGENET_STD
    assert classifier.input_size == 224
    assert len(classifier.labels) == 1000 and classifier.labels[558] == "flute"
    assert all(not p.requires_grad for p in classifier.module.parameters())
    logits = classifier.module(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 1000)


def test_weights_file_wrapped_and_dataparallel_prefix(tmp_path):
    source = torchvision.models.resnet18().state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": OrderedDict((f"module.{k}", v) for k, v in source.items())}, path)
    classifier = load_model("resnet18", weights_file=str(path))
    assert torch.equal(classifier.module.state_dict()["conv1.weight"], source["conv1.weight"])


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_weights_file_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": _Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_model("resnet18", weights_file=str(path))


def test_weights_file_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=str(path)):
        load_model("resnet18", weights_file=str(path))


def test_weights_file_missing(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(WeightsUnavailableError, match=rf"'resnet18'.*{path}"):
        load_model("resnet18", weights_file=str(path))


def test_weights_file_for_other_architecture(tmp_path):
    path = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_0().state_dict(), path)
    with pytest.raises(ValueError, match="do not fit model 'resnet18'.*missing"):
        load_model("resnet18", weights_file=str(path))


# --------------------------------------------------------------------------- efficientnet_lite0


def test_lite_remap_rejects_mismatches():
    target = OrderedDict(
        [("conv_stem.weight", torch.zeros(4, 3, 3, 3)), ("bn1.weight", torch.zeros(4)), ("bn1.bias", torch.zeros(4))]
    )
    good = OrderedDict(
        [("_conv_stem.weight", torch.ones(4, 3, 3, 3)), ("_bn0.weight", torch.ones(4)), ("_bn0.bias", torch.ones(4))]
    )
    assert list(efficientnet_lite.remap_state_dict(good, target)) == list(target)
    swapped = OrderedDict([good.popitem(last=False)] + list(reversed(list(good.items()))))
    with pytest.raises(ValueError, match="'bias' != 'weight'"):
        efficientnet_lite.remap_state_dict(swapped, target)
    wrong_shape = OrderedDict(
        [("_conv_stem.weight", torch.ones(4, 3, 5, 5)), ("_bn0.weight", torch.ones(4)), ("_bn0.bias", torch.ones(4))]
    )
    with pytest.raises(ValueError, match="shape"):
        efficientnet_lite.remap_state_dict(wrong_shape, target)
    with pytest.raises(ValueError, match="2 tensors"):
        efficientnet_lite.remap_state_dict(OrderedDict(list(wrong_shape.items())[:2]), target)


@pytest.mark.realmodel
def test_lite_checkpoint_located():
    path = efficientnet_lite.packaged_checkpoint()
    assert path is not None and path.is_file()
    efficientnet_lite.verify_checkpoint_hash(path)


@pytest.mark.realmodel
def test_lite_loads_strict_in_eval(lite):
    assert lite.name == "efficientnet_lite0"
    assert lite.module.training is False
    assert all(not m.training for m in lite.module.modules())
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5)
    assert lite.input_size == 224
    assert len(lite.labels) == 1000 and lite.labels[558] == "flute"
    source = torch.load(efficientnet_lite.packaged_checkpoint(), map_location="cpu", weights_only=True)
    loaded = lite.module.state_dict()
    assert len(loaded) == len(source) == 296
    assert torch.equal(loaded["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(loaded["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"])
    assert torch.equal(loaded["classifier.bias"], source["_fc.bias"])


@pytest.mark.realmodel
def test_lite_top1_flute(lite, images_dir):
    p = _probabilities(lite, images_dir / "flute.jpg")
    assert int(p.argmax()) == 558
    assert float(p[558]) > 0.9  # measured 0.979


@pytest.mark.realmodel
def test_lite_top1_both(lite, images_dir):
    p = _probabilities(lite, images_dir / "both.png")
    assert int(p.argmax()) == 243  # bull mastiff
    assert float(p[243]) == pytest.approx(0.33, abs=0.03)  # measured 0.328
    assert float(p[282]) == pytest.approx(0.03, abs=0.01)  # tiger cat, measured 0.028


@pytest.mark.realmodel
def test_lite_weights_file_timm_layout(lite, tmp_path):
    """A state dict already in timm's key layout is accepted as weights_file."""
    path = tmp_path / "lite-timm.pth"
    torch.save(lite.module.state_dict(), path)
    again = load_model("efficientnet_lite0", weights_file=str(path))
    assert torch.equal(again.module.state_dict()["bn2.running_var"], lite.module.state_dict()["bn2.running_var"])
