"""Per-owner quotas on work (issue 15): ``EBB_MAX_QUEUED_PER_OWNER`` and
``EBB_WORK_BUDGET``, checked when a job is submitted, after its input was
validated (a rejected request spends nothing: only stored jobs count).

The owner is the authenticated token's name (``web.auth.current_owner``) or
``default`` in single-user mode. The database is the ledger: an owner's
active jobs are their queued and running rows, their work in the last hour
the sum over the rows they submitted in that hour (cancelled ones included),
plus the jobs of that hour they deleted since: deleting a job does not give
its work back (those are noted in Redis, in a sorted set per owner under
``<EBB_RATE_LIMIT_PREFIX>:deleted-work:<owner>`` that expires after the hour).
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from typing import Any

from flask import g
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from shared.db.models import Job, JobStatus, utcnow
from shared.quotas import WINDOW, budget_refill, job_work

from .errors import ApiError

log = logging.getLogger(__name__)

#: The owner of every job in single-user mode (no tokens).
DEFAULT_OWNER = "default"
#: ``Retry-After`` (seconds) of a 429 for too many queued jobs: when a job
#: will finish is not known, so ask the client to look again soon.
QUEUED_RETRY_AFTER_S = 30
ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def owner_name() -> str:
    """The requester's owner name for quotas (``default`` without tokens)."""
    try:
        from .auth import current_owner  # issue 15's owners, when present
    except ImportError:
        return DEFAULT_OWNER
    owner = current_owner()
    return getattr(owner, "name", None) or DEFAULT_OWNER


def job_owner(job: Job) -> str:
    return getattr(job, "owner", None) or DEFAULT_OWNER


def _of_owner(name: str) -> list[Any]:
    column = getattr(Job, "owner", None)
    if column is None:
        return []
    if name == DEFAULT_OWNER:
        return [or_(column == name, column.is_(None))]
    return [column == name]


def _as_utc(value: datetime) -> datetime:
    from .jobs import as_utc

    out = as_utc(value)
    assert out is not None
    return out


def _active(db: Session, name: str) -> int:
    return int(db.scalar(select(func.count()).select_from(Job)
                         .where(Job.status.in_(ACTIVE), *_of_owner(name))) or 0)


def _recent(db: Session, name: str, now: datetime) -> list[tuple[datetime, int]]:
    since = now - WINDOW
    if db.get_bind().dialect.name == "sqlite":
        since = since.replace(tzinfo=None)
    conditions = [Job.created_at > since, *_of_owner(name)]
    reused = getattr(Job, "reused_from", None)
    if reused is not None:  # answered from a stored result: no work done
        conditions.append(reused.is_(None))
    rows = db.execute(select(Job.created_at, Job.config, Job.targets, Job.top_k).where(*conditions)).all()
    return [(_as_utc(created), job_work(config, targets, top_k)) for created, config, targets, top_k in rows]


def _deleted_key(settings: Any, name: str) -> str:
    return f"{settings.rate_limit_prefix}:deleted-work:{name}"


def _redis() -> Any:
    from .fleet import _client

    return _client()


def record_deleted(settings: Any, job: Job, now: datetime | None = None) -> None:
    """Keep the work of ``job``, about to be deleted, in its owner's hour
    (best effort: a Redis failure is logged and the work is forgotten)."""
    from .jobs import as_utc

    now = now or utcnow()
    created = as_utc(job.created_at)
    if created is None or created <= now - WINDOW or getattr(job, "reused_from", None) is not None:
        return
    work = job_work(job.config, job.targets, job.top_k)
    key = _deleted_key(settings, job_owner(job))
    try:
        client = _redis()
        client.zadd(key, {f"{job.id}:{work}": created.timestamp()})
        client.expire(key, int(WINDOW.total_seconds()) + 60)
    except Exception as error:  # noqa: BLE001 - best effort
        log.warning("could not record the work of deleted job %s: %s", job.id, error)


def _deleted(settings: Any, name: str, now: datetime) -> list[tuple[datetime, int]]:
    try:
        rows = _redis().zrangebyscore(_deleted_key(settings, name), (now - WINDOW).timestamp(), "+inf",
                                      withscores=True)
    except Exception as error:  # noqa: BLE001 - Redis down: count the rows only
        log.warning("could not read the deleted jobs' work of %s: %s", name, error)
        return []
    out = []
    for member, score in rows:
        try:
            work = int((member.decode() if isinstance(member, bytes) else str(member)).rsplit(":", 1)[1])
        except (IndexError, ValueError):
            continue
        out.append((datetime.fromtimestamp(float(score), timezone.utc), work))
    return out


def _spent(db: Session, settings: Any, name: str, now: datetime) -> list[tuple[datetime, int]]:
    """``(accepted at, work)`` of the owner's jobs of the last hour, deleted ones included."""
    return _recent(db, name, now) + _deleted(settings, name, now)


def usage(db: Session, settings: Any, name: str, now: datetime | None = None) -> dict[str, Any]:
    """The owner's usage and limits (``GET /api/v1/usage`` and the job JSON)."""
    now = now or utcnow()
    recent = _spent(db, settings, name, now)
    used = sum(work for _, work in recent)
    budget = settings.work_budget
    refills = None
    if recent and budget is not None:
        refills = min(when for when, _ in recent) + WINDOW
    return {
        "owner": name,
        "active_jobs": _active(db, name),
        "max_active_jobs": int(settings.max_queued_per_owner),
        "work_last_hour": used,
        "work_budget": budget,
        "work_left": max(0, budget - used) if budget is not None else None,
        "next_refill_at": _iso(refills),
        "max_iterations": int(settings.max_iterations),
    }


def cached_usage(db: Session, settings: Any, name: str) -> dict[str, Any]:
    """:func:`usage`, computed once per request and owner."""
    cache = g.setdefault("ebb_usage", {})
    if name not in cache:
        cache[name] = usage(db, settings, name)
    return cache[name]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def check(db: Session, settings: Any, name: str, work: int, now: datetime | None = None) -> None:
    """Raise :class:`ApiError` 429 (with ``Retry-After``) when a new job of
    ``work`` mask-iterations would put owner ``name`` over a quota."""
    now = now or utcnow()
    limit = int(settings.max_queued_per_owner)
    active = _active(db, name)
    if active >= limit:
        raise ApiError(
            429, "too_many_jobs",
            f"{name!r} already has {active} queued or running jobs, the most allowed "
            f"(EBB_MAX_QUEUED_PER_OWNER={limit}); wait for one to finish or cancel one.",
            headers={"Retry-After": str(QUEUED_RETRY_AFTER_S)},
            retry_after_s=QUEUED_RETRY_AFTER_S, limit=limit, active_jobs=active)
    budget = settings.work_budget
    if budget is None:
        return
    if work > budget:
        raise ApiError(
            400, "too_expensive",
            f"this job is {work} mask-iterations (targets x iterations x areas), more than the "
            f"hourly budget of {budget} (EBB_WORK_BUDGET); lower iterations.", field="iterations")
    recent = _spent(db, settings, name, now)
    refill = budget_refill(recent, work, budget, now)
    if refill is None:
        return
    wait = max(1, math.ceil((refill - now).total_seconds()))
    used = sum(w for _, w in recent)
    raise ApiError(
        429, "work_budget_exceeded",
        f"{name!r} has used {used} of its {budget} mask-iterations this hour (EBB_WORK_BUDGET); "
        f"this job needs {work}. The budget refills enough for it at {_iso(refill)} "
        f"(in {wait} s).",
        headers={"Retry-After": str(wait)},
        retry_after_s=wait, refills_at=_iso(refill), work_last_hour=used, work_budget=budget,
        work=work)


def submission_work(sub: Any) -> int:
    """Mask-iterations of a validated :class:`web.jobs.Submission`."""
    return job_work(sub.config.to_dict(), list(sub.targets) if sub.targets else None, sub.top_k)


__all__ = ["DEFAULT_OWNER", "check", "usage", "cached_usage", "owner_name", "job_owner",
           "record_deleted", "submission_work"]
