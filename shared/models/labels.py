"""ImageNet class labels and target-class resolution.

Pure Python on purpose (no torch): the web process imports this module to
validate the "target class" a user types before a job is queued.

``imagenet_classes.txt`` holds the 1000 ImageNet-1k labels, one per line, in
class-index order. It was generated once from torchvision's
``VGG19_Weights.IMAGENET1K_V1.meta["categories"]`` (the same list every
torchvision ImageNet model uses), so index ``i`` of this file is logit ``i`` of
those models and of ``efficientnet_lite0``. All 1000 labels are distinct.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from importlib import resources
from typing import Sequence

__all__ = ["imagenet_labels", "resolve_target"]

_LABELS_FILE = "imagenet_classes.txt"


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index -> label (e.g. 558 -> ``"flute"``).

    Read once from the packaged ``imagenet_classes.txt`` and cached.
    """
    text = resources.files(__package__).joinpath(_LABELS_FILE).read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != 1000:  # a corrupted install, not a user error
        raise RuntimeError(f"{_LABELS_FILE} has {len(labels)} labels, expected 1000")
    return labels


def _normalise(label: str) -> str:
    return " ".join(label.split()).casefold()


#: Longest accepted target text (a class index or a label; the longest
#: ImageNet label has 121 characters).
MAX_TARGET_CHARS = 200


def resolve_target(value: str | int | None, labels: Sequence[str]) -> int | None:
    """Turn a user-supplied target class into a class index.

    Args:
        value: ``None`` or ``""`` (blank) -> ``None``, meaning "explain the
            model's top-1 class"; an ``int`` or a string of digits -> that
            index; any other string -> the index of the label that matches
            exactly, ignoring case and surrounding/repeated whitespace.
        labels: the model's class names, index -> label (e.g.
            :func:`imagenet_labels` or ``Classifier.labels``). Its length is
            the number of classes ``C``.

    Returns:
        An index in ``[0, C)``, or ``None`` for "top-1".

    Raises:
        ValueError: the index is out of range (``"target index 1000 out of
            range 0-999"``), or no label matches (the message names the value
            and suggests close labels).
    """
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int subclass; True is not "class 1"
        raise ValueError(f"target must be a class index or a label, got {value!r}")
    n = len(labels)
    if isinstance(value, int):
        return _check_index(value, n)
    if not isinstance(value, str):
        raise ValueError(f"target must be a class index or a label, got {type(value).__name__}")

    text = value.strip()
    if not text:
        return None
    if len(text) > MAX_TARGET_CHARS:
        # Also keeps Python's int() digit limit (4300) and difflib out of reach.
        raise ValueError(f"target is too long ({len(text)} characters, at most {MAX_TARGET_CHARS}); "
                         f"give a class index 0-{max(0, n - 1)} or an exact label")
    if text.isdigit() or (text[0] in "+-" and text[1:].isdigit()):
        return _check_index(int(text), n)

    wanted = _normalise(text)
    for index, label in enumerate(labels):
        if _normalise(str(label)) == wanted:
            return index

    by_norm = {_normalise(str(label)): str(label) for label in labels}
    close = difflib.get_close_matches(wanted, list(by_norm), n=5, cutoff=0.6)
    # Also offer labels that contain the text ("mastiff" -> "bull mastiff", "Tibetan mastiff").
    contains = [norm for norm in by_norm if wanted in norm and norm not in close]
    suggestions = [by_norm[norm] for norm in (close + contains)[:5]]
    message = f"unknown target label {text!r}"
    if suggestions:
        message += "; did you mean " + ", ".join(repr(s) for s in suggestions) + "?"
    else:
        message += f"; give a class index 0-{n - 1} or an exact label"
    raise ValueError(message)


def _check_index(index: int, n: int) -> int:
    if not 0 <= index < n:
        if n == 0:
            raise ValueError(f"target index {index} out of range: the model has no labelled classes")
        raise ValueError(f"target index {index} out of range 0-{n - 1}")
    return index
