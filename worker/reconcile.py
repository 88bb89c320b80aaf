"""Re-sending the messages of ``queued`` jobs that Redis lost, and only those.

The database says which jobs are ``queued``; the broker holds their messages:
in the model's queue (a Redis list per priority, :func:`queue_keys`) or, once
a worker took one, in kombu's ``unacked`` hash. A Redis restarted without its
data (no AOF), or a message dropped by hand, leaves a ``queued`` row with no
message: nothing would ever run it.

:func:`reconcile` compares the two and re-sends each job whose message is
missing and that was (last) enqueued more than ``resend_after_s`` seconds ago
(``EBB_RESEND_QUEUED_AFTER``, default 20: a job just submitted or handed back
is not yet expected in the queue). A job whose message is there is never
re-sent, so a queue nobody consumes (a model with no worker) keeps exactly one
message per job however long it waits.

Never duplicated:

* one reconciler at a time: a pass holds a Redis lock (``SET NX`` with an
  expiry, :data:`LOCK_TTL_S`; a crashed holder's lock expires);
* a job found missing is looked for a second time before it is re-sent (a
  message in a worker's hands between the queue and the ``unacked`` hash is
  then found);
* the re-send is a compare-and-set on ``enqueued_at``: a second reconciler (or
  the reaper) that saw the same row sends nothing.

:class:`ReconcileThread` runs in every worker: a pass every
``EBB_RECONCILE_INTERVAL`` seconds (default 15) and at once whenever its Redis
connection comes back or Redis restarted (a new ``run_id``). Lost messages are
thus re-sent within ``EBB_RESEND_QUEUED_AFTER`` + ``EBB_RECONCILE_INTERVAL``
seconds (35 by default). ``ebb reap`` runs one pass too. No torch here.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Mapping

from sqlalchemy import func, select, update

from shared.db.models import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

#: kombu's Redis transport: the hash of messages delivered but not acknowledged...
UNACKED_KEY = "unacked"
#: ...and the separator and steps of its per-priority queue lists.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
#: Seconds the reconcile lock lives if its holder never releases it.
LOCK_TTL_S = 60
#: Messages read per LRANGE / HSCAN round trip.
SCAN_CHUNK = 1000

Send = Callable[[uuid.UUID, str], object]

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end
"""


def lock_key(environ: Mapping[str, str] | None = None) -> str:
    """``<EBB_QUEUE_PREFIX>-reconcile-lock``."""
    env = os.environ if environ is None else environ
    return f"{env.get('EBB_QUEUE_PREFIX') or 'explain'}-reconcile-lock"


def queue_keys(model: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The Redis lists that hold ``model``'s messages (one per kombu priority step)."""
    from worker.celery_app import queue_for

    queue = queue_for(model, environ)
    return [queue if p == 0 else f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


def message_job_id(raw: Any) -> str | None:
    """The task id (= the job id) of one kombu message (JSON), or ``None``."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an ``unacked`` entry: [message, exchange, routing key]
            message = message[0]
        headers = message.get("headers") or {}
        task_id = headers.get("id") or (message.get("properties") or {}).get("correlation_id")
        return str(task_id) if task_id else None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        return None


def messages_present(client: Any, models: Iterable[str], environ: Mapping[str, str] | None = None) -> set[str]:
    """Job ids with a message in Redis: waiting in a queue of ``models`` or taken and unacknowledged."""
    found: set[str] = set()
    for model in sorted(set(models)):
        for key in queue_keys(model, environ):
            start = 0
            while True:
                chunk = client.lrange(key, start, start + SCAN_CHUNK - 1)
                found.update(j for j in map(message_job_id, chunk) if j)
                if len(chunk) < SCAN_CHUNK:
                    break
                start += SCAN_CHUNK
    for _, raw in client.hscan_iter(UNACKED_KEY, count=SCAN_CHUNK):
        job_id = message_job_id(raw)
        if job_id:
            found.add(job_id)
    return found


@dataclass
class ReconcileReport:
    """What one pass saw and did."""

    locked: bool = True  #: ``False``: another reconciler held the lock; nothing was done
    queued: int = 0  #: ``queued`` rows old enough to be expected in a queue
    resent: list[uuid.UUID] = field(default_factory=list)

    def summary(self) -> str:
        if not self.locked:
            return "skipped (another reconciler runs)"
        return f"{self.queued} queued job(s) checked, {len(self.resent)} lost message(s) re-sent"


def _default_send(job_id: uuid.UUID, model: str) -> object:
    from worker.celery_app import send_explain

    return send_explain(job_id, model)


def reconcile(database_url: str, client: Any, *, resend_after_s: float = 20.0, send: Send | None = None,
              environ: Mapping[str, str] | None = None, now: datetime | None = None,
              owner: str | None = None) -> ReconcileReport:
    """One pass: re-send the message of every ``queued`` job enqueued more than
    ``resend_after_s`` seconds ago whose message is in no queue (see the module
    docstring). ``client`` is a ``redis.Redis`` on the broker; ``send(job_id,
    model)`` enqueues (default: Celery by name). Raises if Redis or the
    database cannot be read (nothing is sent then)."""
    from shared.db.session import session_scope

    send = send or _default_send
    now = now or utcnow()
    cutoff = now - timedelta(seconds=resend_after_s)
    seen = func.coalesce(Job.enqueued_at, Job.created_at)
    old_enough = select(Job.id, Job.model, Job.enqueued_at).where(
        Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False), seen < cutoff)
    with session_scope(database_url) as session:
        if session.execute(old_enough.limit(1)).first() is None:
            return ReconcileReport()  # nothing to check: no lock taken
    token = owner or uuid.uuid4().hex
    key = lock_key(environ)
    if not client.set(key, token, nx=True, ex=LOCK_TTL_S):
        return ReconcileReport(locked=False)
    report = ReconcileReport()
    try:
        with session_scope(database_url) as session:
            rows = session.execute(old_enough).all()
            report.queued = len(rows)
            if not rows:
                return report
            models = {model for _, model, _ in rows}
            present = messages_present(client, models, environ)
            missing = [r for r in rows if str(r[0]) not in present]
            if missing:  # look again: a message may have been between the queue and ``unacked``
                present = messages_present(client, models, environ)
                missing = [r for r in missing if str(r[0]) not in present]
            for job_id, model, enqueued_at in missing:
                same = Job.enqueued_at.is_(None) if enqueued_at is None else Job.enqueued_at == enqueued_at
                done = session.execute(update(Job).where(
                    Job.id == job_id, Job.status == JobStatus.QUEUED.value, same).values(enqueued_at=now)).rowcount
                session.commit()
                if not done:
                    continue  # taken, cancelled or re-sent by someone else meanwhile
                try:
                    send(job_id, model)
                except Exception:  # noqa: BLE001 - found missing again at the next pass
                    log.exception("could not re-send job %s; a later pass tries again", job_id)
                    continue
                log.warning("job %s: queued but its message was missing from the broker; re-sent", job_id)
                report.resent.append(job_id)
        return report
    finally:
        try:
            client.eval(_RELEASE, 1, key, token)
        except Exception:  # noqa: BLE001 - it expires on its own
            pass


class ReconcileThread(threading.Thread):
    """Runs :func:`reconcile` every ``interval_s`` seconds, and at once when
    the Redis connection comes back or Redis restarted (its ``run_id``
    changed), until :meth:`stop`."""

    #: Seconds between two checks of the Redis connection.
    PROBE_S = 1.0

    def __init__(self, database_url: str, redis_url: str, interval_s: float, resend_after_s: float,
                 send: Send | None = None, environ: Mapping[str, str] | None = None):
        super().__init__(name="ebb-reconcile", daemon=True)
        self.database_url = database_url
        self.redis_url = redis_url
        self.interval_s = interval_s
        self.resend_after_s = resend_after_s
        self.send = send
        self.environ = environ
        self.passes = 0
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:  # pragma: no cover - exercised by integration tests
        import time

        import redis

        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2.0, socket_timeout=10.0)
        run_id = None
        connected = False
        next_pass = time.monotonic()  # a first pass at start-up (a (re)connect too)
        while not self._stop_event.is_set():
            try:
                current = client.info("server").get("run_id")
                if not connected or current != run_id:
                    if run_id is not None:
                        log.info("Redis connection back (run_id %s): reconciling the queues now", current)
                    next_pass = time.monotonic()
                connected, run_id = True, current
            except Exception as exc:  # noqa: BLE001 - Redis away: wait for it
                if connected:
                    log.warning("reconcile: Redis unreachable (%s: %s)", type(exc).__name__, exc)
                connected = False
            if connected and time.monotonic() >= next_pass:
                next_pass = time.monotonic() + self.interval_s
                try:
                    report = reconcile(self.database_url, client, resend_after_s=self.resend_after_s,
                                       send=self.send, environ=self.environ)
                    self.passes += 1
                    if report.resent:
                        log.warning("reconcile: %s", report.summary())
                except Exception as exc:  # noqa: BLE001 - keep reconciling
                    log.warning("reconcile pass failed: %s: %s", type(exc).__name__, exc)
                    next_pass = time.monotonic() + self.PROBE_S
            self._stop_event.wait(self.PROBE_S)
        client.close()
