"""Prometheus metrics of the web front end: ``GET /metrics``.

Counted by the web (``prometheus_client`` counters): jobs submitted by model
(``ebb_jobs_submitted_total``) and the queued jobs it cancels itself
(``ebb_jobs_finished_total{status="cancelled"}``; the workers count the jobs
they end, under the same name, on their own endpoint).

Computed at scrape time by :class:`StackCollector` (a custom collector,
nothing is kept between scrapes): ``ebb_queue_length{model}`` (Redis ``LLEN``
of each offered model's queue, :func:`worker.celery_app.queue_for`),
``ebb_workers_online{model}`` (the worker heartbeats of :mod:`shared.fleet`)
and ``ebb_redis_up``.

Under gunicorn every process counts on its own: with
``PROMETHEUS_MULTIPROC_DIR`` set (``web.gunicorn_conf`` sets it up) the
endpoint aggregates every process's files with the client's
``MultiProcessCollector``, so whichever process answers, the counts are the
service's. Without it (``ebb run``'s in-process server, tests) the default
registry of this one process is served.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from shared.metrics import JOBS_FINISHED

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

JOBS_SUBMITTED = Counter("ebb_jobs_submitted", "Jobs accepted and queued by the web, by model.", ["model"])

#: Seconds the scrape waits for Redis.
REDIS_TIMEOUT_S = 1.0


def job_submitted(model: str) -> None:
    JOBS_SUBMITTED.labels(model).inc()


def job_cancelled_queued(model: str) -> None:
    JOBS_FINISHED.labels(model, "cancelled").inc()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


class StackCollector:
    """Gauges read from Redis at scrape time (see the module docstring)."""

    def __init__(self, redis_url: str, models: Iterable[str]):
        self.redis_url = redis_url
        self.models = list(models)

    def collect(self) -> Iterable[Any]:
        import redis

        from shared import fleet
        from worker.celery_app import queue_for

        up = GaugeMetricFamily("ebb_redis_up", "1 when the broker answered this scrape, else 0.")
        queues = GaugeMetricFamily("ebb_queue_length", "Messages waiting in each model's queue.",
                                   labels=["model"])
        online = GaugeMetricFamily("ebb_workers_online", "Workers with a live heartbeat, by model.",
                                   labels=["model"])
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S,
                                      socket_timeout=REDIS_TIMEOUT_S)
        try:
            pipe = client.pipeline(transaction=False)
            for model in self.models:
                pipe.llen(queue_for(model))
            lengths = pipe.execute()
            counts = {model: 0 for model in self.models}
            counts.update(fleet.workers_by_model(fleet.list_workers(client)))
        except Exception as error:  # noqa: BLE001 - a scrape never fails for Redis
            log.warning("metrics: Redis unreachable: %s: %s", type(error).__name__, error)
            up.add_metric([], 0)
            yield up
            return
        finally:
            client.close()
        up.add_metric([], 1)
        for model, length in zip(self.models, lengths):
            queues.add_metric([model], int(length or 0))
        for model, count in sorted(counts.items()):
            online.add_metric([model], count)
        yield up
        yield queues
        yield online


class _Merged:
    """A collector yielding several collectors' metrics (one exposition)."""

    def __init__(self, *collectors: Any):
        self.collectors = collectors

    def collect(self) -> Iterable[Any]:
        for collector in self.collectors:
            yield from collector.collect()


def exposition() -> bytes:
    """This service's metrics in the Prometheus text format."""
    settings = current_app.extensions["ebb"].settings
    stack = StackCollector(settings.redis_url, settings.models)
    if multiprocess_dir():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(_Merged(registry, stack))  # type: ignore[arg-type]
    return generate_latest(_Merged(REGISTRY, stack))  # type: ignore[arg-type]


@bp.get("/metrics")
def metrics():
    response = Response(exposition(), mimetype=None)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    response.headers["Cache-Control"] = "no-store"
    return response
