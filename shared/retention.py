"""Deleting finished jobs: one by ``DELETE /api/v1/jobs/<id>``, the expired
ones by the reaper (``EBB_RETENTION_DAYS``) and by ``ebb purge``.

Deleting a job removes, through the store's key interface (the same calls on
a local disk and in an object store):

* its row;
* its artifacts (``jobs/<id>`` or the job's ``artifacts_key``), unless another
  job still points at the same artifacts (a reused result);
* its live preview (``previews/<id>.png``);
* its upload (``uploads/<sha256>``) and the thumbnails and renditions made
  from it, once no other job uses that upload.

The row goes first (a compare-and-set ``DELETE`` on a finished status, so a
job that started meanwhile is never deleted); the files follow, each only
after checking that no remaining row needs it. No Flask, no Celery, no torch.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from shared.db.models import TERMINAL_STATUSES, Job, utcnow
from shared.storage import job_key

log = logging.getLogger(__name__)

#: Local folders (under ``DATA_DIR``) of files derived from an upload, named ``<sha256>-*``.
DERIVED_DIRS = ("thumbnails", "renditions")

_AGE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([dhm]?)\s*$")
_AGE_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "": 86400.0}


def parse_age(text: str) -> timedelta:
    """``"30d"``, ``"12h"``, ``"90m"`` or a bare number of days -> a positive
    :class:`timedelta`; ``ValueError`` otherwise."""
    match = _AGE.match(str(text or ""))
    if not match:
        raise ValueError(f"not an age: {text!r}; use e.g. 30d, 12h or 90m")
    seconds = float(match.group(1)) * _AGE_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"the age must be positive, got {text!r}")
    return timedelta(seconds=seconds)


def artifacts_key(job: Any) -> str:
    """Where ``job``'s artifacts live in the store: its ``artifacts_key`` when
    the schema has one and it is set, else ``jobs/<id>``."""
    return getattr(job, "artifacts_key", None) or job_key(job.id)


@dataclass
class Deleted:
    """What deleting one job removed (store keys) and what it kept because
    another job still uses it."""

    job_id: uuid.UUID
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    #: Keys the store refused to delete (e.g. an object store that is down).
    failed: list[str] = field(default_factory=list)


class NotFinished(Exception):
    """The job is queued or running (cancel it first)."""


def _artifacts_in_use(session: Session, key: str) -> bool:
    column = getattr(Job, "artifacts_key", None)
    if column is None:
        return False
    conditions = [column == key, column.like(f"{key}/%")]  # the key or a key under it
    if key.startswith("jobs/"):  # rows without artifacts_key use jobs/<id>
        try:
            owner = uuid.UUID(key.split("/")[1])
        except ValueError:
            owner = None
        if owner is not None:
            conditions.append((Job.id == owner) & column.is_(None))
    return bool(session.scalar(select(func.count()).select_from(Job).where(or_(*conditions))))


def _upload_in_use(session: Session, sha: str) -> bool:
    return bool(session.scalar(select(func.count()).select_from(Job).where(Job.image_sha256 == sha)))


def _remove_derived(data_dir: Path | None, sha: str) -> list[str]:
    removed = []
    if data_dir is None:
        return removed
    for folder in DERIVED_DIRS:
        for path in (Path(data_dir) / folder).glob(f"{sha}-*"):
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(f"{folder}/{path.name}")
    return removed


def delete_job(session: Session, storage: Any, job_id: uuid.UUID) -> Deleted | None:
    """Delete the finished job ``job_id`` and the files nothing else uses.

    Returns what was removed, None when there is no such job; raises
    :class:`NotFinished` when the job is queued or running.
    """
    job = session.get(Job, job_id)
    if job is None:
        return None
    if job.status not in TERMINAL_STATUSES:
        raise NotFinished(f"job {job_id} is {job.status}")
    sha = job.image_sha256
    keys = list(dict.fromkeys([artifacts_key(job), job_key(job.id)]))
    session.expunge(job)
    gone = session.execute(
        delete(Job).where(Job.id == job_id, Job.status.in_(TERMINAL_STATUSES))
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    if gone != 1:
        if session.get(Job, job_id) is None:
            return None
        raise NotFinished(f"job {job_id} is no longer finished")
    result = Deleted(job_id)

    def remove(what: str, key: str) -> None:
        try:
            getattr(storage, what)(key)
        except Exception as error:  # noqa: BLE001 - the row is gone; report, keep going
            log.warning("job %s deleted but %s could not be removed: %s", job_id, key, error)
            result.failed.append(key)
        else:
            result.removed.append(key)

    for key in keys:
        if _artifacts_in_use(session, key):
            result.kept.append(key)
        else:
            remove("delete_prefix", key)
    remove("delete", f"previews/{job_id}.png")
    upload = f"uploads/{sha}"
    if _upload_in_use(session, sha):
        result.kept.append(upload)
    else:
        remove("delete", upload)
        result.removed += _remove_derived(getattr(storage, "data_dir", None), sha)
    log.info("job %s deleted (removed %s; kept %s)", job_id, ", ".join(result.removed) or "nothing",
             ", ".join(result.kept) or "nothing",
             extra={"event": "deleted", "job_id": str(job_id)})
    return result


def open_store(settings: Any) -> Any:
    """The store of ``settings`` (``shared.storage.open_storage`` when the
    object-store support is there, else the data folder)."""
    import shared.storage as storage_mod

    opener = getattr(storage_mod, "open_storage", None)
    return opener(settings) if opener is not None else storage_mod.Storage(settings.data_dir)


def expired_jobs(session: Session, older_than: timedelta, now: datetime | None = None) -> list[uuid.UUID]:
    """Ids of the finished jobs that finished (or, without a finish time, were
    created) more than ``older_than`` before ``now``, oldest first."""
    cutoff = (now or utcnow()) - older_than
    when = func.coalesce(Job.finished_at, Job.created_at)
    return list(session.scalars(
        select(Job.id).where(Job.status.in_(TERMINAL_STATUSES), when < cutoff).order_by(when, Job.id)
    ))


@dataclass
class PurgeReport:
    """The jobs a purge deleted (or, in a dry run, would delete)."""

    jobs: list[uuid.UUID] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return f"{verb} {len(self.jobs)} job(s), {len(self.removed)} stored item(s) removed"


def purge(session: Session, storage: Any, older_than: timedelta, *, dry_run: bool = False,
          now: datetime | None = None) -> PurgeReport:
    """Delete every job :func:`expired_jobs` lists (nothing in a dry run)."""
    report = PurgeReport(dry_run=dry_run)
    for job_id in expired_jobs(session, older_than, now):
        if dry_run:
            report.jobs.append(job_id)
            continue
        try:
            done = delete_job(session, storage, job_id)
        except NotFinished:
            continue
        if done is not None:
            report.jobs.append(job_id)
            report.removed += done.removed
            report.kept += done.kept
    if report.jobs and not dry_run:
        log.info("retention: %s", report.summary())
    return report
