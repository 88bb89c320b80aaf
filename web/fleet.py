"""The web's view of the fleet: live workers (from their Redis heartbeats, see
:mod:`shared.fleet`), queued jobs per model, and queue ETAs.

Each request reads the heartbeats at most once (cached in ``flask.g``). When
Redis cannot be read the fleet is *unknown* (``None``), never an error: pages
and the API keep answering from the database.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

from flask import g
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from shared import fleet
from shared.db.models import Job, JobStatus

from .db import state

log = logging.getLogger(__name__)

#: Finished jobs whose scoring time predicts the next job's (median).
SCORING_SAMPLE = 10


def _client() -> Any:
    st = state()
    client = getattr(st, "redis", None)
    if client is None:
        import redis

        client = redis.Redis.from_url(st.settings.redis_url, socket_connect_timeout=1.0, socket_timeout=2.0)
        st.redis = client
    return client


def live_workers() -> list[fleet.WorkerInfo] | None:
    """Every live worker's heartbeat record, or ``None`` when Redis cannot be read."""
    if "ebb_fleet" not in g:
        try:
            g.ebb_fleet = fleet.list_workers(_client())
        except Exception as exc:  # noqa: BLE001 - the fleet is unknown, not an error
            log.warning("cannot read the worker heartbeats: %s: %s", type(exc).__name__, exc)
            g.ebb_fleet = None
    return g.ebb_fleet


def workers_online(model: str) -> int | None:
    """Live workers serving ``model`` (``None``: unknown)."""
    workers = live_workers()
    return None if workers is None else fleet.workers_by_model(workers).get(model, 0)


def queued_counts(db: Session) -> dict[str, int]:
    """``{model: jobs queued}``."""
    rows = db.execute(
        select(Job.model, func.count()).where(Job.status == JobStatus.QUEUED.value).group_by(Job.model)
    ).all()
    return {model: int(count) for model, count in rows}


def scoring_estimate_s(db: Session, model: str) -> float:
    """Median seconds of scoring and saving after the last iteration, over the
    model's last :data:`SCORING_SAMPLE` succeeded jobs (0 when none)."""
    cache = g.setdefault("ebb_scoring", {})
    if model not in cache:
        rows = db.scalars(
            select(Job.timings)
            .where(Job.model == model, Job.status == JobStatus.SUCCEEDED.value)
            .order_by(Job.finished_at.desc())
            .limit(SCORING_SAMPLE)
        ).all()
        seconds = []
        for timings in rows:
            if isinstance(timings, dict):
                try:
                    seconds.append(float(timings.get("scoring_s") or 0) + float(timings.get("save_s") or 0))
                except (TypeError, ValueError):
                    continue
        cache[model] = statistics.median(seconds) if seconds else 0.0
    return cache[model]


def _running_work(db: Session, model: str) -> int:
    """Iterations left of ``model``'s running jobs (once per request and model)."""
    cache = g.setdefault("ebb_running_work", {})
    if model not in cache:
        running = db.scalar(
            select(func.coalesce(func.sum(Job.progress_total - Job.progress_iteration), 0))
            .where(Job.status == JobStatus.RUNNING.value, Job.model == model)
        )
        cache[model] = max(0, int(running or 0))
    return cache[model]


def _work_ahead(db: Session, job: Job, queued_before: int | None = None) -> int:
    """Mask-iterations the model's workers must do before ``job`` starts: the
    rest of every running job of the model, and every queued job before it
    (``queued_before`` when already known, see ``web.jobs.queue_snapshot``)."""
    running = _running_work(db, job.model)
    if queued_before is not None:
        return running + int(queued_before)
    mine = job.enqueued_at or job.created_at
    key = func.coalesce(Job.enqueued_at, Job.created_at)
    queued = db.scalar(
        select(func.coalesce(func.sum(Job.progress_total), 0)).where(
            Job.status == JobStatus.QUEUED.value,
            Job.model == job.model,
            Job.id != job.id,
            or_(key < mine, and_(key == mine, Job.id < job.id)),
        )
    )
    return running + int(queued or 0)


def queue_info(db: Session, job: Job, position: int | None,
               queued_before: int | None = None) -> dict[str, Any] | None:
    """``{"position", "workers_online", "eta_s"}`` for a queued job, else ``None``.

    ``eta_s`` (seconds until the job is done) is the work ahead of it plus its
    own, at the rate the model's live workers measured when busy, plus the
    usual scoring time; ``None`` when no live worker has measured a rate yet.
    """
    if job.status != JobStatus.QUEUED.value:
        return None
    workers = live_workers()
    online = None if workers is None else fleet.workers_by_model(workers).get(job.model, 0)
    eta = None
    rate = fleet.model_rate(workers or [], job.model)
    if rate:
        work = _work_ahead(db, job, queued_before) + int(job.progress_total or 0)
        eta = round(work / rate + scoring_estimate_s(db, job.model), 1)
    return {"position": position, "workers_online": online, "eta_s": eta}
