"""Warnings that say why an explanation may be weak, as codes and sentences.

Pure Python on an :class:`~shared.attribution.perturbation.Explanation`
(no torch needed at call time); each warning is ``{"code": str,
"message": str}``, the message saying what was seen and what to try.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["LOW_CONFIDENCE", "MASK_MOVED_MIN", "SMALL_INPUT_RATIO", "explanation_warnings"]

#: ``low_confidence`` below this probability of the target before perturbation.
LOW_CONFIDENCE = 0.1
#: ``mask_unchanged`` when the mean |mask - its start| is below this.
MASK_MOVED_MIN = 0.02
#: ``small_input`` when the image's shorter side is below this fraction of the model's input side.
SMALL_INPUT_RATIO = 0.5


def _warning(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def explanation_warnings(explanation: Any, image_shape: tuple[int, ...] | None = None) -> list[dict[str, str]]:
    """Why ``explanation`` may say little, in a stable order (empty: nothing seen).

    Args:
        explanation: an ``Explanation`` (``score_before``/``score_after`` in
            [0, 1], ``mask`` ``(h, w)`` in [0, 1] where 1 keeps, ``config``).
        image_shape: the original image's ``(H, W, ...)``; ``None`` skips the size check.
    Returns:
        ``[{"code", "message"}, ...]`` with codes ``low_confidence``,
        ``score_not_halved`` (deletion game), ``score_not_raised``
        (preservation game), ``mask_unchanged`` and ``small_input``. The score
        and mask checks apply to Meaningful Perturbation only (extremal masks
        have a fixed area by construction).
    """
    config = explanation.config
    label = explanation.label or f"class {explanation.target}"
    before, after = float(explanation.score_before), float(explanation.score_after)
    out: list[dict[str, str]] = []
    if before < LOW_CONFIDENCE:
        out.append(_warning(
            "low_confidence",
            f"The model gives {label} only {before:.3f} before any perturbation, so there is little "
            f"for a mask to remove: explain a class the model does predict (leave the target blank, "
            f"or use top_k), or check the image."))
    meaningful = getattr(config, "method", "meaningful_perturbation") != "extremal"
    if meaningful and config.game == "deletion" and after > before / 2:
        out.append(_warning(
            "score_not_halved",
            f"Removing the masked region only took {label} from {before:.3f} to {after:.3f} (not "
            f"halved), so the mask did not find what drives the class. Try a lower noise_std, more "
            f"iterations, the preservation game or the extremal method."))
    if meaningful and config.game == "preservation" and after <= before:
        out.append(_warning(
            "score_not_raised",
            f"Keeping only the masked region took {label} from {before:.3f} to {after:.3f} (not "
            f"raised), so the kept region is not enough for the class. Try more iterations, a lower "
            f"l1_coeff or noise_std, or the deletion game."))
    if meaningful:
        start = 1.0 if config.game == "deletion" else 0.5
        moved = float(np.abs(np.asarray(explanation.mask, dtype=np.float64) - start).mean())
        if moved < MASK_MOVED_MIN:
            out.append(_warning(
                "mask_unchanged",
                f"The mask barely moved from its start (mean change {moved:.3f}), so it shows "
                f"nothing. Often the noise alone already drives the score to zero and leaves no "
                f"gradient: lower noise_std, raise iterations or learning_rate, or try the "
                f"{'preservation' if config.game == 'deletion' else 'deletion'} game."))
    if image_shape is not None and len(image_shape) >= 2:
        h, w = int(image_shape[0]), int(image_shape[1])
        size = int(config.input_size)
        if min(h, w) < SMALL_INPUT_RATIO * size:
            out.append(_warning(
                "small_input",
                f"The image is {w}×{h} pixels, much smaller than the model's {size}×{size} input: "
                f"it was enlarged {size / max(1, min(h, w)):.0f}× and the explanation is of a "
                f"blurry enlargement. Upload a larger image."))
    return out
