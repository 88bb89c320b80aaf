"""The Celery application, shared by the web (to enqueue) and the worker (to consume).

This module must stay light: no torch, no model, no task bodies. The web
imports it to send tasks *by name* (:data:`TASK_EXPLAIN`); the tasks
themselves live in :mod:`worker.tasks`, which only the worker imports.

Each model has its own queue (:func:`queue_for`) so a worker, which preloads
one model, only receives jobs for that model.

Environment:
    ``REDIS_URL``: broker (default ``redis://127.0.0.1:6379/0``).
    ``EBB_VISIBILITY_TIMEOUT``: seconds before Redis redelivers an unacked
        message (default 7200; must exceed the slowest job).
    ``EBB_QUEUE_PREFIX``: prefix of the per-model queues (default ``explain``).
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Mapping

from celery import Celery

#: Name of the explain task; send it with ``args=[job_id]``.
TASK_EXPLAIN = "ebb.explain"
DEFAULT_QUEUE_PREFIX = "explain"
DEFAULT_VISIBILITY_TIMEOUT_S = 2 * 60 * 60

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def queue_for(model: str, environ: Mapping[str, str] | None = None) -> str:
    """The queue of ``model``'s jobs: ``explain.<model>`` (prefix from ``EBB_QUEUE_PREFIX``)."""
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        raise ValueError(f"invalid model name for a queue: {model!r}")
    env = os.environ if environ is None else environ
    prefix = env.get("EBB_QUEUE_PREFIX") or DEFAULT_QUEUE_PREFIX
    return f"{prefix}.{model}"


def celery_config(environ: Mapping[str, str] | None = None, redis_url: str | None = None) -> dict:
    """Celery settings from the environment (see the module docstring)."""
    env = os.environ if environ is None else environ
    broker = redis_url or env.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    visibility = int(env.get("EBB_VISIBILITY_TIMEOUT") or DEFAULT_VISIBILITY_TIMEOUT_S)
    if visibility <= 0:
        raise ValueError(f"EBB_VISIBILITY_TIMEOUT must be positive, got {visibility}")
    return {
        "broker_url": broker,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": visibility},
        # Results live in the database; Celery stores none.
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # A job is acknowledged only once it finished; a worker that dies
        # mid-job has it redelivered (the task is idempotent).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # The model is loaded once per process and shared by threads; a fork
        # after CUDA initialisation is unsafe, so threads it is (Celery's threads
        # pool, which worker.tasks points at worker.pool for a clean cold shutdown).
        "worker_pool": "threads",
        # Only relevant if someone forces the prefork pool: give a child's
        # worker_process_init time to load a big model.
        "worker_proc_alive_timeout": 600.0,
        # Task events for Flower and `celery events`: the web announces every
        # task it sends (task-sent), the worker the rest (received, started,
        # succeeded / failed / revoked, see worker.tasks).
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": True,
        "task_default_queue": queue_for("default", env),
        "enable_utc": True,
        "timezone": "UTC",
    }


def create_celery_app(environ: Mapping[str, str] | None = None, redis_url: str | None = None) -> Celery:
    """A new Celery app configured from ``environ`` (default ``os.environ``).

    Creating it opens no connection; the broker is contacted on first send.
    """
    app = Celery("ebb")
    app.conf.update(celery_config(environ, redis_url))
    return app


def send_explain(job_id: uuid.UUID | str, model: str, app: Celery | None = None) -> str:
    """Enqueue job ``job_id`` on ``model``'s queue; returns the Celery task id (the job id)."""
    job = str(uuid.UUID(str(job_id)))
    # The task id is the job id, as when the web sends it: monitors follow
    # one job through its re-sends.
    result = (app or celery_app).send_task(TASK_EXPLAIN, args=[job], queue=queue_for(model), task_id=job)
    return result.id


#: The process-wide app (configured from the environment at import; no I/O).
celery_app = create_celery_app()
