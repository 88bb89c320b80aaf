"""Prometheus metrics of a worker process, served on ``EBB_METRICS_PORT``.

``EBB_METRICS_PORT`` = a TCP port (``0`` or unset: no metrics server);
``EBB_METRICS_ADDR`` = the address to bind (default ``0.0.0.0``). The server
(``prometheus_client.start_http_server``, a daemon thread) starts in the
worker's start-up hook, once the model is loaded. A worker is one process
(the ``threads`` pool), so the client's default registry is all there is.

``ebb_jobs_finished_total`` is defined in :mod:`shared.metrics` (the web
counts the queued jobs it cancels under the same name). The job events
(:func:`job_started`, :func:`job_finished`) are called by
:mod:`worker.jobs`; the batch engine reports every batched step through its
``on_batch`` hook (:func:`engine_hook`). The algorithm in
``shared.attribution`` knows nothing of this.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

from prometheus_client import Counter, Histogram, start_http_server

from shared.metrics import JOBS_FINISHED

log = logging.getLogger(__name__)

#: Job run times: seconds to an hour and more (a VGG19 job on a CPU takes minutes).
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
#: Queue waits: from sub-second to hours of backlog.
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

JOBS_STARTED = Counter(
    "ebb_jobs_started", "Job attempts a worker started (claimed).", ["model"])
JOBS_REQUEUED = Counter(
    "ebb_jobs_requeued", "Job attempts handed back to the queue (the worker was stopping).", ["model"])
JOB_DURATION = Histogram(
    "ebb_job_duration_seconds", "Seconds from a worker claiming a job to its end, by final status.",
    ["model", "status"], buckets=DURATION_BUCKETS)
QUEUE_WAIT = Histogram(
    "ebb_job_queue_wait_seconds",
    "Seconds from a job's submission (created_at) to a worker starting it (started_at).",
    ["model"], buckets=WAIT_BUCKETS)
BATCH_SIZE = Histogram(
    "ebb_engine_batch_size", "Jobs (targets) stepped together in one batched forward/backward.",
    ["model", "kind"], buckets=BATCH_BUCKETS)
MASK_ITERATIONS = Counter(
    "ebb_mask_iterations",
    "Mask-iterations done (one job's mask, or extremal run, stepped once counts 1); "
    "rate() gives the mask-iterations per second.",
    ["model"])

_server: Any = None


def metrics_port(environ: Mapping[str, str] | None = None) -> int:
    """``EBB_METRICS_PORT`` (0 = off); a ValueError when it is not a port number."""
    env = os.environ if environ is None else environ
    raw = str(env.get("EBB_METRICS_PORT") or "0").strip()
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"EBB_METRICS_PORT must be a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"EBB_METRICS_PORT must be between 0 and 65535, got {port}")
    return port


def start_server(environ: Mapping[str, str] | None = None) -> int | None:
    """Serve ``/metrics`` on ``EBB_METRICS_PORT`` if set (once per process); returns the port."""
    global _server
    env = os.environ if environ is None else environ
    port = metrics_port(env)
    if port == 0:
        return None
    if _server is None:
        addr = env.get("EBB_METRICS_ADDR") or "0.0.0.0"
        _server = start_http_server(port, addr=addr)
        log.info("Prometheus metrics on http://%s:%d/metrics", addr, port)
    return port


def job_started(model: str, queued_s: float | None) -> None:
    JOBS_STARTED.labels(model).inc()
    if queued_s is not None:
        QUEUE_WAIT.labels(model).observe(max(0.0, float(queued_s)))


def job_finished(model: str, status: str, duration_s: float | None) -> None:
    JOBS_FINISHED.labels(model, status).inc()
    if duration_s is not None:
        JOB_DURATION.labels(model, status).observe(max(0.0, float(duration_s)))


def job_requeued(model: str) -> None:
    JOBS_REQUEUED.labels(model).inc()


def engine_hook(model: str) -> Callable[[str, int, int], None]:
    """The batch engine's ``on_batch(kind, runs, masks)`` callback for ``model``."""
    iterations = MASK_ITERATIONS.labels(model)
    sizes = {kind: BATCH_SIZE.labels(model, kind) for kind in ("mp", "extremal")}

    def on_batch(kind: str, runs: int, masks: int) -> None:
        (sizes.get(kind) or BATCH_SIZE.labels(model, kind)).observe(runs)
        iterations.inc(masks)

    return on_batch
