"""Log formatting for the web and the workers: plain text, or one JSON object per line.

``EBB_LOG_FORMAT`` = ``text`` (default) or ``json``. In JSON every record is
one line with ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
``process``, ``thread``, ``exc_info`` (the traceback, when there is one) and
every ``extra={...}`` field the caller passed: the job events carry
``event``, ``job_id``, ``model`` and, where known, ``duration_s``,
``queued_s``, ``attempt``, ``status``.

The web calls :func:`configure_logging` at start-up (``web.wsgi``, ``ebb``);
the worker's root logger belongs to Celery (``worker_hijack_root_logger``),
so :mod:`worker.tasks` re-applies the format in Celery's ``after_setup_logger``
and ``after_setup_task_logger`` signals with :func:`apply_format`.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from typing import Any, Mapping

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")

#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message", "asctime", "taskName",
}


def log_format(environ: Mapping[str, str] | None = None) -> str:
    """``EBB_LOG_FORMAT`` (``text`` or ``json``); a ValueError for anything else."""
    env = os.environ if environ is None else environ
    raw = str(env.get("EBB_LOG_FORMAT") or "text").strip().lower()
    if raw not in FORMATS:
        raise ValueError(f"EBB_LOG_FORMAT must be text or json, got {raw!r}")
    return raw


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in data:
                data[key] = _jsonable(value)
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exc_info"] = record.exc_text
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def formatter(environ: Mapping[str, str] | None = None, text_format: str = TEXT_FORMAT) -> logging.Formatter:
    """The formatter ``EBB_LOG_FORMAT`` asks for."""
    return JsonFormatter() if log_format(environ) == "json" else logging.Formatter(text_format)


def apply_format(logger: logging.Logger, environ: Mapping[str, str] | None = None) -> None:
    """With ``EBB_LOG_FORMAT=json``, put the JSON formatter on ``logger``'s handlers
    (text leaves them as they are: Celery's and gunicorn's own formats)."""
    if log_format(environ) != "json":
        return
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())


def configure_logging(level: int | str = logging.INFO, environ: Mapping[str, str] | None = None) -> None:
    """``logging.basicConfig`` with the format ``EBB_LOG_FORMAT`` asks for.

    Like ``basicConfig`` it does nothing to a root logger that already has
    handlers, except switching them to JSON when asked.
    """
    root = logging.getLogger()
    if root.handlers:
        apply_format(root, environ)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(environ))
    root.addHandler(handler)
    root.setLevel(level)
