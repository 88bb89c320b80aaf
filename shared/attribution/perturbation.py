"""Meaningful Perturbation (Fong & Vedaldi, ICCV 2017), as a pure torch module.

For one image and one target class, optimise a low-resolution mask ``m`` that
blends the image with a blurred copy so that the class probability vanishes,
while the mask stays sparse (L1 on ``1 - m``) and smooth (total variation)::

    x    = img * up(m) + blurred * (1 - up(m)) + noise
    loss = l1 * mean|1 - m| + tv * TV_beta(m) + softmax(f(x))[target]

followed by an Adam step on the mask alone and a clamp of the mask to [0, 1].

The paper's variants are options of :class:`PerturbationConfig`: the
``preservation`` game (keep the smallest region that keeps the class:
``l1 * mean|m| + tv * TV - softmax(f(x))[target]``, mask starting at 0.5) and
the ``constant`` / ``noise`` perturbations (see :func:`perturbation_baseline`),
which replace the blurred copy in the blend above.

Conventions: images are ``(N, 3, H, W)`` float32 RGB in [0, 1] unless stated;
masks are ``(N, 1, h, w)`` float32 in [0, 1] where 1 keeps the pixel and 0
replaces it with the blurred copy (or the configured perturbation). This module imports torch and numpy only
(and, optionally and lazily, OpenCV for a fast exact median filter on the CPU):
no I/O, no web, queue or database code.

Small named steps (:func:`gaussian_blur`, :func:`median_blur`,
:func:`blurred_copy`, :func:`perturbation_baseline`, :func:`upsample_mask`,
:func:`blend`, :func:`l1_loss`, :func:`tv_loss`) are composed by :class:`MaskOptimisation` (the state of one
job) and :func:`step_batch` (one batched Adam step for many jobs), which
:func:`explain` and :func:`explain_batch` drive to completion.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .classifier import IMAGENET_STD, Classifier
from .config import PerturbationConfig

__all__ = [
    "Explanation",
    "MaskOptimisation",
    "OnStep",
    "blend",
    "blurred_copy",
    "explain",
    "explain_batch",
    "frozen",
    "gaussian_blur",
    "l1_loss",
    "median_blur",
    "noise_scale",
    "null_progress",
    "perturbation_baseline",
    "prepare_image",
    "step_batch",
    "tv_loss",
    "upsample_mask",
]

LOSS_KEYS = ("total", "l1", "tv", "score")

#: ``on_step(iteration, total, losses) -> bool | None``; ``iteration`` counts
#: from 1, ``losses`` maps ``total``, ``l1``, ``tv`` and ``score`` (this
#: step's, on the noisy input) to floats, and ``live_score`` to the target's
#: probability on the current mask without noise (one extra forward pass,
#: computed only when read; in [0, 1]); its attributes ``target``, ``label``
#: and ``score_before`` describe the run.
#: Returning ``True`` asks the optimisation to stop; it stops after this step.
OnStep = Callable[[int, int, Mapping[str, float]], "bool | None"]


def null_progress(iteration: int, total: int, losses: Mapping[str, float]) -> None:
    """The default progress callback: does nothing and never stops the run."""
    return None


# --------------------------------------------------------------------------- steps


def _gaussian_kernel1d(kernel_size: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(image: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Separable Gaussian blur, matching ``cv2.GaussianBlur`` (reflect-101 border).

    Args:
        image: ``(N, C, H, W)`` float, any range.
        kernel_size: odd kernel side (reference 11).
        sigma: standard deviation in pixels (reference 5).
    Returns:
        ``(N, C, H, W)``, same dtype.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    n, c, h, w = image.shape
    pad = kernel_size // 2
    k = _gaussian_kernel1d(kernel_size, sigma, image.dtype, image.device)
    x = image.reshape(n * c, 1, h, w)
    # torch's "reflect" is OpenCV's BORDER_REFLECT_101 (the GaussianBlur default).
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w)


def _opencv():
    """``cv2`` if installed (the worker has it), else ``None``; imported on first use."""
    global _CV2
    if _CV2 is None:
        try:
            import cv2  # noqa: PLC0415 - optional: only speeds up median_blur on the CPU
        except ImportError:  # pragma: no cover - the pure torch path is used instead
            cv2 = False
        _CV2 = cv2
    return _CV2 or None


_CV2: Any = None


def median_blur(image: torch.Tensor, kernel_size: int = 11) -> torch.Tensor:
    """Median filter, matching ``cv2.medianBlur`` (replicated border).

    Exact on any input. On the CPU, images on the 1/255 grid (all
    :func:`prepare_image` outputs) are filtered on their uint8 codes: by
    ``cv2.medianBlur`` itself when OpenCV is installed (~5 ms at 224², against
    ~200 ms of CPU for the torch selection), else by a torch selection on the
    codes. Other inputs and devices use a torch selection on the values.

    Args:
        image: ``(N, C, H, W)`` float.
        kernel_size: odd window side (reference 11).
    Returns:
        ``(N, C, H, W)``: the median of each ``kernel_size``² window.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    n, c, h, w = image.shape
    pad = kernel_size // 2
    middle = kernel_size * kernel_size // 2 + 1  # the median's rank (1-based) in a window
    # On the CPU only (elsewhere the float selection below is fast enough).
    on_grid = image.device.type == "cpu" and image.dtype == torch.float32 and not image.requires_grad
    if on_grid:
        codes = (image * 255).round()
        on_grid = (image.numel() > 0 and torch.equal(codes / 255, image)
                    and bool(codes.min() >= 0) and bool(codes.max() <= 255))
    if not on_grid:
        x = F.pad(image.reshape(n * c, 1, h, w), (pad, pad, pad, pad), mode="replicate")
    else:
        planes = codes.reshape(n * c, h, w).to(torch.uint8)
        cv2 = _opencv() if kernel_size > 1 else None
        if cv2 is not None:
            out = np.stack([cv2.medianBlur(np.ascontiguousarray(p), kernel_size) for p in planes.numpy()])
            return torch.from_numpy(out).reshape(n, c, h, w).to(image.dtype) / 255
        x = F.pad(planes[:, None].float(), (pad, pad, pad, pad), mode="replicate").to(torch.uint8)
    # Bands of rows keep the unfolded windows (k² values per pixel) small.
    band_rows = max(1, (1 << 22) // max(1, n * c * w * kernel_size * kernel_size))
    rows = []
    for y in range(0, h, band_rows):
        band = x[:, :, y : min(h, y + band_rows) + 2 * pad, :]  # (NC, 1, b + 2p, W + 2p)
        windows = band.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)  # (NC, 1, b, W, k, k)
        windows = windows.reshape(n * c, -1, w, kernel_size * kernel_size)
        rows.append(windows.kthvalue(middle, dim=-1).values)
    out = torch.cat(rows, dim=1).reshape(n, c, h, w)
    return out.to(image.dtype) / 255 if on_grid else out


def blurred_copy(image: torch.Tensor, blur: str = "mean") -> torch.Tensor:
    """The perturbation: a blurred copy of ``image``.

    Args:
        image: ``(N, 3, H, W)`` RGB in [0, 1].
        blur: ``mean`` (of the Gaussian 11×11 σ 5 and median 11 blurs, as the
            reference README says), ``gaussian`` or ``median`` (as the
            reference code does).
    Returns:
        ``(N, 3, H, W)`` in [0, 1].
    """
    if blur == "gaussian":
        return gaussian_blur(image, 11, 5.0)
    if blur == "median":
        return median_blur(image, 11)
    if blur == "mean":
        return (gaussian_blur(image, 11, 5.0) + median_blur(image, 11)) / 2
    raise ValueError(f"blur must be one of mean, gaussian, median, got {blur!r}")


def perturbation_baseline(
    image: torch.Tensor, perturbation: str = "blur", blur: str = "mean", seed: int = 0
) -> torch.Tensor:
    """What replaces the removed pixels: the paper's three perturbations (eq. 3).

    Args:
        image: ``(N, 3, H, W)`` RGB in [0, 1].
        perturbation: ``blur`` (:func:`blurred_copy` with ``blur``), ``constant``
            (every pixel set to the image's per-channel mean colour) or
            ``noise`` (i.i.d. Gaussian pixels with the image's per-channel mean
            and std, clipped to [0, 1]; drawn on the CPU from a generator seeded
            with ``seed``, so the same image and seed give the same noise on
            any device).
        blur: the blur of ``perturbation="blur"`` (ignored otherwise).
        seed: seed of the ``noise`` image (ignored otherwise).
    Returns:
        ``(N, 3, H, W)`` in [0, 1], same dtype and device as ``image``.
    """
    if perturbation == "blur":
        return blurred_copy(image, blur)
    mean = image.mean(dim=(2, 3), keepdim=True)
    if perturbation == "constant":
        return mean.expand_as(image).clone()
    if perturbation == "noise":
        std = image.std(dim=(2, 3), keepdim=True)
        generator = torch.Generator().manual_seed(int(seed))
        eps = torch.randn(image.shape, generator=generator, dtype=torch.float32)
        return (mean + std * eps.to(device=image.device, dtype=image.dtype)).clamp(0, 1)
    raise ValueError(f"perturbation must be one of blur, constant, noise, got {perturbation!r}")


def upsample_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling of the mask (``align_corners=True``, as the reference).

    Args:
        mask: ``(N, 1, h, w)`` in [0, 1].
        size: output side.
    Returns:
        ``(N, 1, size, size)`` in [0, 1].
    """
    return F.interpolate(mask, size=(size, size), mode="bilinear", align_corners=True)


def blend(image: torch.Tensor, blurred: torch.Tensor, mask_up: torch.Tensor) -> torch.Tensor:
    """``image * m + blurred * (1 - m)``.

    Args:
        image, blurred: ``(N, 3, H, W)``, in the same space (pixels or normalised).
        mask_up: ``(N, 1, H, W)`` in [0, 1]; 1 keeps ``image``.
    Returns:
        ``(N, 3, H, W)``.
    """
    return image * mask_up + blurred * (1 - mask_up)


def l1_loss(mask: torch.Tensor) -> torch.Tensor:
    """Sparsity: ``mean |1 - m|`` per sample. ``(N, 1, h, w)`` -> ``(N,)``."""
    return (1 - mask).abs().flatten(1).mean(dim=1)


def tv_loss(mask: torch.Tensor, beta: float = 3.0) -> torch.Tensor:
    """Total variation as in the reference, per sample.

    ``mean(|m[i+1, j] - m[i, j]|^beta) + mean(|m[i, j+1] - m[i, j]|^beta)``.
    ``(N, 1, h, w)`` -> ``(N,)``.
    """
    rows = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).abs().pow(beta).flatten(1).mean(dim=1)
    cols = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).abs().pow(beta).flatten(1).mean(dim=1)
    return rows + cols


def prepare_image(image: Any, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Resize an RGB image to the model's square input.

    Args:
        image: ``(H, W, 3)`` uint8 RGB numpy array, or a ``(3, H, W)`` /
            ``(1, 3, H, W)`` float tensor in [0, 1].
        size: output side.
    Returns:
        ``(1, 3, size, size)`` float32 in [0, 1], quantised to 1/255 steps like
        the reference's uint8 pipeline.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image must be an (H, W, 3) uint8 RGB array, got {image.dtype} {image.shape}"
            )
        x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float() / 255
    elif isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[:2] != (1, 3):
            raise ValueError(f"image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        x = x.detach().float().cpu()
    else:
        raise ValueError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = (x.clamp(0, 1) * 255).round() / 255
    return x.to(device)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode with frozen parameters; restore both on exit."""
    training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(training)


# --------------------------------------------------------------------------- results


@dataclass
class Explanation:
    """The result of one mask optimisation.

    Attributes:
        mask: ``(h, w)`` float32 in [0, 1]; 1 keeps the pixel, 0 replaces it
            with the perturbation (blur, constant or noise). In the deletion
            game the important region is where the mask is low; in the
            preservation game, where it is high (see :attr:`saliency`).
        mask_upsampled: ``(S, S)`` float32 in [0, 1] at the input size.
        perturbed: ``(S, S, 3)`` uint8 RGB, the final perturbation (no noise).
        target, label: the explained class.
        score_before, score_after: target probability on the input and on the
            final perturbed image (no noise), in [0, 1].
        top5_before, top5_after: ``[{"index", "label", "prob"}, ...]``.
        history: per-iteration ``total``, ``l1``, ``tv`` and ``score`` losses
            (``score`` is the target probability in both games; ``total``
            subtracts it in the preservation game).
        elapsed_s: wall time from creation to the end of the last step.
        iterations_run: steps taken (fewer than configured if cancelled).
        cancelled: the progress callback asked the run to stop.
        config: the settings used.
    """

    mask: np.ndarray
    mask_upsampled: np.ndarray
    perturbed: np.ndarray
    target: int
    label: str
    score_before: float
    score_after: float
    top5_before: list[dict[str, Any]]
    top5_after: list[dict[str, Any]]
    history: dict[str, list[float]]
    elapsed_s: float
    iterations_run: int
    cancelled: bool
    config: PerturbationConfig
    model: str = "model"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def saliency(self) -> np.ndarray:
        """``(S, S)`` float32 in [0, 1], high = important.

        ``1 - mask_upsampled`` in the deletion game (the removed region
        matters), ``mask_upsampled`` in the preservation game (the kept one).
        """
        if self.config.game == "preservation":
            return self.mask_upsampled.copy()
        return 1.0 - self.mask_upsampled

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe summary (no arrays except the loss history)."""
        return {
            "model": self.model,
            "target": {"index": self.target, "label": self.label},
            "scores": {"before": self.score_before, "after": self.score_after},
            "top5": {"before": self.top5_before, "after": self.top5_after},
            "config": self.config.to_dict(),
            "iterations_run": self.iterations_run,
            "cancelled": self.cancelled,
            "timings": {"total_s": self.elapsed_s, **self.timings},
            "history": self.history,
        }


class _LazyLosses(Mapping):
    """Loss values of one step, read from the device only when accessed.

    Keys: ``total``, ``l1``, ``tv``, ``score`` (this step's, on the noisy
    input) and ``live_score``: the target's probability on the current mask
    (after this step) *without* noise, computed by one extra forward pass only
    when read. Attributes ``target``, ``label`` and ``score_before`` describe
    the run (known from its creation); ``saliency()`` returns the current
    low-resolution saliency map.
    """

    KEYS = (*LOSS_KEYS, "live_score")

    def __init__(self, values: torch.Tensor, live: Callable[[], float] | None = None,
                 target: int | None = None, label: str | None = None, score_before: float | None = None,
                 saliency: Callable[[], np.ndarray] | None = None):
        self._values = values
        #: ``saliency()``: the current ``(h, w)`` float32 saliency in [0, 1]
        #: (high = important), a copy; ``None`` when the run offers none.
        self.saliency = saliency
        self._cache: list[float] | None = None
        self._live = live
        self._live_value: float | None = None
        self.target, self.label, self.score_before = target, label, score_before

    def __getitem__(self, key: str) -> float:
        if key == "live_score":
            if self._live is None:
                raise KeyError(key)
            if self._live_value is None:
                self._live_value = float(self._live())
            return self._live_value
        if self._cache is None:
            self._cache = self._values.tolist()
        return self._cache[LOSS_KEYS.index(key)]

    def __contains__(self, key: object) -> bool:  # without computing anything
        return key in (self.KEYS if self._live is not None else LOSS_KEYS)

    def __iter__(self):
        return iter(self.KEYS if self._live is not None else LOSS_KEYS)

    def __len__(self) -> int:
        return len(self.KEYS) if self._live is not None else len(LOSS_KEYS)


def _top5(probs: torch.Tensor, classifier: Classifier) -> list[dict[str, Any]]:
    values, indices = probs.topk(min(5, probs.numel()))
    return [
        {"index": int(i), "label": classifier.label(int(i)), "prob": float(p)}
        for p, i in zip(values.tolist(), indices.tolist())
    ]


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


#: Layers whose float32 weight and bias autocast casts to bf16 on every call.
_AUTOCAST_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                    nn.ConvTranspose3d, nn.Linear)
_bf16_lock = threading.Lock()
_bf16_copies: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]]" = weakref.WeakKeyDictionary()


def _bf16_weights(module: nn.Module) -> nn.Module:
    """``module`` with its convolution and linear weights already in bf16, for autocast.

    Under bf16 autocast those layers cast their float32 weight and bias to bf16
    on *every* call (autocast caches casts only for parameters that require
    grad, and ours are frozen): for VGG19 that is 140 M values per step,
    ~20% of a bf16 step at batch 1 on a CPU. This copy holds those weights cast
    once (the same bf16 values autocast would make, so results are identical)
    and shares every other parameter and buffer with ``module``. It is cached
    per module and rebuilt when a weight changes (moved, reloaded, modified in
    place, or put in another memory format). Compiled modules are returned as is.
    """
    if hasattr(module, "_orig_mod"):  # torch.compile wrapper: leave it alone
        return module
    weights = [t for m in module.modules() if isinstance(m, _AUTOCAST_LAYERS)
               for t in (m.weight, m.bias) if t is not None and t.dtype == torch.float32]
    if not weights:
        return module
    key = tuple((t.data_ptr(), t._version, t.device, t.stride()) for t in weights)
    with _bf16_lock:
        cached = _bf16_copies.get(module)
        if cached is None or cached[0] != key:
            cast = {id(t) for t in weights}
            memo: dict[int, Any] = {}
            for t in itertools.chain(module.parameters(), module.buffers()):
                if id(t) not in cast:
                    memo[id(t)] = t  # shared, not copied
                elif isinstance(t, nn.Parameter):
                    memo[id(t)] = nn.Parameter(t.detach().to(torch.bfloat16), requires_grad=False)
                else:  # pragma: no cover - weights are parameters in torch's layers
                    memo[id(t)] = t.detach().to(torch.bfloat16)
            cached = (key, copy.deepcopy(module, memo))
            _bf16_copies[module] = cached
    shadow = cached[1]
    if shadow.training != module.training:
        shadow.train(module.training)
    return shadow


def _probabilities(classifier: Classifier, x: torch.Tensor, precision: str) -> torch.Tensor:
    """Softmax over classes of normalised ``x`` ``(N, 3, S, S)`` -> ``(N, C)`` float32."""
    module = classifier.module
    if precision == "bf16":
        try:
            module = _bf16_weights(module)
        except Exception:  # noqa: BLE001 - e.g. a module deepcopy refuses: plain autocast
            module = classifier.module
    with _autocast(x.device, precision):
        logits = module(x)
    return torch.softmax(logits.float(), dim=1)


# --------------------------------------------------------------------------- optimisation


def noise_scale(classifier: Classifier, noise_std: float, device: torch.device | str = "cpu") -> "float | torch.Tensor":
    """The per-step noise's std in ``classifier``'s normalised input space.

    ``noise_std`` is in units of ImageNet's per-channel std (the reference's
    space), so the pixel-space noise is ``noise_std * IMAGENET_STD`` for every
    model. Returns the float ``noise_std`` itself for an ImageNet-normalised
    model (bit-identical to the reference), else a ``(1, 3, 1, 1)`` float32
    tensor ``noise_std * IMAGENET_STD / classifier.std``.
    """
    ratios = [a / b for a, b in zip(IMAGENET_STD, classifier.std)]
    if all(r == 1.0 for r in ratios):
        return float(noise_std)
    return torch.tensor([noise_std * r for r in ratios], dtype=torch.float32, device=device).view(1, 3, 1, 1)



class MaskOptimisation:
    """The state of one job's optimisation: its mask, Adam, noise stream and history.

    Create with :meth:`create`; advance (with others) by :func:`step_batch`;
    read the result with :meth:`result` once :attr:`done`.
    """

    def __init__(self) -> None:  # use create()
        self.mask: torch.Tensor
        self.optimizer: torch.optim.Optimizer

    @classmethod
    @torch.no_grad()
    def create(
        cls,
        model: Classifier | nn.Module,
        image: Any,
        target: int | None = None,
        config: PerturbationConfig = PerturbationConfig(),
        on_step: OnStep | None = None,
    ) -> "MaskOptimisation":
        """Prepare a run: resize, blur, score the clean image, pick the target.

        Args:
            model: the black box (a :class:`Classifier`, or a bare module with
                ImageNet normalisation).
            image: ``(H, W, 3)`` uint8 RGB array or a float tensor in [0, 1].
            target: class index; ``None`` explains the model's top-1.
            config: a :class:`PerturbationConfig`.
            on_step: progress callback (see :data:`OnStep`).
        """
        if not isinstance(config, PerturbationConfig):
            raise ValueError(f"config must be a PerturbationConfig, got {type(config).__name__}")
        classifier = Classifier.wrap(model)
        self = cls()
        self.started = time.perf_counter()
        self.classifier = classifier
        self.classifier_name = classifier.name
        self.config = config
        self.on_step = on_step or null_progress
        self.device = classifier.device
        size = config.input_size

        self.image = prepare_image(image, size, self.device)  # (1, 3, S, S) [0, 1]
        # ``blurred`` is the perturbation (the blurred copy unless configured otherwise).
        self.blurred = perturbation_baseline(self.image, config.perturbation, config.blur, config.seed)
        self.image_n = classifier.normalise(self.image)
        self.blurred_n = classifier.normalise(self.blurred)
        self.noise_scale = noise_scale(classifier, config.noise_std, self.device)

        with frozen(classifier.module):
            probs = _probabilities(classifier, self.image_n, config.precision)[0]
        num_classes = probs.numel()
        if target is None:
            target = int(probs.argmax())
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise ValueError(f"target must be a class index (int) or None, got {target!r}")
        if not 0 <= int(target) < num_classes:
            raise ValueError(f"target must be between 0 and {num_classes - 1}, got {target}")
        self.target = int(target)
        self.label = classifier.label(self.target)
        self.score_before = float(probs[self.target])
        self.top5_before = _top5(probs, classifier)

        # Deletion starts from "keep everything" (reference); preservation halfway.
        init = 1.0 if config.game == "deletion" else 0.5
        self.mask = torch.full(
            (1, 1, config.mask_size, config.mask_size), init, device=self.device, requires_grad=True
        )
        self.optimizer = torch.optim.Adam([self.mask], lr=config.learning_rate)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.iteration = 0
        self.cancelled = False
        self.history = torch.zeros(config.iterations, len(LOSS_KEYS), device=self.device)
        self.first_step_at: float | None = None  # perf_counter() when its first step began
        self.setup_s = time.perf_counter() - self.started
        return self

    @property
    def done(self) -> bool:
        return self.cancelled or self.iteration >= self.config.iterations

    def perturbed_input(self, noise: bool = True) -> torch.Tensor:
        """The blended input in the model's normalised space, ``(1, 3, S, S)``."""
        x = blend(self.image_n, self.blurred_n, upsample_mask(self.mask, self.config.input_size))
        if noise and self.config.noise_std > 0:
            x = x + self.noise_scale * torch.randn(
                x.shape, generator=self.generator, device=self.device, dtype=x.dtype
            )
        return x

    def regularisers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(l1, tv)`` of the current mask, each a ``(1,)`` tensor.

        ``l1`` is ``mean|1 - m|`` (the removed area) in the deletion game and
        ``mean|m|`` (the kept area) in the preservation game.
        """
        removed = self.mask if self.config.game == "deletion" else 1 - self.mask
        return l1_loss(removed), tv_loss(self.mask, self.config.tv_beta)

    def objective(self, l1: torch.Tensor, tv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The loss to minimise from its terms (scalars): ``+score`` when
        deleting, ``-score`` when preserving."""
        sign = 1.0 if self.config.game == "deletion" else -1.0
        return self.config.l1_coeff * l1 + self.config.tv_coeff * tv + sign * score

    def finish_step(self, losses: torch.Tensor) -> None:
        """Adam step, clamp, record ``losses`` (``(4,)``: total, l1, tv, score), report."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.mask.clamp_(0, 1)
        self.history[self.iteration] = losses
        self.iteration += 1
        lazy = _LazyLosses(losses, self.live_score, self.target, self.label, self.score_before,
                           self.current_saliency)
        if self.on_step(self.iteration, self.config.iterations, lazy):
            self.cancelled = True

    @torch.no_grad()
    def current_saliency(self) -> np.ndarray:
        """The current mask as a saliency map: ``(h, w)`` float32 in [0, 1],
        high = important (``1 - mask`` when deleting, ``mask`` when preserving)."""
        mask = self.mask.detach()[0, 0].float().cpu().numpy().copy()
        return mask if self.config.game == "preservation" else 1.0 - mask

    @torch.no_grad()
    def live_score(self) -> float:
        """The target's probability in [0, 1] on the current mask without noise:
        one forward pass of batch 1, the same computation as
        :meth:`result`'s ``score_after`` (equal to it bit for bit at the last step)."""
        classifier = self.classifier
        with frozen(classifier.module):
            probs = _probabilities(classifier, self.perturbed_input(noise=False), self.config.precision)[0]
        return float(probs[self.target])

    @torch.no_grad()
    def result(self, model: Classifier | nn.Module) -> Explanation:
        """Score the final perturbation (no noise) and package the result."""
        classifier = Classifier.wrap(model)
        finish = time.perf_counter()
        with frozen(classifier.module):
            probs = _probabilities(classifier, self.perturbed_input(noise=False), self.config.precision)[0]
        mask = self.mask.detach()
        mask_up = upsample_mask(mask, self.config.input_size)
        perturbed = blend(self.image, self.blurred, mask_up)[0]
        history = self.history[: self.iteration].T.tolist()
        end = time.perf_counter()
        return Explanation(
            mask=mask[0, 0].float().cpu().numpy(),
            mask_upsampled=mask_up[0, 0].float().cpu().numpy(),
            perturbed=(perturbed.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy(),
            target=self.target,
            label=self.label,
            score_before=self.score_before,
            score_after=float(probs[self.target]),
            top5_before=self.top5_before,
            top5_after=_top5(probs, classifier),
            history={k: (history[i] if history else []) for i, k in enumerate(LOSS_KEYS)},
            elapsed_s=end - self.started,
            iterations_run=self.iteration,
            cancelled=self.cancelled,
            config=self.config,
            model=self.classifier_name,
            timings={"setup_s": self.setup_s, "optimise_s": finish - self.started - self.setup_s,
                     "finalise_s": end - finish,
                     # from the start of create() to the start of the first step
                     # (setup, then any wait for a batch); absent if no step ran
                     **({"to_first_step_s": self.first_step_at - self.started}
                        if self.first_step_at is not None else {})},
        )


def step_batch(
    model: Classifier | nn.Module,
    runs: Sequence[MaskOptimisation],
    *,
    width: int | None = None,
    slots: Sequence[int] | None = None,
) -> None:
    """Advance every unfinished run by one step in one forward/backward batch.

    Runs may differ in config (coefficients, mask size, seed, iterations,
    game, perturbation) but must share ``input_size``. Each run's mask, Adam
    state and noise stream (its own ``torch.Generator``) are its own.

    Without ``width`` the batch holds exactly the unfinished runs, so a run's
    arithmetic (and thus, through Adam, its mask) may differ at float level
    with the batch size: kernels pick different blockings for different
    batch sizes. With ``width`` every step uses a batch of exactly ``width``
    samples, run ``i`` in slot ``slots[i]`` (default: its position in
    ``runs``) and the free slots filled with zeros; a run's mask then comes
    out bit-for-bit the same whoever shares the batch (checked on the CPU for
    fp32 and bf16: ``tests/unit/test_reproducibility.py``).

    Args:
        model: the black box.
        runs: the runs; finished ones are skipped.
        width: fixed batch size (>= the number of unfinished runs), or ``None``.
        slots: one distinct slot in ``[0, width)`` per run of ``runs``.
    """
    if slots is not None and len(slots) != len(runs):
        raise ValueError("slots must have one entry per run")
    placed = [(r, (slots[i] if slots is not None else i)) for i, r in enumerate(runs) if not r.done]
    if not placed:
        return
    active = [r for r, _ in placed]
    sizes = {r.config.input_size for r in active}
    if len(sizes) != 1:
        raise ValueError(f"runs in one batch must share input_size, got {sorted(sizes)}")
    if width is not None:
        taken = [s for _, s in placed]
        if len(set(taken)) != len(taken) or any(not 0 <= s < width for s in taken):
            raise ValueError(f"slots must be distinct and in [0, {width}), got {taken}")
    now = time.perf_counter()
    for r in active:
        if r.first_step_at is None:
            r.first_step_at = now
    classifier = Classifier.wrap(model)
    precision = "bf16" if any(r.config.precision == "bf16" for r in active) else "fp32"
    with frozen(classifier.module), torch.enable_grad():
        inputs = [r.perturbed_input(noise=True) for r in active]
        if width is None:
            x = torch.cat(inputs)
            index = list(range(len(active)))
        else:
            filler = torch.zeros_like(inputs[0])
            layout: list[torch.Tensor] = [filler] * width
            for (_, slot), xi in zip(placed, inputs):
                layout[slot] = xi
            x = torch.cat(layout)
            index = [slot for _, slot in placed]
        probs = _probabilities(classifier, x, precision)
        targets = torch.tensor([r.target for r in active], device=x.device)
        scores = probs[index].gather(1, targets[:, None])[:, 0]
        totals = []
        rows = []
        for i, r in enumerate(active):
            l1, tv = r.regularisers()
            total = r.objective(l1[0], tv[0], scores[i])
            totals.append(total)
            rows.append(torch.stack([total, l1[0], tv[0], scores[i]]).detach())
        torch.stack(totals).sum().backward()
    for r, losses in zip(active, rows):
        r.finish_step(losses)


def explain_batch(
    model: Classifier | nn.Module,
    images: Sequence[Any],
    targets: Sequence[int | None] | None = None,
    config: PerturbationConfig | Sequence[PerturbationConfig] = PerturbationConfig(),
    on_step: OnStep | Sequence[OnStep | None] | None = None,
) -> list[Explanation]:
    """Optimise several masks together, one forward/backward batch per step.

    Args:
        images: each ``(H, W, 3)`` uint8 RGB.
        targets: one class index (or ``None`` for top-1) per image.
        config: one config for all, or one per image (same ``input_size``).
        on_step: one callback for all, or one per image.
    Returns:
        One :class:`Explanation` per image, in order.
    """
    n = len(images)
    targets = list(targets) if targets is not None else [None] * n
    configs = [config] * n if isinstance(config, PerturbationConfig) else list(config)
    callbacks = list(on_step) if isinstance(on_step, Sequence) else [on_step] * n
    if not (len(targets) == len(configs) == len(callbacks) == n):
        raise ValueError("images, targets, config and on_step must have the same length")
    classifier = Classifier.wrap(model)
    runs = [
        MaskOptimisation.create(classifier, img, t, c, cb)
        for img, t, c, cb in zip(images, targets, configs, callbacks)
    ]
    while not all(r.done for r in runs):
        step_batch(classifier, runs)
    return [r.result(classifier) for r in runs]


def explain(
    model: Classifier | nn.Module,
    image: Any,
    target: int | None = None,
    config: PerturbationConfig = PerturbationConfig(),
    on_step: OnStep | None = None,
) -> Explanation:
    """Explain ``model``'s decision for ``target`` on ``image``.

    Runs on the model's device (move the model to CUDA to run there).

    Args:
        model: a :class:`Classifier` or a bare ``nn.Module`` (ImageNet
            normalisation assumed); its training flag and ``requires_grad``
            are restored on exit and its parameters never accumulate gradients.
        image: ``(H, W, 3)`` uint8 RGB array (any size) or a float tensor in [0, 1].
        target: class index; ``None`` explains the top-1 class.
        config: hyperparameters (reference defaults).
        on_step: ``on_step(iteration, total, losses)``; returning ``True`` stops
            the run after the current step (``Explanation.cancelled``).
    Returns:
        An :class:`Explanation`.
    """
    return explain_batch(model, [image], [target], config, [on_step])[0]
