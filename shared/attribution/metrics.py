"""Faithfulness of a saliency map: deletion and insertion AUC (Petsiuk et al., RISE, 2018).

*Deletion* removes pixels from the most to the least salient, replacing them
with the blurred copy of the image, and records the target class probability
after every step; a faithful map makes it fall fast (low AUC is good).
*Insertion* starts from the blurred copy and restores pixels in the same
order; a faithful map makes it rise fast (high AUC is good).

Steps: ``ceil(H*W / (H*8))`` steps of ``H*8`` pixels (28 steps of 224×8 at
224), so each curve has ``steps + 1`` points at the fractions of pixels
changed ``0, H*8/(H*W), ..., 1`` (the last step may be shorter). The AUC is the
trapezoid rule over the fraction in [0, 1]. All step images are scored without
gradients, in batches, on the model's device. torch and numpy only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .classifier import Classifier
from .config import BLURS
from .perturbation import blurred_copy, frozen, prepare_image

__all__ = ["FaithfulnessScores", "auc", "deletion_insertion", "pixel_order", "step_fractions"]


@dataclass
class FaithfulnessScores:
    """Deletion / insertion curves of one saliency map and their areas.

    Attributes:
        deletion_auc: area under the deletion curve, in [0, 1] (lower is better).
        insertion_auc: area under the insertion curve, in [0, 1] (higher is better).
        curves: ``{"fraction": [...], "deletion": [...], "insertion": [...]}``,
            ``steps + 1`` floats each: fraction of pixels changed (0 to 1) and
            the target probability (in [0, 1]) at that fraction.
        seconds: wall time of the evaluation.
        target: the class whose probability was tracked.
    """

    deletion_auc: float
    insertion_auc: float
    curves: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    target: int = -1

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (floats and lists only)."""
        return {
            "target": self.target,
            "deletion_auc": self.deletion_auc,
            "insertion_auc": self.insertion_auc,
            "curves": {k: list(v) for k, v in self.curves.items()},
            "seconds": self.seconds,
        }


def step_fractions(height: int, width: int) -> tuple[int, list[int]]:
    """Pixels per step and the number of pixels changed after each step.

    Returns:
        ``(per_step, counts)``: ``per_step = height * 8``; ``counts`` has
        ``ceil(height * width / per_step) + 1`` entries from 0 to
        ``height * width``.
    """
    total = height * width
    per_step = height * 8
    steps = math.ceil(total / per_step)
    return per_step, [min(k * per_step, total) for k in range(steps + 1)]


def pixel_order(saliency: np.ndarray) -> np.ndarray:
    """Flat pixel indices from the most to the least salient.

    Ties keep raster order (a stable sort), so the order is deterministic.
    ``(H, W)`` float -> ``(H*W,)`` int64.
    """
    flat = np.asarray(saliency, dtype=np.float64).ravel()
    return np.argsort(-flat, kind="stable")


def auc(fractions: list[float] | np.ndarray, values: list[float] | np.ndarray) -> float:
    """Trapezoid-rule area under ``values`` over ``fractions`` (increasing, 0 to 1)."""
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def _as_saliency(saliency: Any, size: int) -> np.ndarray:
    if isinstance(saliency, torch.Tensor):
        saliency = saliency.detach().float().cpu().numpy()
    sal = np.asarray(saliency, dtype=np.float32)
    if sal.ndim != 2:
        raise ValueError(f"saliency must be a 2-D (H, W) array, got shape {sal.shape}")
    if not np.isfinite(sal).all():
        raise ValueError("saliency must be finite (no NaN or inf)")
    if sal.shape != (size, size):
        t = torch.from_numpy(sal)[None, None]
        sal = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    return sal


@torch.no_grad()
def deletion_insertion(
    model: Classifier | nn.Module,
    image: Any,
    saliency: Any,
    target: int,
    *,
    blur: str = "mean",
    input_size: int = 224,
    batch_size: int = 16,
) -> FaithfulnessScores:
    """Deletion and insertion curves and AUCs of ``saliency`` for ``target``.

    Args:
        model: a :class:`Classifier` (or a bare module with ImageNet
            normalisation); run in eval mode on its device, state restored.
        image: ``(H, W, 3)`` uint8 RGB array or a ``(3, H, W)`` / ``(1, 3, H, W)``
            float tensor in [0, 1]; resized to ``input_size`` as the
            explanations are (:func:`~shared.attribution.perturbation.prepare_image`).
        saliency: ``(S, S)`` float (numpy or tensor), higher = more important,
            any range; resized bilinearly to ``input_size`` if ``S`` differs.
            For a Meaningful Perturbation result pass ``Explanation.saliency``.
        target: class index whose softmax probability is tracked.
        blur: the blurred copy that replaces removed pixels (``mean``,
            ``gaussian`` or ``median``, as in :class:`PerturbationConfig`).
        input_size: side of the square model input.
        batch_size: step images per forward pass.
    Returns:
        :class:`FaithfulnessScores`.
    """
    started = time.perf_counter()
    if blur not in BLURS:
        raise ValueError(f"blur must be one of {', '.join(BLURS)}, got {blur!r}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 8:
        raise ValueError(f"input_size must be an integer of at least 8, got {input_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    classifier = Classifier.wrap(model)
    device = classifier.device
    x = prepare_image(image, input_size, device)  # (1, 3, S, S)
    blurred = blurred_copy(x, blur)
    sal = _as_saliency(saliency, input_size)
    h, w = sal.shape
    order = torch.from_numpy(pixel_order(sal)).to(device)
    rank = torch.empty(h * w, dtype=torch.long, device=device)
    rank[order] = torch.arange(h * w, device=device)
    rank = rank.view(1, 1, h, w)
    _, counts = step_fractions(h, w)

    # Each job: (count of pixels changed, deletion?) -> image where the first
    # ``count`` pixels in saliency order come from ``blurred`` (deletion) or
    # from ``x`` over a blurred background (insertion).
    jobs = [(c, True) for c in counts] + [(c, False) for c in counts]
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 0:
        raise ValueError(f"target must be a non-negative class index, got {target!r}")
    with frozen(classifier.module):
        probs: list[float] = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            limits = torch.tensor([c for c, _ in chunk], device=device).view(-1, 1, 1, 1)
            changed = (rank < limits).to(x.dtype)  # (B, 1, S, S): 1 where the pixel is swapped
            deleting = torch.tensor([d for _, d in chunk], device=device).view(-1, 1, 1, 1)
            first, second = torch.where(deleting, x, blurred), torch.where(deleting, blurred, x)
            batch = first * (1 - changed) + second * changed
            logits = classifier.module(classifier.normalise(batch)).float()
            if target >= logits.shape[1]:
                raise ValueError(f"target must be between 0 and {logits.shape[1] - 1}, got {target}")
            p = torch.softmax(logits, dim=1)[:, int(target)]
            probs.extend(p.tolist())
    n = len(counts)
    fractions = [c / (h * w) for c in counts]
    deletion, insertion = probs[:n], probs[n:]
    return FaithfulnessScores(
        deletion_auc=auc(fractions, deletion),
        insertion_auc=auc(fractions, insertion),
        curves={"fraction": fractions, "deletion": deletion, "insertion": insertion},
        seconds=time.perf_counter() - started,
        target=int(target),
    )
