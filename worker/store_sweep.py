"""Sweeping the object store: leftovers of killed or superseded attempts.

On S3 every attempt of a job uploads its artifacts under its own prefix
``jobs/<id>/<attempt token>/`` and the job row's ``artifacts_key`` names the
committed one. A worker killed mid-upload, or an attempt the reaper superseded,
leaves a prefix no row names; :func:`sweep_store` deletes those whose newest
object is older than ``older_than_s`` (younger ones may be an upload in
progress), and the live previews of jobs that are no longer running.
The file store keeps the folder sweep of ``worker.reaper.sweep_leftovers``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timezone

from sqlalchemy import select

from shared.db.models import Job, JobStatus
from shared.db.session import session_scope
from shared.storage import StorageUnavailable

log = logging.getLogger(__name__)


def sweep_store(storage, database_url: str, older_than_s: float, now: datetime | None = None) -> list[str]:
    """Delete unreferenced attempt prefixes (and stale previews) older than
    ``older_than_s``; return the prefixes / keys removed."""
    now = now or datetime.now(timezone.utc)
    groups: dict[str, datetime] = {}
    for key, modified in storage.list_objects("jobs"):
        parts = key.split("/")
        if len(parts) < 4:  # jobs/<id>/<token>/<file...>
            continue
        prefix = "/".join(parts[:3])
        groups[prefix] = max(modified, groups.get(prefix, modified))
    old = [p for p, modified in groups.items() if (now - modified).total_seconds() >= older_than_s]
    previews = [(k, m) for k, m in storage.list_objects("previews")
                if (now - m).total_seconds() >= older_than_s]
    if not old and not previews:
        return []
    removed: list[str] = []
    with session_scope(database_url) as session:
        referenced = set(session.scalars(select(Job.artifacts_key).where(Job.artifacts_key.in_(old)))) if old else set()
        ids = []
        for key, _ in previews:
            try:
                ids.append(uuid.UUID(key.split("/")[-1].removesuffix(".png")))
            except ValueError:
                continue
        running = set(session.scalars(select(Job.id).where(Job.id.in_(ids),
                                                          Job.status == JobStatus.RUNNING.value))) if ids else set()
    for prefix in old:
        if prefix in referenced:
            continue
        storage.delete_prefix(prefix)
        removed.append(prefix)
    for key, _ in previews:
        try:
            if uuid.UUID(key.split("/")[-1].removesuffix(".png")) in running:
                continue
        except ValueError:
            pass
        storage.delete(key)
        removed.append(key)
    if removed:
        log.info("store sweep removed %d leftover prefix(es)/preview(s)", len(removed))
    return removed


class StoreSweeper(threading.Thread):
    """Runs :func:`sweep_store` every ``interval_s`` until :meth:`stop`."""

    def __init__(self, storage, database_url: str, older_than_s: float, interval_s: float):
        super().__init__(name="ebb-store-sweep", daemon=True)
        self.storage, self.database_url = storage, database_url
        self.older_than_s, self.interval_s = older_than_s, interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                sweep_store(self.storage, self.database_url, self.older_than_s)
            except StorageUnavailable as error:
                log.warning("store sweep skipped: %s", error)
            except Exception:  # noqa: BLE001 - the sweeper must keep going
                log.exception("store sweep failed")

    def stop(self) -> None:
        self._stop_event.set()
