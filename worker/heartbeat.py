"""The worker's heartbeats, each from a thread of its own.

* :class:`FleetHeartbeat` publishes what this worker is and does (see
  :mod:`shared.fleet`) every ``EBB_FLEET_INTERVAL`` seconds.
* :class:`JobHeartbeat` bumps ``heartbeat_at`` of every job the worker holds
  (:meth:`worker.runtime.Runtime.held_jobs`), whatever phase each is in
  (steps, scoring, saving), so one job's long scoring never starves its
  batch-mates' heartbeats and a healthy job never looks lost.

It runs beside the engine, not in it, so it keeps beating through every phase
of a job (steps, scoring, saving). Rates come from the engine's counters
(``mask_iterations``, ``busy_s``) over a sliding one-minute window; running
and finished job counts come from the database rows this worker claimed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from shared import fleet

log = logging.getLogger(__name__)

#: The window over which ``iterations_per_s`` is measured.
RATE_WINDOW_S = 60.0


def package_version() -> str:
    """The installed ``explain-black-box`` version (``unknown`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("explain-black-box")
    except PackageNotFoundError:
        return "unknown"


def device_name(device: str) -> str:
    """``cpu``, or the CUDA device's product name (``NVIDIA H200``)."""
    if not str(device).startswith("cuda"):
        return "cpu"
    import torch

    return torch.cuda.get_device_name(torch.device(device))


class RateMeter:
    """Mask-iterations per second over a sliding window, from cumulative counters.

    :meth:`sample` takes ``(iterations, busy_seconds)`` totals as they grow;
    :attr:`rate` is iterations per wall-clock second over the window and
    :attr:`busy_rate` iterations per second of busy time (the last non-zero
    value is kept while the worker idles).
    """

    def __init__(self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._samples: deque[tuple[float, int, float]] = deque()
        self.rate = 0.0
        self.busy_rate = 0.0

    def sample(self, iterations: int, busy_s: float) -> None:
        now = self.clock()
        self._samples.append((now, iterations, busy_s))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        t0, it0, busy0 = self._samples[0]
        if now > t0:
            self.rate = (iterations - it0) / (now - t0)
        if busy_s - busy0 > 0 and iterations > it0:
            self.busy_rate = (iterations - it0) / (busy_s - busy0)


def job_counts(database_url: str, hostname: str, since: datetime) -> tuple[int, int]:
    """(running jobs, jobs finished since ``since``) claimed by ``hostname``."""
    from sqlalchemy import func, select

    from shared.db.models import TERMINAL_STATUSES, Job, JobStatus
    from shared.db.session import session_scope

    with session_scope(database_url) as session:
        running = session.scalar(select(func.count()).select_from(Job).where(
            Job.worker_hostname == hostname, Job.status == JobStatus.RUNNING.value))
        done = session.scalar(select(func.count()).select_from(Job).where(
            Job.worker_hostname == hostname, Job.status.in_(TERMINAL_STATUSES), Job.finished_at >= since))
    return int(running or 0), int(done or 0)


class _Beater:
    """A daemon thread that calls ``_loop`` until :meth:`stop` (shared by the heartbeats)."""

    thread_name = "ebb-heartbeat"
    interval: float

    def _init_thread(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:  # pragma: no cover - defined by each heartbeat
        raise NotImplementedError

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def _join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)
            self._thread = None


class FleetHeartbeat(_Beater):
    """Publishes this worker's :class:`shared.fleet.WorkerInfo` from a daemon thread.

    Args:
        runtime: the worker's :class:`worker.runtime.Runtime` (model, device,
            engine, database).
        hostname: the Celery node name, the one recorded on the jobs it runs.
        redis_url: where the records live (the broker).
        interval: seconds between heartbeats.
        environ: for the key prefix (``EBB_QUEUE_PREFIX``).
    """

    thread_name = "ebb-fleet-heartbeat"

    def __init__(self, runtime: Any, hostname: str, redis_url: str, interval: float,
                 environ: Mapping[str, str] | None = None):
        import redis

        self.runtime = runtime
        self.hostname = hostname
        self.interval = interval
        self.environ = environ
        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
        self.started = datetime.now(timezone.utc)
        self.meter = RateMeter()
        self.device = device_name(runtime.device)
        self.version = package_version()
        self._init_thread()

    def info(self) -> dict[str, Any]:
        """The record to publish now (without ``last_seen``)."""
        engine = self.runtime.engine
        if engine is not None:
            self.meter.sample(engine.mask_iterations, engine.busy_s)
        running, done = job_counts(self.runtime.database_url, self.hostname, self.started)
        return {
            "hostname": self.hostname,
            "model": self.runtime.model_name,
            "device": self.device,
            "precision": "fp32",
            "max_batch": engine.max_batch if engine is not None else 1,
            "running_jobs": running,
            "jobs_done": done,
            "iterations_per_s": round(self.meter.rate, 3),
            "busy_iterations_per_s": round(self.meter.busy_rate, 3),
            "started_at": fleet.utc_iso(self.started),
            "version": self.version,
        }

    def beat(self) -> None:
        """Publish once."""
        fleet.publish(self.client, self.info(), self.interval, self.environ)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - Redis or the DB away: try again next time
                log.warning("fleet heartbeat failed: %s: %s", type(exc).__name__, exc)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        """Stop beating and remove the record (the worker leaves the fleet now)."""
        self._join()
        try:
            fleet.withdraw(self.client, self.hostname, self.environ)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not withdraw %s from the fleet: %s", self.hostname, exc)
        self.client.close()


def job_heartbeat_interval(heartbeat_timeout_s: float, fleet_interval_s: float) -> float:
    """Seconds between two job heartbeats: the fleet interval, but at least
    four beats per ``EBB_HEARTBEAT_TIMEOUT`` (and at most two per second)."""
    return max(0.5, min(fleet_interval_s, heartbeat_timeout_s / 4.0))


def bump_job_heartbeats(database_url: str, held: Mapping[Any, int], now: datetime | None = None) -> int:
    """Set ``heartbeat_at`` of the ``running`` jobs in ``held`` (``{job id:
    attempt}``) to ``now``, each only while that attempt still owns it.
    Returns the rows touched."""
    if not held:
        return 0
    from sqlalchemy import and_, or_, update

    from shared.db.models import Job, JobStatus, utcnow
    from shared.db.session import session_scope

    owned = or_(*(and_(Job.id == job_id, Job.attempts == attempt) for job_id, attempt in held.items()))
    with session_scope(database_url) as session:
        result = session.execute(update(Job).where(Job.status == JobStatus.RUNNING.value, owned)
                                 .values(heartbeat_at=now or utcnow()))
        return int(result.rowcount or 0)


class JobHeartbeat(_Beater):
    """Bumps the heartbeat of every job ``runtime`` holds, every ``interval`` s,
    from a daemon thread that runs until the process ends (or :meth:`stop`).

    Database errors are logged and retried at the next beat; the jobs' own
    progress writes keep beating too while they step.
    """

    thread_name = "ebb-job-heartbeat"

    def __init__(self, runtime: Any, interval: float):
        self.runtime = runtime
        self.interval = interval
        self.beats = 0
        self._init_thread()

    def beat(self) -> int:
        return bump_job_heartbeats(self.runtime.database_url, self.runtime.held_jobs())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
                self.beats += 1
            except Exception as exc:  # noqa: BLE001 - the DB away: try again next time
                log.warning("job heartbeat failed: %s: %s", type(exc).__name__, exc)

    def stop(self) -> None:
        self._join()
