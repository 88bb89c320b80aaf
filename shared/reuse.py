"""Identical jobs answered from the store: the reuse key.

A job's result is a function of its inputs (the image's sha256, the model, the
targets asked for, the full config, seed and precision included) and of the
worker settings that change the arithmetic (``EBB_REPRODUCIBLE``,
``EBB_LAYOUT_WIDTH``, ``EBB_WEIGHTS_FILE``: ``Settings.arithmetic``). The web
computes :func:`request_key` from a submission; the worker, when the job
succeeded with the reproducible fixed layout, stores
:func:`reuse_key` of that and of *its own* settings on the row. A later
submission whose key (request + the web's settings) equals it is answered from
that job, so web and workers that disagree on a setting simply never match.

Nothing here imports torch, Flask or the database.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping


def _digest(payload: Any) -> str:
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


def request_key(*, image_sha256: str, model: str, target_index: int | None,
                targets: Iterable[int] | None, top_k: int | None, config: Mapping[str, Any]) -> str:
    """sha256 (hex) of what a submission asks for: image, model, targets, full config."""
    return _digest({
        "v": 1,
        "image": image_sha256,
        "model": model,
        "target": None if target_index is None else int(target_index),
        "targets": [int(t) for t in targets] if targets else None,
        "top_k": int(top_k) if top_k and int(top_k) > 1 else None,
        "config": dict(config),
    })


def reuse_key(request: str, arithmetic: Iterable[tuple[str, str]]) -> str:
    """The stored key: :func:`request_key` combined with the arithmetic settings."""
    return _digest({"request": request, "arithmetic": sorted(list(pair) for pair in arithmetic)})


def reproducible(arithmetic: Iterable[tuple[str, str]]) -> bool:
    """Whether these settings give bit-identical results (``EBB_REPRODUCIBLE`` not ``0``)."""
    value = dict(arithmetic).get("EBB_REPRODUCIBLE", "").strip().lower()
    return value not in ("0", "false", "no", "off")
