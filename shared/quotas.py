"""Per-owner quotas on work (issue 15): the pure arithmetic.

* A job's work is its mask-iterations: targets x iterations x areas (the
  areas of an extremal job; 1 otherwise), the unit of ``EBB_MAX_JOB_WORK``.
* ``EBB_WORK_BUDGET`` caps the work an owner may have had accepted in any
  sliding hour; :func:`budget_refill` says when enough of it has aged out
  for a new job to fit.

No Flask, no database: the web (``web.quotas``) feeds rows in.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Iterable

#: The window of ``EBB_WORK_BUDGET``.
WINDOW = timedelta(hours=1)


def job_work(config: Any, targets: Any = None, top_k: Any = None) -> int:
    """Mask-iterations of a job: targets x iterations x areas (>= 1).

    ``config`` is the stored config dict (``iterations``, ``method``,
    ``areas``); ``targets`` the list of explicit classes or None; ``top_k``
    the number of most probable classes or None.
    """
    config = config if isinstance(config, dict) else {}
    try:
        iterations = max(1, int(config.get("iterations") or 1))
    except (TypeError, ValueError):
        iterations = 1
    areas = 1
    if config.get("method") == "extremal" and isinstance(config.get("areas"), (list, tuple)):
        areas = max(1, len(config["areas"]))
    if isinstance(targets, list) and targets:
        n = len(targets)
    elif isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > 1:
        n = top_k
    else:
        n = 1
    return n * iterations * areas


def budget_refill(entries: Iterable[tuple[datetime, int]], new_work: int, budget: int,
                  now: datetime) -> datetime | None:
    """When a job of ``new_work`` fits in ``budget``, given the ``(accepted at,
    work)`` of the owner's jobs: None if it fits now, else the first time at
    which enough work has left the :data:`WINDOW` (``new_work`` must be at
    most ``budget``)."""
    start = now - WINDOW
    recent = sorted((when, int(work)) for when, work in entries if when > start)
    used = sum(work for _, work in recent)
    if used + new_work <= budget:
        return None
    for when, work in recent:
        used -= work
        if used + new_work <= budget:
            return when + WINDOW
    return now  # pragma: no cover - only when new_work > budget, which callers refuse first
