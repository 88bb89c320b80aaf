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
"""

from __future__ import annotations

import logging
import os
import uuid

from celery import signals

from worker.celery_app import TASK_EXPLAIN, celery_app, send_explain

log = logging.getLogger(__name__)

_reaper = None
_heartbeat = None
_prefork = False


def _pool_name(worker) -> str:
    pool = getattr(worker, "pool_cls", None) or celery_app.conf.worker_pool or ""
    if isinstance(pool, str):
        return pool
    return f"{getattr(pool, '__module__', '')}:{getattr(pool, '__qualname__', '')}"


def _requeue(job_id: uuid.UUID, model: str) -> None:
    send_explain(job_id, model, app=celery_app)


def start_worker_process(hostname: str | None = None) -> None:
    """Migrate the database, load the model, start the reaper and the fleet
    heartbeat (as ``hostname``, the Celery node name); exit on failure."""
    global _reaper, _heartbeat
    from shared import settings as settings_mod
    from shared.db.migrations import upgrade_database
    from worker.reaper import DEFAULT_REAP_INTERVAL_S, ReaperThread, resend_queued_after_s
    from worker.runtime import load_runtime

    if not logging.getLogger().handlers:
        # Celery configures logging only after worker_init: make the model
        # load visible when started as ``celery -A worker.tasks worker``.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_mod.load()
    try:
        upgrade_database(settings.database_url)
        runtime = load_runtime(settings)
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
                                   requeue_queued_after_s=resend_queued_after_s(),
                                   jobs_dir=runtime.storage.jobs_dir)
            _reaper.start()
    if _heartbeat is None:
        from shared import fleet
        from worker.heartbeat import FleetHeartbeat

        _heartbeat = FleetHeartbeat(runtime, hostname or runtime.hostname, settings.redis_url,
                                    fleet.interval_s()).start()
        log.info("worker %s serving %s joined the fleet", _heartbeat.hostname, runtime.model_name)


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
    if _heartbeat is not None:
        _heartbeat.stop()


@celery_app.task(name=TASK_EXPLAIN, bind=True, acks_late=True, ignore_result=True)
def explain_task(self, job_id: str) -> str:
    """Run explain job ``job_id`` (its row holds everything); idempotent."""
    from worker.jobs import run_job
    from worker.runtime import get_runtime

    hostname = getattr(self.request, "hostname", None)
    return run_job(job_id, get_runtime(), hostname=hostname, requeue=_requeue)
