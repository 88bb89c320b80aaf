"""The worker's Celery pool: Celery's ``threads`` pool, plus a clean cold shutdown.

On SIGQUIT (cold shutdown) Celery cancels the running tasks with
``pool.terminate_job``, which the threads pool does not implement: it logged a
CRITICAL ``NotImplementedError`` and the worker hung. A thread cannot be
killed; here terminating a job sets :attr:`worker.runtime.Runtime.stopping`
instead, so every running job stops at its next step and is handed back to the
queue (as on SIGTERM), and the worker exits.

:func:`install` (called when :mod:`worker.tasks` is imported, i.e. only in a
worker) makes Celery's ``threads`` pool name mean this class, so ``--pool
threads`` and ``worker_pool = "threads"`` select it; importing the Celery app
stays light.
"""

from __future__ import annotations

import logging

from celery.concurrency.thread import TaskPool

log = logging.getLogger(__name__)

#: What the ``threads`` pool name resolves to once :func:`install` ran.
POOL = "worker.pool:ThreadPool"


class ThreadPool(TaskPool):
    """Celery's threads pool whose ``terminate_job`` asks running jobs to stop."""

    def terminate_job(self, pid, signal=None):  # noqa: D401 - Celery's API
        from worker import runtime as runtime_mod

        runtime = runtime_mod._runtime
        if runtime is not None and not runtime.stopping.is_set():
            log.info("cold shutdown: running jobs stop at their next step and are handed back")
            runtime.stopping.set()


def install() -> None:
    """Make the ``threads`` pool name select :class:`ThreadPool`."""
    from celery import concurrency

    concurrency.ALIASES["threads"] = POOL
