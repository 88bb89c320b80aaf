"""Extremal perturbations (Fong, Patrick & Vedaldi, ICCV 2019), written from the paper.

For one image, one class and a target area ``a``, find the mask ``m`` of area
``a`` that best keeps the class (the *preservation* game)::

    maximise_m  score(f(Φ(x; m)))   subject to  area(m) = a

relaxed to minimising ``-score + λ_t * R_a(m)`` with Adam, where:

* the mask is *smooth by construction* (:func:`smooth_mask`): low-resolution
  parameters ``m̄`` in [0, 1] on a grid (32×32 at 224) are spread with a
  Gaussian kernel ``k(u - v) = exp(-|u - v|² / 2σ²)`` and combined by a
  *smooth max* over the grid points near each pixel,
  ``m(u) = smax_v k(u - v) m̄(v)``, so a mask is a union of blobs no sharper
  than the kernel and its values stay in [0, 1];
* the perturbation is the *blur pyramid* (:func:`blur_pyramid`,
  :func:`pyramid_perturbation`): a stack of copies of the image blurred with
  increasing σ (level 0 is the image itself); each pixel takes the level
  ``(1 - m(u)) * (L - 1)`` (interpolating linearly between levels), so a
  kept pixel is sharp and a removed one blurred with ``max_blur``;
* the area constraint is the *ranking* loss (:func:`area_loss`):
  ``R_a(m) = mean((sort(m) - r_a)²)`` where ``r_a`` is the sorted step vector
  with a fraction ``a`` of ones; it asks for exactly ``a`` of the pixels at 1
  and the rest at 0, whichever they are;
* its weight ``λ_t`` grows geometrically from ``reg_start`` to ``reg_end``
  over the iterations (:func:`regulariser_weight`), so the class score shapes
  the mask first and the area is enforced by the end.

One mask per area; all areas are optimised together, one batch per step.
The ``deletion`` game is the dual: ``m = 1`` marks the region removed, the
score is minimised. In both games :attr:`ExtremalResult.mask` is high on the
region that matters. torch and numpy only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .classifier import Classifier
from .config import PerturbationConfig
from .perturbation import Explanation, OnStep, _top5, frozen, gaussian_blur, null_progress, prepare_image

__all__ = [
    "ExtremalExplanation",
    "ExtremalOptimisation",
    "ExtremalResult",
    "to_explanation",
    "area_loss",
    "blur_pyramid",
    "extremal",
    "extremal_step_batch",
    "pyramid_perturbation",
    "regulariser_weight",
    "smooth_mask",
    "smooth_max",
]

GAMES = ("preservation", "deletion")
SCORES = ("logit", "probability")
HISTORY_KEYS = ("total", "score", "area_loss", "lambda")


# --------------------------------------------------------------------------- steps


def smooth_max(z: torch.Tensor, dim: int, temperature: float) -> torch.Tensor:
    """``smax_T(z) = Σ z_i e^{z_i/T} / Σ e^{z_i/T}`` along ``dim``.

    Between the mean (``T → ∞``) and the max (``T → 0``) of ``z``; unlike the
    max, every element receives some gradient.
    """
    return (torch.softmax(z / temperature, dim=dim) * z).sum(dim=dim)


def _smax_conv(params: torch.Tensor, factor: int, sigma: float, temperature: float) -> torch.Tensor:
    """``(N, 1, h, w)`` -> ``(N, 1, h*factor, w*factor)``: the smooth max-convolution.

    Output pixel ``i`` lies at ``(i + 0.5) / factor - 0.5`` in grid units;
    grid points within ``ceil(2σ)`` cells take part (zero beyond the border).
    """
    n, _, h, w = params.shape
    radius = max(1, math.ceil(2 * sigma))
    size = 2 * radius + 1
    windows = F.unfold(params, size, padding=radius)  # (N, K², h*w): neighbours b + d
    d = torch.arange(-radius, radius + 1, dtype=params.dtype, device=params.device)
    phase = (torch.arange(factor, dtype=params.dtype, device=params.device) + 0.5) / factor - 0.5
    offset = phase[:, None] - d[None, :]  # (f, K): distance from a phase to each neighbour
    g = torch.exp(-(offset**2) / (2 * sigma**2))  # (f, K)
    kernel = (g[:, None, :, None] * g[None, :, None, :]).reshape(factor, factor, size * size)  # (fy, fx, K²)
    z = windows[:, None, None] * kernel[None, :, :, :, None]  # (N, fy, fx, K², h*w)
    out = smooth_max(z, dim=3, temperature=temperature)  # (N, fy, fx, h*w)
    out = out.reshape(n, factor, factor, h, w).permute(0, 3, 1, 4, 2)  # (N, h, fy, w, fx)
    return out.reshape(n, 1, h * factor, w * factor)


def smooth_mask(
    params: torch.Tensor, size: int, sigma: float = 3.0, temperature: float = 0.05, factor: int | None = None
) -> torch.Tensor:
    """The smooth mask of the parameters, at the input resolution.

    Smooth max-convolution on a grid ``factor`` times finer than the
    parameters, divided by the response to all-ones parameters (so that
    ``m̄ ≡ 1`` gives ``m ≡ 1`` despite the gaps between grid points), clamped
    to [0, 1] and upsampled bilinearly to ``size``.

    Args:
        params: ``(N, 1, h, w)`` in [0, 1].
        size: output side ``S``.
        sigma: kernel std in grid cells (3 at 32×32 parameters = 21 px at 224).
        temperature: of the smooth max (mask units; small = close to max).
        factor: intermediate upsampling; default ``ceil(S / 2h)``.
    Returns:
        ``(N, 1, S, S)`` in [0, 1].
    """
    h = params.shape[-2]
    factor = factor or max(1, math.ceil(size / (2 * h)))
    raw = _smax_conv(params, factor, sigma, temperature)
    with torch.no_grad():
        ones = torch.ones(1, 1, *params.shape[-2:], dtype=params.dtype, device=params.device)
        norm = _smax_conv(ones, factor, sigma, temperature)
    mask = (raw / norm).clamp(0, 1)
    if mask.shape[-1] != size or mask.shape[-2] != size:
        mask = F.interpolate(mask, size=(size, size), mode="bilinear", align_corners=False)
    return mask


def blur_pyramid(image: torch.Tensor, max_blur: float, levels: int = 8) -> torch.Tensor:
    """Copies of ``image`` blurred with σ = ``max_blur * l / (levels - 1)``.

    Args:
        image: ``(N, 3, H, W)``.
        max_blur: σ of the last level, in pixels.
        levels: number of levels ``L`` (level 0 is ``image`` itself).
    Returns:
        ``(N, L, 3, H, W)``.
    """
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    out = [image]
    limit = min(image.shape[-2:]) - 1  # reflect padding must stay inside the image
    for level in range(1, levels):
        sigma = max_blur * level / (levels - 1)
        pad = max(1, min(math.ceil(3 * sigma), limit))
        out.append(gaussian_blur(image, 2 * pad + 1, sigma) if sigma > 0 else image)
    return torch.stack(out, dim=1)


def pyramid_perturbation(pyramid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pick each pixel's blur level from the mask: 1 -> level 0 (sharp), 0 -> last level.

    Args:
        pyramid: ``(1 or N, L, 3, H, W)`` from :func:`blur_pyramid`.
        mask: ``(N, 1, H, W)`` in [0, 1].
    Returns:
        ``(N, 3, H, W)``: ``Σ_l max(0, 1 - |t - l|) * pyramid[l]`` with
        ``t = (1 - m) * (L - 1)`` (linear interpolation between levels).
    """
    levels = pyramid.shape[1]
    t = (1 - mask) * (levels - 1)  # (N, 1, H, W)
    index = torch.arange(levels, dtype=mask.dtype, device=mask.device).view(1, levels, 1, 1, 1)
    weights = (1 - (t[:, None] - index).abs()).clamp(min=0)  # (N, L, 1, H, W)
    return (weights * pyramid).sum(dim=1)


def area_loss(mask: torch.Tensor, area: torch.Tensor | float) -> torch.Tensor:
    """The ranking area loss ``mean((sort(m) - r_a)²)`` per sample.

    Args:
        mask: ``(N, 1, H, W)`` in [0, 1].
        area: fraction in (0, 1), a float or an ``(N,)`` tensor.
    Returns:
        ``(N,)`` in [0, 1]; 0 iff a fraction ``a`` (rounded to pixels) of the
        mask is 1 and the rest 0.
    """
    flat = mask.flatten(1)
    n = flat.shape[1]
    area = torch.as_tensor(area, dtype=flat.dtype, device=flat.device).reshape(-1, 1)
    ones = torch.round(area * n)  # (N or 1, 1): how many ones
    position = torch.arange(n, dtype=flat.dtype, device=flat.device)[None]
    reference = (position >= n - ones).to(flat.dtype)  # ascending step vector
    return ((flat.sort(dim=1).values - reference) ** 2).mean(dim=1)


def regulariser_weight(iteration: int, iterations: int, start: float, end: float) -> float:
    """Geometric schedule: ``start`` at iteration 0, ``end`` at the last one."""
    if iterations <= 1:
        return float(end)
    return float(start * (end / start) ** (iteration / (iterations - 1)))


# --------------------------------------------------------------------------- result


@dataclass
class ExtremalResult:
    """One extremal mask.

    Attributes:
        area: the requested area fraction.
        mask: ``(S, S)`` float32 in [0, 1]; high on the region that matters
            (kept in the preservation game, removed in the deletion game).
        params: ``(h, w)`` float32 in [0, 1], the low-resolution parameters.
        perturbed: ``(S, S, 3)`` uint8 RGB, the final perturbed input.
        target, label: the explained class.
        score_before: target probability on the input, in [0, 1].
        score_after: target probability on the perturbed input, in [0, 1].
        logit_after: target logit on the perturbed input.
        area_achieved: ``mean(mask)``, in [0, 1].
        game: ``preservation`` or ``deletion``.
        history: per iteration ``total``, ``score`` (the reward's value),
            ``area_loss`` and ``lambda``.
        elapsed_s: wall time of the whole run (all areas together).
        iterations_run: steps taken.
        cancelled: the progress callback stopped the run.
        settings: the options used.
    """

    area: float
    mask: np.ndarray
    params: np.ndarray
    perturbed: np.ndarray
    target: int
    label: str
    score_before: float
    score_after: float
    logit_after: float
    area_achieved: float
    game: str
    history: dict[str, list[float]]
    elapsed_s: float
    iterations_run: int
    cancelled: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    #: ``[{"index", "label", "prob"}, ...]`` on the input and on this area's perturbation.
    top5_before: list[dict[str, Any]] = field(default_factory=list)
    top5_after: list[dict[str, Any]] = field(default_factory=list)

    @property
    def saliency(self) -> np.ndarray:
        """``(S, S)`` float32 in [0, 1], high = important (the mask itself)."""
        return self.mask

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe summary (no arrays except the loss history)."""
        return {
            "method": "extremal",
            "area": self.area,
            "target": {"index": self.target, "label": self.label},
            "scores": {"before": self.score_before, "after": self.score_after, "logit_after": self.logit_after},
            "area_achieved": self.area_achieved,
            "game": self.game,
            "iterations_run": self.iterations_run,
            "cancelled": self.cancelled,
            "elapsed_s": self.elapsed_s,
            "settings": dict(self.settings),
            "history": self.history,
        }


# --------------------------------------------------------------------------- driver


def _check(name: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value!r}")


def _forward(classifier: Classifier, x: torch.Tensor) -> torch.Tensor:
    return classifier.module(classifier.normalise(x)).float()


class _Losses(Mapping):
    """One step's losses (means over areas) plus ``live_score``: the target's
    probability on the largest area's mask at this step (no noise is added in
    extremal perturbations, so this is the noise-free score). Attributes
    ``target``, ``label`` and ``score_before`` describe the run."""

    def __init__(self, values: dict[str, float], target: int | None = None, label: str | None = None,
                 score_before: float | None = None):
        self._values = values
        self.target, self.label, self.score_before = target, label, score_before

    def __getitem__(self, key: str) -> float:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def extremal(
    model: Classifier | nn.Module,
    image: Any,
    target: int | None = None,
    areas: Sequence[float] = (0.05, 0.1, 0.2),
    *,
    iterations: int = 300,
    learning_rate: float = 0.1,
    param_size: int = 32,
    input_size: int = 224,
    sigma: float = 3.0,
    temperature: float = 0.05,
    max_blur: float | None = None,
    levels: int = 8,
    reg_start: float = 1.0,
    reg_end: float = 500.0,
    game: str = "preservation",
    score: str = "logit",
    on_step: OnStep | None = None,
) -> list[ExtremalResult]:
    """Extremal perturbation masks of ``model`` for ``target``, one per area.

    Args:
        model: a :class:`Classifier` or a bare module (ImageNet normalisation);
            run in eval mode with frozen parameters, both restored on exit.
        image: ``(H, W, 3)`` uint8 RGB array or a float tensor in [0, 1].
        target: class index; ``None`` explains the top-1 class.
        areas: fractions of the image in (0, 1), one mask each.
        iterations: Adam steps (1-10000).
        learning_rate: Adam learning rate on the parameters.
        param_size: side of the parameter grid (4 to ``input_size``; 32 is
            one parameter per 7 pixels at 224).
        input_size: side of the square model input.
        sigma: smoothing kernel std in grid cells (0.5-10; 3 cells = 21 px
            at 224, the smallest blob the mask can draw).
        temperature: smooth-max temperature (0.001-1).
        max_blur: σ in pixels of the most blurred pyramid level; default
            ``20 * input_size / 224``.
        levels: pyramid levels (2-32).
        reg_start, reg_end: area-loss weight at the first and last iteration
            (geometric in between).
        game: ``preservation`` (keep the class with area ``a``) or ``deletion``
            (destroy it by removing area ``a``).
        score: the reward: the target ``logit`` (default, as the paper's
            network output) or its softmax ``probability``.
        on_step: ``on_step(iteration, total, losses) -> bool | None`` with
            ``losses`` (means over areas) ``total``, ``score``, ``area_loss``,
            ``lambda``; returning ``True`` stops after the current step.
    Returns:
        One :class:`ExtremalResult` per area, in the order given.
    """
    run = ExtremalOptimisation.create(
        model, image, target, areas, iterations=iterations, learning_rate=learning_rate,
        param_size=param_size, input_size=input_size, sigma=sigma, temperature=temperature,
        max_blur=max_blur, levels=levels, reg_start=reg_start, reg_end=reg_end, game=game,
        score=score, on_step=on_step,
    )
    while not run.done:
        run.step(model)
    return run.result(model)


class ExtremalOptimisation:
    """The state of one extremal run (all its areas): parameters, Adam, history.

    Create with :meth:`create`, advance with :meth:`step` until :attr:`done`,
    then read :meth:`result`; :func:`extremal` does all three. A worker can
    interleave the steps of this run with other work on the same model (each
    step leaves the model's flags as it found them).
    """

    def __init__(self) -> None:  # use create()
        self.params: torch.Tensor
        self.optimizer: torch.optim.Optimizer

    @classmethod
    def create(
        cls,
        model: Classifier | nn.Module,
        image: Any,
        target: int | None = None,
        areas: Sequence[float] = (0.05, 0.1, 0.2),
        *,
        iterations: int = 300,
        learning_rate: float = 0.1,
        param_size: int = 32,
        input_size: int = 224,
        sigma: float = 3.0,
        temperature: float = 0.05,
        max_blur: float | None = None,
        levels: int = 8,
        reg_start: float = 1.0,
        reg_end: float = 500.0,
        game: str = "preservation",
        score: str = "logit",
        on_step: OnStep | None = None,
    ) -> "ExtremalOptimisation":
        """Validate the options, build the blur pyramid, score the clean image
        and pick the target (see :func:`extremal` for the arguments)."""
        started = time.perf_counter()
        areas = [areas] if isinstance(areas, (int, float)) else list(areas)
        if not areas:
            raise ValueError("areas must list at least one area fraction")
        for a in areas:
            if isinstance(a, bool) or not isinstance(a, (int, float, np.floating)) or not 0 < a < 1:
                raise ValueError(f"areas must be fractions strictly between 0 and 1, got {a!r}")
        _check("iterations", iterations, 1, 10_000, integer=True)
        _check("learning_rate", learning_rate, 1e-6, 10.0)
        _check("input_size", input_size, 16, 1024, integer=True)
        _check("param_size", param_size, 4, input_size, integer=True)
        _check("sigma", sigma, 0.5, 10.0)
        _check("temperature", temperature, 1e-3, 1.0)
        _check("levels", levels, 2, 32, integer=True)
        _check("reg_start", reg_start, 1e-6, 1e6)
        _check("reg_end", reg_end, 1e-6, 1e6)
        if max_blur is None:
            max_blur = 20.0 * input_size / 224
        _check("max_blur", max_blur, 0.1, 1000.0)
        if game not in GAMES:
            raise ValueError(f"game must be one of {', '.join(GAMES)}, got {game!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")

        self = cls()
        self.started = started
        self.iterations, self.param_size = int(iterations), int(param_size)
        self.input_size, self.levels = int(input_size), int(levels)
        self.sigma, self.temperature = float(sigma), float(temperature)
        self.reg_start, self.reg_end = float(reg_start), float(reg_end)
        self.game, self.score = game, score
        self.areas = [float(a) for a in areas]
        self.on_step = on_step or null_progress
        #: The job settings it was made from (:meth:`from_config`), else None.
        self.config: PerturbationConfig | None = None
        self.settings = dict(
            iterations=self.iterations, learning_rate=learning_rate, param_size=self.param_size,
            input_size=self.input_size, sigma=sigma, temperature=temperature, max_blur=float(max_blur),
            levels=self.levels, reg_start=reg_start, reg_end=reg_end, game=game, score=score,
        )
        classifier = Classifier.wrap(model)
        self.device = device = classifier.device
        x = prepare_image(image, self.input_size, device)  # (1, 3, S, S)
        n = len(self.areas)
        self.area_t = torch.tensor(self.areas, dtype=torch.float32, device=device)
        with frozen(classifier.module), torch.no_grad():
            self.pyramid = blur_pyramid(x, float(max_blur), self.levels)  # (1, L, 3, S, S)
            self.probs = torch.softmax(_forward(classifier, x), dim=1)[0]
        if target is None:
            target = int(self.probs.argmax())
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise ValueError(f"target must be a class index (int) or None, got {target!r}")
        if not 0 <= int(target) < self.probs.numel():
            raise ValueError(f"target must be between 0 and {self.probs.numel() - 1}, got {target}")
        self.target = int(target)
        self.label = classifier.label(self.target)
        self.params = torch.full((n, 1, self.param_size, self.param_size), 0.5, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.params], lr=learning_rate)
        self.history = torch.zeros(self.iterations, n, len(HISTORY_KEYS), device=device)
        self.iteration = 0
        self.cancelled = False
        return self

    @classmethod
    def from_config(
        cls,
        model: Classifier | nn.Module,
        image: Any,
        target: int | None,
        config: PerturbationConfig,
        on_step: OnStep | None = None,
    ) -> "ExtremalOptimisation":
        """A run with a job's settings: ``areas``, ``iterations``,
        ``learning_rate``, ``mask_size`` (the parameter grid), ``input_size``
        and ``game``; the paper's defaults for the rest."""
        if not isinstance(config, PerturbationConfig):
            raise ValueError(f"config must be a PerturbationConfig, got {type(config).__name__}")
        run = cls.create(
            model, image, target, config.areas, iterations=config.iterations,
            learning_rate=config.learning_rate, param_size=config.mask_size,
            input_size=config.input_size, game=config.game, on_step=on_step,
        )
        run.config = config
        return run

    @property
    def done(self) -> bool:
        return self.cancelled or self.iteration >= self.iterations

    def perturb(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, perturbed)``: ``(N, 1, S, S)`` in [0, 1] and ``(N, 3, S, S)`` in [0, 1]."""
        mask = smooth_mask(params, self.input_size, self.sigma, self.temperature)
        kept = mask if self.game == "preservation" else 1 - mask
        return mask, pyramid_perturbation(self.pyramid, kept)

    def reward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.score == "logit":
            return logits[:, self.target]
        return torch.softmax(logits, dim=1)[:, self.target]

    def step(self, model: Classifier | nn.Module) -> None:
        """One Adam step on every area's parameters (one forward/backward batch)."""
        extremal_step_batch(model, [self])

    def losses(self, mask: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(total, reward, area_loss, lambda)`` of this step, each ``(N,)``
        (one per area), from the masks and the model's logits on their perturbations."""
        sign = 1.0 if self.game == "preservation" else -1.0  # maximise (preserve) or minimise (delete)
        lam = regulariser_weight(self.iteration, self.iterations, self.reg_start, self.reg_end)
        r = self.reward(logits)
        largest = max(range(len(self.areas)), key=lambda i: self.areas[i])
        self._live_prob = torch.softmax(logits.detach()[largest], dim=0)[self.target]
        reg = area_loss(mask, self.area_t)
        return -sign * r + lam * reg, r, reg, torch.full_like(reg, lam)

    def finish_step(self, total: torch.Tensor, r: torch.Tensor, reg: torch.Tensor, lam: torch.Tensor) -> None:
        """Adam step, clamp, record the losses, report progress."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.params.clamp_(0, 1)
            row = torch.stack([total.detach(), r.detach(), reg.detach(), lam], dim=1)
            self.history[self.iteration] = row
        self.iteration += 1
        values = dict(zip(HISTORY_KEYS, row.mean(0).tolist()))
        live = getattr(self, "_live_prob", None)
        if live is not None:
            values["live_score"] = float(live)
        losses = _Losses(values, self.target, self.label, float(self.probs[self.target]))
        if self.on_step(self.iteration, self.iterations, losses):
            self.cancelled = True

    @torch.no_grad()
    def result(self, model: Classifier | nn.Module) -> list[ExtremalResult]:
        """Score the final masks and package one :class:`ExtremalResult` per area."""
        classifier = Classifier.wrap(model)
        with frozen(classifier.module):
            mask, xp = self.perturb(self.params)
            logits = _forward(classifier, xp)
            probs_after = torch.softmax(logits, dim=1)
            after = probs_after[:, self.target]
        top5_before = _top5(self.probs, classifier)
        elapsed = time.perf_counter() - self.started
        done = self.iteration
        hist = self.history[:done].permute(1, 2, 0).tolist()  # (N, keys, T)
        perturbed = (xp.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().cpu().numpy()
        results = []
        for i, a in enumerate(self.areas):
            m = mask[i, 0].float().cpu().numpy()
            results.append(
                ExtremalResult(
                    area=a,
                    mask=m,
                    params=self.params[i, 0].detach().float().cpu().numpy(),
                    perturbed=perturbed[i],
                    target=self.target,
                    label=self.label,
                    score_before=float(self.probs[self.target]),
                    score_after=float(after[i]),
                    logit_after=float(logits[i, self.target]),
                    area_achieved=float(m.mean()),
                    game=self.game,
                    history={k: hist[i][j] for j, k in enumerate(HISTORY_KEYS)},
                    elapsed_s=elapsed,
                    iterations_run=done,
                    cancelled=self.cancelled,
                    settings=dict(self.settings),
                    top5_before=top5_before,
                    top5_after=_top5(probs_after[i], classifier),
                )
            )
        return results


def extremal_step_batch(model: Classifier | nn.Module, runs: Sequence[ExtremalOptimisation]) -> None:
    """Advance every unfinished run by one step in one forward/backward batch.

    Runs (of different images, targets, areas, games or settings) must share
    ``input_size``. Each keeps its own parameters, Adam state and schedule,
    so each comes out as when run alone (within float tolerance: the model
    is in eval mode, so no image in the batch affects another). One caveat:
    while a run's parameters are still near-tied (its first steps, more so
    with the small gradients of the ``probability`` reward), the ranking area
    loss may turn float-level differences of a bigger batch into a different
    pick among the tied pixels, as any change of arithmetic order would; the
    scores stay equal (seen: one 5% mask 0.12 apart after 8 steps, score
    within 4e-5).
    """
    active = [r for r in runs if not r.done]
    if not active:
        return
    sizes = {r.input_size for r in active}
    if len(sizes) != 1:
        raise ValueError(f"runs in one batch must share input_size, got {sorted(sizes)}")
    classifier = Classifier.wrap(model)
    with frozen(classifier.module), torch.enable_grad():
        parts = [r.perturb(r.params) for r in active]  # (mask (N, 1, S, S), perturbed (N, 3, S, S))
        logits = _forward(classifier, torch.cat([xp for _, xp in parts]))
        rows, totals, start = [], [], 0
        for run, (mask, xp) in zip(active, parts):
            losses = run.losses(mask, logits[start:start + xp.shape[0]])
            start += xp.shape[0]
            rows.append(losses)
            totals.append(losses[0].sum())
        torch.stack(totals).sum().backward()
    for run, losses in zip(active, rows):
        run.finish_step(*losses)


# --------------------------------------------------------------------------- as a job result


@dataclass
class ExtremalExplanation(Explanation):
    """An extremal run packaged like a Meaningful Perturbation :class:`Explanation`.

    ``mask`` and ``mask_upsampled`` are the mean of the area masks (``(S, S)``,
    high = important, as :attr:`saliency`); ``perturbed``, ``score_after`` and
    ``top5_after`` are those of the largest area; :attr:`areas` keeps every
    area's result.
    """

    areas: list[ExtremalResult] = field(default_factory=list)

    @property
    def saliency(self) -> np.ndarray:
        """``(S, S)`` float32 in [0, 1], high = important: the mean area mask."""
        return self.mask_upsampled.copy()

    @property
    def area_masks(self) -> list[np.ndarray]:
        """One ``(S, S)`` float32 mask in [0, 1] per area, in the order asked."""
        return [r.mask for r in self.areas]

    def area_summary(self) -> list[dict[str, float]]:
        """``[{"area", "area_achieved", "score_after"}, ...]``, one per area."""
        return [{"area": r.area, "area_achieved": r.area_achieved, "score_after": r.score_after}
                for r in self.areas]

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["method"] = "extremal"
        data["areas"] = self.area_summary()
        return data


def to_explanation(results: Sequence[ExtremalResult], config: PerturbationConfig,
                   model: str = "model") -> ExtremalExplanation:
    """Package the results of one extremal run (all its areas) as one explanation."""
    if not results:
        raise ValueError("results must hold at least one ExtremalResult")
    largest = max(results, key=lambda r: r.area)
    mean = np.mean([r.mask for r in results], axis=0).astype(np.float32)
    history = {k: [float(np.mean(v)) for v in zip(*(r.history[k] for r in results))] for k in HISTORY_KEYS}
    first = results[0]
    return ExtremalExplanation(
        mask=mean,
        mask_upsampled=mean,
        perturbed=largest.perturbed,
        target=first.target,
        label=first.label,
        score_before=first.score_before,
        score_after=largest.score_after,
        top5_before=first.top5_before,
        top5_after=largest.top5_after,
        history=history,
        elapsed_s=first.elapsed_s,
        iterations_run=first.iterations_run,
        cancelled=first.cancelled,
        config=config,
        model=model,
        timings={},
        areas=list(results),
    )
