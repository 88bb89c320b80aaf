"""Configuration read from the environment (12-factor), shared by web and worker.

Nothing here is read at import time: call :func:`load` when a process starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


#: Job submissions allowed per client when ``EBB_RATE_LIMIT`` is not set.
DEFAULT_RATE_LIMIT = "30/minute;500/hour"
#: ``EBB_RATE_LIMIT`` values that switch rate limiting off.
_RATE_LIMIT_OFF = ("0", "off", "none", "false", "no", "disabled")


@dataclass(frozen=True)
class Settings:
    """Service settings.

    Attributes:
        data_dir: root for uploads (``uploads/<sha256>``) and job artifacts
            (``jobs/<id>/``); env ``DATA_DIR``, default ``./data``.
        database_url: SQLAlchemy URL; env ``DATABASE_URL``, default
            ``sqlite:///<data_dir>/ebb.sqlite3``.
        redis_url: Celery broker; env ``REDIS_URL``.
        model: the model a worker preloads; env ``EBB_MODEL``.
        models: models offered by the web form / accepted by the API;
            env ``EBB_MODELS`` (comma separated), default: ``EBB_MODEL``.
        max_batch: worker batch cap, env ``EBB_MAX_BATCH`` (0 = automatic).
        api_tokens: bearer tokens; env ``EBB_API_TOKENS`` (comma separated).
            Empty means the service is open.
        max_upload_mb: upload size limit in MiB; env ``EBB_MAX_UPLOAD_MB``.
        weights_file: optional local weights file for ``model``; env
            ``EBB_WEIGHTS_FILE``.
        rate_limit: job submissions allowed per client, in Flask-Limiter's
            notation (``"30/minute;500/hour"``); env ``EBB_RATE_LIMIT``,
            default (also when blank) :data:`DEFAULT_RATE_LIMIT`; ``off`` disables
            it (stored as ``""``).
        rate_limit_prefix: prefix of the rate-limit counters in Redis; env
            ``EBB_RATE_LIMIT_PREFIX``, default ``<EBB_QUEUE_PREFIX>-ratelimit``
            (``explain-ratelimit``).
        trusted_proxies: number of reverse proxies in front of the web app
            whose ``X-Forwarded-*`` headers are trusted (werkzeug ``ProxyFix``);
            env ``EBB_TRUSTED_PROXIES``, default 0 (the headers are ignored).
        reconcile_interval_s: seconds between two comparisons of the ``queued``
            rows with the messages in the Redis queues (``worker.reconcile``);
            env ``EBB_RECONCILE_INTERVAL``, default 15; ``0`` turns it off.
        resend_queued_after_s: a ``queued`` job whose message is missing from
            its queue is re-sent once it was enqueued this many seconds ago;
            env ``EBB_RESEND_QUEUED_AFTER``, default 20; ``0`` (stored as
            ``None``) never re-sends.
        test_slow_scoring_s: tests only: a worker sleeps this long before
            scoring each job (a long scoring phase); env
            ``EBB_TEST_SLOW_SCORING_SECONDS``, default 0.
    """

    data_dir: Path
    database_url: str
    redis_url: str
    model: str
    models: tuple[str, ...]
    max_batch: int
    api_tokens: tuple[str, ...] = field(default=())
    max_upload_mb: float = 20.0
    weights_file: str | None = None
    rate_limit: str = DEFAULT_RATE_LIMIT
    rate_limit_prefix: str = "explain-ratelimit"
    trusted_proxies: int = 0
    reconcile_interval_s: float = 15.0
    resend_queued_after_s: float | None = 20.0
    test_slow_scoring_s: float = 0.0


def _rate_limit(value: str | None) -> str:
    value = (value or "").strip()
    if not value:
        return DEFAULT_RATE_LIMIT
    return "" if value.lower() in _RATE_LIMIT_OFF else value


def _seconds(env, name: str, default: float) -> float:
    """A non-negative, finite number of seconds from ``env[name]`` (blank: ``default``)."""
    import math

    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be 0 or more seconds, got {raw!r}")
    return value


def load(environ: dict[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    data_dir = Path(env.get("DATA_DIR", "data")).resolve()
    model = env.get("EBB_MODEL", "vgg19")
    return Settings(
        data_dir=data_dir,
        database_url=env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'ebb.sqlite3'}",
        redis_url=env.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        model=model,
        models=_csv(env.get("EBB_MODELS")) or (model,),
        max_batch=int(env.get("EBB_MAX_BATCH", "0") or 0),
        api_tokens=_csv(env.get("EBB_API_TOKENS")),
        max_upload_mb=float(env.get("EBB_MAX_UPLOAD_MB", "20")),
        weights_file=env.get("EBB_WEIGHTS_FILE") or None,
        rate_limit=_rate_limit(env.get("EBB_RATE_LIMIT")),
        rate_limit_prefix=(env.get("EBB_RATE_LIMIT_PREFIX") or "").strip()
        or f"{env.get('EBB_QUEUE_PREFIX') or 'explain'}-ratelimit",
        trusted_proxies=int(env.get("EBB_TRUSTED_PROXIES", "0") or 0),
        reconcile_interval_s=_seconds(env, "EBB_RECONCILE_INTERVAL", 15.0),
        resend_queued_after_s=_seconds(env, "EBB_RESEND_QUEUED_AFTER", 20.0) or None,
        test_slow_scoring_s=_seconds(env, "EBB_TEST_SLOW_SCORING_SECONDS", 0.0),
    )
