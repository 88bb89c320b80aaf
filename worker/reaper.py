"""Recovering jobs whose worker vanished.

* A ``running`` job whose heartbeat is older than the timeout *and* whose
  worker is really gone (its fleet record in Redis is missing, or belongs to a
  newer process of the same name, see :func:`fleet_liveness`) is re-queued
  (the task re-sent, progress back to 0) while it has attempts left, else
  failed with a reason. A live worker's jobs are never re-queued: its
  heartbeat thread (:class:`worker.heartbeat.JobHeartbeat`) keeps them fresh
  through every phase, so an old job heartbeat alone means nothing.
* A ``queued`` job whose *message* is missing from its queue is re-sent by
  :mod:`worker.reconcile`, not here. ``requeue_queued_after_s`` (only
  ``ebb reap --requeue-queued-after``) still re-sends blindly.
  One queued for more than a day fails ("no worker took it").
* A ``queued`` job with ``cancel_requested`` becomes ``cancelled``.
* Hidden temporary artifact folders older than an hour, left by a worker
  killed while writing, are deleted (:func:`sweep_leftovers`).
* With ``EBB_RETENTION_DAYS`` set, finished jobs older than that are deleted
  with their artifacts and the uploads nothing else uses
  (:func:`shared.retention.purge`).

Every change is a compare-and-set ``UPDATE``, so several workers may reap at
once without double-sending. Runs periodically in every worker
(:class:`ReaperThread`) and on demand with ``ebb reap``. No torch here.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Mapping

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from shared.db.models import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

#: ``EBB_RESEND_QUEUED_AFTER``'s default (see :mod:`worker.reconcile`).
DEFAULT_REQUEUE_QUEUED_AFTER_S = 20.0
DEFAULT_QUEUED_TIMEOUT_S = 24 * 60 * 60.0
DEFAULT_REAP_INTERVAL_S = 60.0

Send = Callable[[uuid.UUID, str], object]
#: ``alive(hostname, job_started_at)``: whether the worker that claimed a job
#: (at ``job_started_at``) still runs.
Alive = Callable[[str | None, datetime | None], bool]


@dataclass
class ReapReport:
    """Ids of the jobs the reaper touched, by what it did."""

    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    resent: list[uuid.UUID] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.resent or self.cancelled)

    def summary(self) -> str:
        return (f"requeued {len(self.requeued)}, failed {len(self.failed)}, "
                f"resent {len(self.resent)}, cancelled {len(self.cancelled)}")


def _default_send(job_id: uuid.UUID, model: str) -> object:
    from worker.celery_app import send_explain

    return send_explain(job_id, model)


def _send(send: Send, job_id: uuid.UUID, model: str) -> None:
    try:
        send(job_id, model)
    except Exception:  # noqa: BLE001 - the next pass re-sends queued jobs
        log.exception("could not enqueue job %s; it stays queued for a later pass", job_id)


def reap_stale_jobs(
    session: Session,
    heartbeat_timeout_s: float,
    *,
    max_attempts: int = 3,
    requeue_queued_after_s: float | None = None,
    queued_timeout_s: float | None = DEFAULT_QUEUED_TIMEOUT_S,
    send: Send | None = None,
    now: datetime | None = None,
    alive: Alive | None = None,
) -> ReapReport:
    """One reaper pass over ``session``'s database; commits its changes.

    Args:
        heartbeat_timeout_s: a ``running`` job silent for longer is stale.
        max_attempts: a stale job with this many attempts fails instead.
        requeue_queued_after_s: re-send ``queued`` jobs enqueued longer ago,
            whether their message is there or not (``None``, the default,
            disables; :mod:`worker.reconcile` re-sends only lost messages).
        queued_timeout_s: fail ``queued`` jobs created longer ago (``None``
            disables).
        send: ``send(job_id, model)`` enqueues a job (default: Celery by name).
        now: the current time (tests).
        alive: ``alive(worker_hostname, started_at)`` says whether a stale
            job's worker still runs; such a job is left alone. ``None``
            treats every stale job's worker as gone (``ebb reap`` without
            Redis, tests).
    """
    if heartbeat_timeout_s <= 0:
        raise ValueError(f"heartbeat_timeout_s must be positive, got {heartbeat_timeout_s}")
    send = send or _default_send
    now = now or utcnow()
    report = ReapReport()
    running = JobStatus.RUNNING.value
    queued = JobStatus.QUEUED.value

    cutoff = now - timedelta(seconds=heartbeat_timeout_s)
    stale = session.execute(
        select(Job.id, Job.model, Job.attempts, Job.heartbeat_at, Job.worker_hostname, Job.started_at).where(
            Job.status == running,
            or_(Job.heartbeat_at < cutoff, and_(Job.heartbeat_at.is_(None), Job.started_at < cutoff)),
        )
    ).all()
    for job_id, model, attempts, beat, hostname, started in stale:
        if alive is not None and alive(hostname, started):
            log.info("job %s: heartbeat %s is old but its worker %s is alive; left alone", job_id, beat, hostname)
            continue
        owned = (Job.id == job_id, Job.status == running, Job.attempts == attempts)
        if attempts >= max_attempts:
            done = session.execute(update(Job).where(*owned).values(
                status=JobStatus.FAILED.value, finished_at=now,
                error=(f"the worker stopped responding (no heartbeat for {heartbeat_timeout_s:g} s) "
                       f"after {attempts} attempt{'s' if attempts != 1 else ''}"),
            )).rowcount
            session.commit()
            if done:
                log.warning("job %s failed: worker lost %d times", job_id, attempts)
                report.failed.append(job_id)
            continue
        done = session.execute(update(Job).where(*owned).values(
            status=queued, enqueued_at=now, heartbeat_at=None,
            progress_iteration=0, live=None, current_score=None)).rowcount
        session.commit()
        if done:
            log.warning("job %s: worker lost (last heartbeat %s); re-queued", job_id, beat)
            _send(send, job_id, model)
            report.requeued.append(job_id)

    ids = session.execute(
        select(Job.id).where(Job.status == queued, Job.cancel_requested.is_(True))
    ).scalars().all()
    for job_id in ids:
        done = session.execute(update(Job).where(Job.id == job_id, Job.status == queued).values(
            status=JobStatus.CANCELLED.value, finished_at=now)).rowcount
        session.commit()
        if done:
            report.cancelled.append(job_id)

    if queued_timeout_s is not None:
        too_old = now - timedelta(seconds=queued_timeout_s)
        ids = session.execute(select(Job.id).where(Job.status == queued, Job.created_at < too_old)).scalars().all()
        for job_id in ids:
            done = session.execute(update(Job).where(Job.id == job_id, Job.status == queued).values(
                status=JobStatus.FAILED.value, finished_at=now,
                error=f"no worker picked the job up within {queued_timeout_s / 3600:g} h",
            )).rowcount
            session.commit()
            if done:
                report.failed.append(job_id)

    if requeue_queued_after_s is not None:
        resend_cutoff = now - timedelta(seconds=requeue_queued_after_s)
        rows = session.execute(
            select(Job.id, Job.model, Job.enqueued_at).where(
                Job.status == queued,
                or_(Job.enqueued_at < resend_cutoff,
                    and_(Job.enqueued_at.is_(None), Job.created_at < resend_cutoff)),
            )
        ).all()
        for job_id, model, enqueued_at in rows:
            same = Job.enqueued_at.is_(None) if enqueued_at is None else Job.enqueued_at == enqueued_at
            done = session.execute(update(Job).where(Job.id == job_id, Job.status == queued, same)
                                   .values(enqueued_at=now)).rowcount
            session.commit()
            if done:
                log.info("job %s queued since %s: re-sending its message", job_id, enqueued_at)
                _send(send, job_id, model)
                report.resent.append(job_id)
    if report:
        log.info("reaper: %s", report.summary())
    return report


def resend_queued_after_s(environ: Mapping[str, str] | None = None) -> float | None:
    """``EBB_RESEND_QUEUED_AFTER``: seconds after which a ``queued`` job whose
    message is missing is re-sent (default 20; ``0`` never re-sends); see
    :class:`shared.settings.Settings`."""
    from shared.settings import _interval

    return _interval(os.environ if environ is None else environ, "EBB_RESEND_QUEUED_AFTER",
                    DEFAULT_REQUEUE_QUEUED_AFTER_S) or None


def _parse_iso(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def fleet_liveness(client, environ: Mapping[str, str] | None = None) -> Alive:
    """An :data:`Alive` check from the fleet records in Redis, read once now.

    A worker is alive for a job when its record exists and the process that
    wrote it started before the job was claimed (a worker restarted under the
    same name does not vouch for its predecessor's jobs). Raises if Redis
    cannot be read: then nobody is known to be gone.
    """
    from shared import fleet

    started = {str(w.get("hostname")): _parse_iso(w.get("started_at")) for w in fleet.list_workers(client, environ)}

    def alive(hostname: str | None, job_started: datetime | None) -> bool:
        if not hostname or hostname not in started:
            return False
        since = started[hostname]
        if since is None or job_started is None:
            return True
        job_started = job_started if job_started.tzinfo else job_started.replace(tzinfo=timezone.utc)
        return since <= job_started

    return alive


#: Hidden folders that artifact writes leave behind only when a worker dies
#: mid-write (``shared.imaging.render.save_artifacts``).
_LEFTOVER_PATTERNS = (".*.tmp-*", ".*.old-*")
DEFAULT_LEFTOVER_AGE_S = 60 * 60.0


def sweep_leftovers(jobs_dir: Path, older_than_s: float = DEFAULT_LEFTOVER_AGE_S,
                    now: float | None = None) -> list[Path]:
    """Delete temporary artifact folders in ``jobs_dir`` untouched for ``older_than_s``.

    A worker killed while writing a job's artifacts leaves a hidden
    ``.<job id>.tmp-*`` (or ``.<job id>.old-*``) folder; the job itself is
    re-run and writes a fresh set. Younger folders may belong to a write in
    progress and are kept. Returns the folders removed.
    """
    jobs_dir = Path(jobs_dir)
    if not jobs_dir.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for pattern in _LEFTOVER_PATTERNS:
        for path in jobs_dir.glob(pattern):
            try:
                if path.is_symlink() or not path.is_dir() or now - path.stat().st_mtime < older_than_s:
                    continue
                shutil.rmtree(path)
            except OSError as error:
                log.warning("could not remove leftover %s: %s", path, error)
                continue
            removed.append(path)
    if removed:
        log.info("removed %d leftover artifact folder(s)", len(removed))
    return removed


class ReaperThread(threading.Thread):
    """Runs :func:`reap_stale_jobs` (and :func:`sweep_leftovers` when given
    ``jobs_dir``, :func:`shared.retention.purge` when given
    ``retention_days`` and ``storage``) every ``interval_s`` until :meth:`stop`."""

    def __init__(self, database_url: str, heartbeat_timeout_s: float, max_attempts: int,
                 interval_s: float = DEFAULT_REAP_INTERVAL_S, send: Send | None = None,
                 requeue_queued_after_s: float | None = None,
                 jobs_dir: Path | None = None, retention_days: float | None = None,
                 storage: object | None = None, redis_url: str | None = None):
        super().__init__(name="ebb-reaper", daemon=True)
        self.retention_days = retention_days
        self.storage = storage
        self.database_url = database_url
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_attempts = max_attempts
        self.interval_s = interval_s
        self.send = send
        self.requeue_queued_after_s = requeue_queued_after_s
        self.jobs_dir = jobs_dir
        self.redis_url = redis_url
        self._redis = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def liveness(self) -> Alive | None:
        """:func:`fleet_liveness` from ``redis_url`` (``None`` without one);
        when Redis cannot be read, every worker counts as alive."""
        if self.redis_url is None:
            return None
        try:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
            return fleet_liveness(self._redis)
        except Exception as exc:  # noqa: BLE001 - unknown fleet: re-queue nothing
            log.warning("reaper: cannot read the fleet (%s: %s); no running job re-queued this pass",
                        type(exc).__name__, exc)
            return lambda _hostname, _started: True

    def run(self) -> None:  # pragma: no cover - exercised by integration tests
        from shared.db.session import session_scope

        while not self._stop_event.wait(self.interval_s):
            try:
                alive = self.liveness()
                with session_scope(self.database_url) as session:
                    reap_stale_jobs(session, self.heartbeat_timeout_s,
                                    max_attempts=self.max_attempts, send=self.send,
                                    requeue_queued_after_s=self.requeue_queued_after_s, alive=alive)
                if self.jobs_dir is not None:
                    sweep_leftovers(self.jobs_dir)
                if self.retention_days and self.storage is not None:
                    from shared.retention import purge

                    with session_scope(self.database_url) as session:
                        purge(session, self.storage, timedelta(days=self.retention_days))
            except Exception:  # noqa: BLE001 - keep reaping
                log.exception("reaper pass failed")
