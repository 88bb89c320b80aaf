"""What a job costs, estimated before it runs: admission control.

Pure Python (no torch, no numpy): the web checks every submission with
:func:`check` before anything is stored, and the worker checks again before
it starts (its limits may differ from the web's).

The model (constants measured by ``benchmarks/cost_model.py``, see
``benchmarks/RESULTS.md``):

* **memory** = ``items * bytes_per_pixel * input_size**2`` (the activations
  kept for the backward pass of every mask the job optimises at once; all
  targets of a job join the batch together, an extremal job optimises one
  mask per area) ``+ width * height * IMAGE_BYTES_PER_PIXEL`` (the decoded
  image and its float copies) ``+ overhead_bytes``;
* **work** = ``targets * iterations * areas`` mask-iterations (``areas`` = 1
  for Meaningful Perturbation), the unit of ``EBB_MAX_JOB_WORK``;
* **seconds** = ``iterations * (step_overhead_s + items * input_size**2 /
  1e6 * seconds_per_mpix_iter)`` on the measured CPU (a GPU is faster: the estimate
  is only used for the job's time budget, :func:`timeout_for`).

where ``items = targets * areas``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Cost",
    "ModelCost",
    "MODEL_COSTS",
    "TooExpensive",
    "check",
    "estimate",
    "format_bytes",
    "item_memory",
    "parse_bytes",
    "timeout_for",
]

#: Bytes per decoded image pixel a job holds besides the optimisation: the
#: uint8 RGB image (3), a float32 copy (12), the saliency map at that size (4)
#: and rendering buffers (capped by ``EBB_MAX_ARTIFACT_SIDE``), rounded up.
IMAGE_BYTES_PER_PIXEL = 24
#: Shortest time budget a job gets with ``EBB_JOB_TIMEOUT=auto`` (seconds).
MIN_TIMEOUT_S = 600.0
#: With ``EBB_JOB_TIMEOUT=auto`` a job may run this many times its estimate.
TIMEOUT_FACTOR = 10.0
#: Reference values the message compares a field with (the defaults).
_REFERENCE = {"input_size": 224, "iterations": 500}


@dataclass(frozen=True)
class ModelCost:
    """Measured costs of one model, per mask optimised in the batch.

    Attributes:
        bytes_per_pixel: peak memory per input pixel (``input_size**2``) per
            Meaningful Perturbation mask, forward + backward, float32.
        extremal_bytes_per_pixel: the same per extremal area (its blur
            pyramid and smooth-max mask cost more).
        seconds_per_mpix_iter: seconds per megapixel of input per mask per
            Adam step on the reference CPU (2 cores), Meaningful Perturbation.
        extremal_seconds_per_mpix_iter: the same per extremal area.
        step_overhead_s: fixed seconds per step (whatever the batch).
        overhead_bytes: fixed memory per job (allocator, scoring batches).
    """

    bytes_per_pixel: float
    extremal_bytes_per_pixel: float
    seconds_per_mpix_iter: float
    extremal_seconds_per_mpix_iter: float
    step_overhead_s: float
    overhead_bytes: int = 128 * 2**20

    def per_pixel(self, method: str) -> float:
        return self.extremal_bytes_per_pixel if method == "extremal" else self.bytes_per_pixel

    def per_mpix_iter(self, method: str) -> float:
        return self.extremal_seconds_per_mpix_iter if method == "extremal" else self.seconds_per_mpix_iter


#: Per-model costs: ``benchmarks/cost_model.py`` on the 2-core CPU of
#: ``benchmarks/RESULTS.md``, fitted (fixed + per pixel) and rounded up by
#: about 20%. Models not listed use :data:`DEFAULT_COST` (VGG19's, the most
#: expensive model measured).
MODEL_COSTS: dict[str, ModelCost] = {
    "efficientnet_lite0": ModelCost(bytes_per_pixel=2400.0, extremal_bytes_per_pixel=3400.0,
                                    seconds_per_mpix_iter=1.2, extremal_seconds_per_mpix_iter=3.2,
                                    step_overhead_s=0.15),
    "vgg19": ModelCost(bytes_per_pixel=2800.0, extremal_bytes_per_pixel=3400.0,
                       seconds_per_mpix_iter=8.0, extremal_seconds_per_mpix_iter=8.0,
                       step_overhead_s=0.6),
}
DEFAULT_COST = MODEL_COSTS["vgg19"]


@dataclass(frozen=True)
class Cost:
    """A job's estimated cost.

    Attributes:
        memory_bytes: peak memory of the job on the worker (bytes).
        work: mask-iterations (targets x iterations x areas).
        seconds: time on the reference CPU.
        items: masks optimised at once (targets x areas).
    """

    memory_bytes: int
    work: int
    seconds: float
    items: int = 1


class TooExpensive(ValueError):
    """A job over a limit. ``field`` names the setting to lower."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _get(config: Any, name: str) -> Any:
    return config[name] if isinstance(config, dict) else getattr(config, name)


def _areas(config: Any) -> int:
    if _get(config, "method") != "extremal":
        return 1
    return max(1, len(tuple(_get(config, "areas") or ())))


def model_cost(model: str) -> ModelCost:
    """The costs of ``model`` (:data:`DEFAULT_COST` for a model not measured)."""
    return MODEL_COSTS.get(model, DEFAULT_COST)


def item_memory(model: str, input_size: int, method: str = "meaningful_perturbation") -> int:
    """Memory (bytes) of one mask of ``method`` in a batch at ``input_size``:
    what the worker's engine adds up before it admits a job to its batch."""
    return int(math.ceil(model_cost(model).per_pixel(method) * int(input_size) ** 2))


def estimate(config: Any, model: str, width: int, height: int, n_targets: int = 1) -> Cost:
    """The cost of explaining ``n_targets`` classes of a ``width`` x ``height``
    image with ``config`` (a ``PerturbationConfig`` or its dict) on ``model``."""
    costs = model_cost(model)
    targets = max(1, int(n_targets))
    areas = _areas(config)
    items = targets * areas
    size = int(_get(config, "input_size"))
    iterations = int(_get(config, "iterations"))
    method = str(_get(config, "method"))
    memory = (items * item_memory(model, size, method)
              + int(width) * int(height) * IMAGE_BYTES_PER_PIXEL + costs.overhead_bytes)
    seconds = iterations * (costs.step_overhead_s
                            + items * size * size / 1e6 * costs.per_mpix_iter(method))
    return Cost(memory_bytes=int(memory), work=targets * iterations * areas, seconds=float(seconds),
                items=items)


def _to_lower(config: Any, n_targets: int, targets_field: str, *, memory: bool) -> str:
    """The field whose value is furthest above its reference."""
    ratios = {
        targets_field: max(1, int(n_targets)),
        "areas": _areas(config),
    }
    if memory:
        ratios["input_size"] = (int(_get(config, "input_size")) / _REFERENCE["input_size"]) ** 2
    else:
        ratios["iterations"] = int(_get(config, "iterations")) / _REFERENCE["iterations"]
    first = "input_size" if memory else "iterations"
    return max([first, "areas", targets_field], key=lambda k: ratios[k])


def format_bytes(n: float) -> str:
    """``4294967296`` -> ``"4 GiB"`` (one decimal when needed)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}".replace(".0 ", " ")
        value /= 1024
    return f"{value} TiB"  # pragma: no cover


def check(cost: Cost, config: Any, *, max_memory: int | None, max_work: int | None,
          n_targets: int = 1, targets_field: str = "top_k", width: int | None = None,
          height: int | None = None) -> None:
    """Raise :class:`TooExpensive` when ``cost`` is over a limit (None: no limit).

    The memory limit is checked first. ``field`` names what to lower: the
    image (``image``) when its pixels alone take half the limit, else the one
    of ``input_size`` / ``iterations``, ``areas`` and ``targets_field``
    (``top_k`` or ``targets``) furthest above its reference value.
    """
    if max_memory is not None and cost.memory_bytes > max_memory:
        image_bytes = (width or 0) * (height or 0) * IMAGE_BYTES_PER_PIXEL
        field = ("image" if image_bytes > max_memory / 2
                 else _to_lower(config, n_targets, targets_field, memory=True))
        raise TooExpensive(field, (
            f"this job needs about {format_bytes(cost.memory_bytes)} of memory, over the limit of "
            f"{format_bytes(max_memory)} (EBB_MAX_JOB_MEMORY); lower {field}"
            + _value_hint(config, field, n_targets)))
    if max_work is not None and cost.work > max_work:
        field = _to_lower(config, n_targets, targets_field, memory=False)
        raise TooExpensive(field, (
            f"this job needs {cost.work} mask-iterations (targets x iterations x areas), over the "
            f"limit of {max_work} (EBB_MAX_JOB_WORK); lower {field}"
            + _value_hint(config, field, n_targets)))


def _value_hint(config: Any, field: str, n_targets: int) -> str:
    if field in ("input_size", "iterations"):
        return f" (now {int(_get(config, field))})"
    if field == "areas":
        return f" (now {_areas(config)} areas)"
    if field in ("top_k", "targets"):
        return f" (now {int(n_targets)} targets)"
    return " (a smaller image)"


def timeout_for(cost: Cost, setting: float | None = None) -> float:
    """A job's time budget in seconds: ``setting`` (``EBB_JOB_TIMEOUT`` as a
    number) when given, else ``max(600, 10 x cost.seconds)``."""
    if setting is not None:
        return float(setting)
    return max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * float(cost.seconds))


_BYTES_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "ki": 2**10, "kib": 2**10, "mi": 2**20,
          "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"4GiB"`` -> 4294967296, ``"512MB"`` -> 512000000, ``"1000"`` -> 1000
    (binary ``KiB``/``MiB``/``GiB``/``TiB``, decimal ``kB``/``MB``/``GB``/``TB``,
    case-insensitive). Raises ValueError for anything else or a value < 1."""
    if isinstance(text, bool):
        raise ValueError(f"not a size in bytes: {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _BYTES_RE.match(str(text))
        if not match:
            raise ValueError(f"not a size in bytes: {str(text)[:40]!r} (e.g. 4GiB, 512MiB)")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < 1:
        raise ValueError(f"a size in bytes must be positive, got {text!r}")
    return value
