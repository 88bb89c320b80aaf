"""Hyperparameters of Meaningful Perturbation, validated once.

Pure Python (no torch) so the web front end can validate a job's settings
before queueing it, and store them on the job as JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

BLURS = ("mean", "gaussian", "median")
PRECISIONS = ("fp32", "bf16")
GAMES = ("deletion", "preservation")
PERTURBATIONS = ("blur", "constant", "noise")
#: ``meaningful_perturbation`` (Fong & Vedaldi 2017, the default) or
#: ``extremal`` (Fong, Patrick & Vedaldi 2019).
METHODS = ("meaningful_perturbation", "extremal")
#: At most this many target areas per extremal job.
MAX_AREAS = 5

# field -> (low, high) inclusive; None means unbounded on that side.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "iterations": (1, 10_000),
    "learning_rate": (1e-6, 10.0),
    "mask_size": (4, 224),
    "l1_coeff": (0.0, 100.0),
    "tv_coeff": (0.0, 100.0),
    "tv_beta": (1.0, 10.0),
    "noise_std": (0.0, 10.0),
    "input_size": (32, 1024),
    "seed": (0, 2**63 - 1),
}
_INTS = {"iterations", "mask_size", "input_size", "seed"}


@dataclass(frozen=True)
class PerturbationConfig:
    """Settings of one mask optimisation; defaults follow the reference code.

    Attributes:
        iterations: Adam steps, 1-10000.
        learning_rate: Adam learning rate (reference 0.1).
        mask_size: side of the square low-resolution mask, 4-224 (reference 28).
        l1_coeff: weight of ``mean|1 - mask|`` (sparsity; reference 0.01).
        tv_coeff: weight of the total-variation term (smoothness; reference 0.2).
        tv_beta: exponent of the TV term (reference 3).
        noise_std: std of the Gaussian noise added to the perturbed input on
            every step, in units of ImageNet's per-channel std: pixel-space
            noise of std ``noise_std * (0.229, 0.224, 0.225)`` (RGB in [0, 1])
            whatever the model's normalisation. For an ImageNet-normalised
            model (VGG19, the reference) that is ``noise_std`` in its input
            space, as in the reference (0.2); EfficientNet-Lite0's
            ``(x - 0.5) / 0.5`` gets ``noise_std * 0.458`` (R) in its space.
            0 disables.
        blur: the perturbation's blurred copy: ``mean`` of a Gaussian (11x11,
            sigma 5) and a median (11) blur, as the reference README says, or
            ``gaussian`` / ``median`` alone (``median`` reproduces the
            reference code).
        input_size: side of the square image fed to the model (reference 224).
        seed: seed of the per-step noise; same inputs + seed give the same mask
            (bit-for-bit with the same device, precision and batch layout).
        precision: ``fp32`` (reference) or ``bf16`` autocast for the model's
            forward/backward (faster on CUDA and AVX-512-BF16 CPUs).
        game: ``deletion`` (reference): the smallest region whose removal
            destroys the class, ``l1 * mean|1 - m| + tv * TV + p[target]``, the
            mask starting at 1 (keep all). ``preservation`` (paper, eq. 5): the
            smallest region that alone keeps the class,
            ``l1 * mean|m| + tv * TV - p[target]``, the mask starting at 0.5
            (halfway, so the score term can both grow and shrink the kept
            region from the first step).
        perturbation: what replaces the removed pixels (paper, eq. 3):
            ``blur`` (reference; the blurred copy chosen by ``blur``),
            ``constant`` (the image's mean colour) or ``noise`` (a fixed image of
            i.i.d. Gaussian pixels around the image's mean colour, with the
            image's per-channel std, drawn once from ``seed`` and clipped to
            [0, 1]).
        method: ``meaningful_perturbation`` (default; everything above) or
            ``extremal``: extremal perturbations (2019), one mask per entry of
            ``areas``, with the smooth max-convolution mask (``mask_size``
            parameters a side), the blur-pyramid perturbation and the ranking
            area loss, optimised for ``iterations`` Adam steps at
            ``learning_rate`` on ``input_size`` inputs. ``game`` picks
            preservation (the paper's main game) or deletion; ``l1_coeff``,
            ``tv_coeff``, ``tv_beta``, ``noise_std``, ``blur``, ``perturbation``
            and ``precision`` do not apply to it.
        areas: the extremal target areas, 1-5 fractions strictly between 0
            and 1 (default 5%, 10% and 20% of the image); unused by
            ``meaningful_perturbation``.
    """

    iterations: int = 500
    learning_rate: float = 0.1
    mask_size: int = 28
    l1_coeff: float = 0.01
    tv_coeff: float = 0.2
    tv_beta: float = 3.0
    noise_std: float = 0.2
    blur: str = "mean"
    input_size: int = 224
    seed: int = 0
    precision: str = "fp32"
    game: str = "deletion"
    perturbation: str = "blur"
    method: str = "meaningful_perturbation"
    areas: tuple[float, ...] = (0.05, 0.1, 0.2)

    def __post_init__(self) -> None:
        for name, (low, high) in _RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if name in _INTS and not float(value).is_integer():
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value!r}")
            # Normalise the type so JSON round-trips are exact.
            object.__setattr__(self, name, int(value) if name in _INTS else float(value))
        if self.blur not in BLURS:
            raise ValueError(f"blur must be one of {', '.join(BLURS)}, got {self.blur!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.game not in GAMES:
            raise ValueError(f"game must be one of {', '.join(GAMES)}, got {self.game!r}")
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(
                f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {self.perturbation!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        object.__setattr__(self, "areas", _check_areas(self.areas))
        if self.mask_size > self.input_size:
            raise ValueError(
                f"mask_size must be at most input_size ({self.input_size}), got {self.mask_size}"
            )

    @property
    def is_extremal(self) -> bool:
        return self.method == "extremal"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "PerturbationConfig":
        """Build from a mapping (e.g. stored JSON); unknown keys raise ValueError."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: plain ints, floats and strings; ``areas`` as a list."""
        data = dataclasses.asdict(self)
        data["areas"] = list(self.areas)
        return data

    def replace(self, **changes: Any) -> "PerturbationConfig":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def limits() -> dict[str, tuple[float | None, float | None]]:
        """Allowed inclusive range of each numeric field."""
        return dict(_RANGES)


def _check_areas(areas: Any) -> tuple[float, ...]:
    """``areas`` as a tuple of 1-:data:`MAX_AREAS` distinct floats in (0, 1), in the order given."""
    if isinstance(areas, (int, float)) and not isinstance(areas, bool):
        areas = (areas,)
    if isinstance(areas, (str, bytes)) or not isinstance(areas, (list, tuple)):
        raise ValueError(f"areas must be a list of fractions between 0 and 1, got {areas!r}")
    if not 1 <= len(areas) <= MAX_AREAS:
        raise ValueError(f"areas must list 1 to {MAX_AREAS} fractions, got {len(areas)}")
    out = []
    for a in areas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0 < a < 1:
            raise ValueError(f"areas must be fractions strictly between 0 and 1, got {a!r}")
        out.append(float(a))
    if len(set(out)) != len(out):
        raise ValueError(f"areas must not repeat a value, got {out}")
    return tuple(out)
