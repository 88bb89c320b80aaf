"""Celery tasks and worker start-up hooks. Only the worker process imports this.

Start-up (``ebb worker`` or ``celery -A worker.tasks worker``):

1. ``worker_init`` fires in the main process after the worker is configured
   and *before* any pool or consumer exists, so before a single message is
   taken. There the database is migrated, the model loaded once (this may take
   as long as it needs: no ``worker_proc_alive_timeout`` applies to the main
   process) and the reaper thread started.
2. The pool is ``threads`` (see :mod:`worker.celery_app`): there is no fork,
   so CUDA initialised in step 1 is safe, and all task threads share the one
   model. If a prefork pool is forced anyway, the model is instead loaded in
   each child (``worker_process_init``) and never in the parent.
3. ``worker_shutting_down`` sets :attr:`Runtime.stopping`: running jobs stop
   at their next progress report and are re-queued.

Monitoring: once the model is loaded, ``EBB_METRICS_PORT`` starts the
Prometheus endpoint (:mod:`worker.metrics`); Celery's logging set-up signals
apply ``EBB_LOG_FORMAT`` (:mod:`shared.logs`). Each task ends in Celery's
event stream (Flower, ``celery events``) as its job ended in the database:
``SUCCESS``, ``FAILURE`` (:class:`JobFailed`, the job's error) or ``REVOKED``
(cancelled: a ``task-revoked`` event, then :class:`~celery.exceptions.Ignore`);
a message whose job goes on elsewhere (re-queued, a duplicate) ends with
``Ignore`` and no final state. Every one of them is acknowledged, as before:
the database stays the source of truth and nothing is retried or redelivered.
"""

from __future__ import annotations

import logging
import os
import uuid

from celery import signals
from celery.exceptions import Ignore

from worker.celery_app import TASK_EXPLAIN, celery_app, send_explain

log = logging.getLogger(__name__)

# ``--pool threads`` selects worker.pool.ThreadPool: SIGQUIT hands running jobs back cleanly.
from worker.pool import install as _install_pool  # noqa: E402

_install_pool()


class JobFailed(Exception):
    """Raised by the task after its job was failed in the database, so that
    Celery reports the task as ``FAILURE`` (it is in the task's ``throws``:
    logged without a traceback; acknowledged, never retried)."""


_reaper = None
_heartbeat = None
_job_heartbeat = None
_reconciler = None
_prefork = False


def _pool_name(worker) -> str:
    pool = getattr(worker, "pool_cls", None) or celery_app.conf.worker_pool or ""
    if isinstance(pool, str):
        return pool
    return f"{getattr(pool, '__module__', '')}:{getattr(pool, '__qualname__', '')}"


def _requeue(job_id: uuid.UUID, model: str) -> None:
    send_explain(job_id, model, app=celery_app)


def start_worker_process(hostname: str | None = None) -> None:
    """Migrate the database, load the model, start the reaper, the queue
    reconciler, the job heartbeats and the fleet heartbeat (as ``hostname``,
    the Celery node name); exit on failure."""
    global _reaper, _heartbeat, _job_heartbeat, _reconciler
    from shared import settings as settings_mod
    from shared.db.migrations import upgrade_database
    from worker.reaper import DEFAULT_REAP_INTERVAL_S, ReaperThread
    from worker.runtime import load_runtime

    if not logging.getLogger().handlers:
        # Celery configures logging only after worker_init: make the model
        # load visible when started as ``celery -A worker.tasks worker``.
        from shared.logs import configure_logging

        configure_logging(logging.INFO)
    settings = settings_mod.load()
    try:
        upgrade_database(settings.database_url)
        runtime = load_runtime(settings)
        from worker import metrics

        metrics.start_server()  # EBB_METRICS_PORT; a bad or busy port stops the worker here
    except Exception as error:  # noqa: BLE001 - fatal at start-up
        expected = isinstance(error, ValueError) or type(error).__name__ == "WeightsUnavailableError"
        log.critical("worker start-up failed: %s", error, exc_info=not expected)
        # SystemExit passes through Celery's signal dispatch and stops the worker
        # before it consumes anything.
        raise SystemExit(f"ebb worker: start-up failed: {error}") from error
    if _reaper is None:
        interval = float(os.environ.get("EBB_REAP_INTERVAL") or DEFAULT_REAP_INTERVAL_S)
        if interval > 0:
            _reaper = ReaperThread(settings.database_url, runtime.heartbeat_timeout_s,
                                   runtime.max_attempts, interval_s=interval, send=_requeue,
                                   jobs_dir=getattr(runtime.storage, "jobs_dir", None),
                                   retention_days=settings.retention_days, storage=runtime.storage,
                                   redis_url=settings.redis_url)
            _reaper.start()
    if _reconciler is None and settings.reconcile_interval_s > 0 and settings.resend_queued_after_s:
        from worker.reconcile import ReconcileThread

        _reconciler = ReconcileThread(settings.database_url, settings.redis_url, settings.reconcile_interval_s,
                                      settings.resend_queued_after_s, send=_requeue)
        _reconciler.start()
    if _job_heartbeat is None:
        from shared import fleet
        from worker.heartbeat import JobHeartbeat, job_heartbeat_interval

        _job_heartbeat = JobHeartbeat(runtime, job_heartbeat_interval(runtime.heartbeat_timeout_s,
                                                                      fleet.interval_s())).start()
    if _heartbeat is None:
        from shared import fleet
        from worker.heartbeat import FleetHeartbeat

        _heartbeat = FleetHeartbeat(runtime, hostname or runtime.hostname, settings.redis_url,
                                    fleet.interval_s()).start()
        log.info("worker %s serving %s joined the fleet", _heartbeat.hostname, runtime.model_name)


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _on_setup_logger(logger=None, **_kwargs) -> None:
    from shared.logs import apply_format

    if logger is not None:
        apply_format(logger)


@signals.worker_init.connect
def _on_worker_init(sender=None, **_kwargs) -> None:
    global _prefork
    name = _pool_name(sender).lower()
    if "prefork" in name:
        _prefork = True
        log.warning("prefork pool: the model is loaded in each child, not in the parent")
        from shared import settings as settings_mod
        from shared.db.migrations import upgrade_database

        upgrade_database(settings_mod.load().database_url)
        return
    start_worker_process(getattr(sender, "hostname", None))


@signals.worker_process_init.connect
def _on_worker_process_init(**_kwargs) -> None:
    if _prefork:
        from shared.db.session import dispose_engines

        dispose_engines()
        start_worker_process()


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**_kwargs) -> None:
    from worker import runtime as runtime_mod

    if runtime_mod._runtime is not None:
        runtime_mod._runtime.stopping.set()
    if _reaper is not None:
        _reaper.stop()
    if _reconciler is not None:
        _reconciler.stop()
    # The job heartbeats go on until the process ends: the jobs still running
    # stop at their next step and are handed back meanwhile.
    if _heartbeat is not None:
        _heartbeat.stop()


def report_outcome(task, outcome: str, details: dict) -> str:
    """End the Celery task as its job ended (see the module docstring); returns
    ``outcome`` when the task should succeed, else raises."""
    status = details.get("job_status")
    if status == "cancelled":
        if task.app.conf.worker_send_task_events:
            task.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore()
    if status == "failed":
        raise JobFailed(details.get("error") or "the job failed")
    if outcome in ("requeued", "superseded") or status in ("queued", "running"):
        raise Ignore()
    return outcome


@celery_app.task(name=TASK_EXPLAIN, bind=True, acks_late=True, ignore_result=True, throws=(JobFailed,))
def explain_task(self, job_id: str) -> str:
    """Run explain job ``job_id`` (its row holds everything); idempotent."""
    from worker.jobs import run_job
    from worker.runtime import get_runtime

    hostname = getattr(self.request, "hostname", None)
    details: dict = {}
    outcome = run_job(job_id, get_runtime(), hostname=hostname, requeue=_requeue, details=details)
    return report_outcome(self, outcome, details)
