"""gunicorn settings of the web front end.

Used by ``ebb web``, ``Dockerfile.web`` and the compose file as
``gunicorn -c python:web.gunicorn_conf web.wsgi:app``; command-line flags
(``--bind``, ``--workers``) override what is set here.

Prometheus (``/metrics``, :mod:`web.metrics`) in multiprocess mode: every
gunicorn worker writes its counters to files in ``PROMETHEUS_MULTIPROC_DIR``
and ``/metrics`` adds them up. This module runs in the master before any
worker is forked, so it sets that variable for them: to a fresh temporary
folder when unset (removed at exit), else it empties the folder named (the
client's docs: wipe it between runs). ``child_exit`` tells the client a
worker died (``mark_process_dead``), for its live gauges.

Workers are :class:`web.gunicorn_worker.JsonThreadWorker` (gunicorn's
``gthread`` with JSON early errors and a whole-request deadline):
``EBB_WEB_THREADS`` threads each (default 16), ``EBB_WEB_TIMEOUT`` (30 s)
as gunicorn's ``timeout``, ``EBB_WEB_BODY_TIMEOUT`` (30 s) for a client to
send a request (see :class:`shared.settings.Settings`).

``EBB_LOG_FORMAT=json`` also turns gunicorn's own error and access logs into
JSON lines (:class:`shared.logs.JsonFormatter`).
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import tempfile

bind = os.environ.get("EBB_WEB_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("EBB_WEB_WORKERS", "4") or 4)
accesslog = "-"


def _server_settings():
    from shared.settings import load

    return load()


_settings = _server_settings()
worker_class = "web.gunicorn_worker.JsonThreadWorker"
threads = _settings.web_threads
timeout = max(1, round(_settings.web_timeout))  # gunicorn wants whole seconds


def _multiprocess_dir() -> str:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
        return path
    path = tempfile.mkdtemp(prefix="ebb-prometheus-")
    master = os.getpid()

    def remove() -> None:
        if os.getpid() == master:  # not in a forked worker exiting
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


_multiprocess_dir()


def child_exit(server, worker) -> None:  # noqa: ARG001 - gunicorn's hook signature
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _logconfig() -> dict | None:
    from shared.logs import log_format

    if log_format() != "json":
        return None
    handler = {"class": "logging.StreamHandler", "formatter": "json"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "shared.logs.JsonFormatter"}},
        "handlers": {"error": {**handler, "stream": "ext://sys.stderr"},
                     "access": {**handler, "stream": "ext://sys.stdout"}},
        "root": {"level": "INFO", "handlers": ["error"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        },
    }


_json_logs = _logconfig()
if _json_logs is not None:
    logconfig_dict = _json_logs
