"""Configuration read from the environment (12-factor), shared by web and worker.

Nothing here is read at import time: call :func:`load` when a process starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


#: Job submissions allowed per client when ``EBB_RATE_LIMIT`` is not set.
DEFAULT_RATE_LIMIT = "30/minute;500/hour"
#: Admission limits (see :mod:`shared.cost`) when their variables are not set.
DEFAULT_MAX_JOB_MEMORY = 4 * 2**30
DEFAULT_MAX_JOB_WORK = 100_000
DEFAULT_MAX_PIXELS = 25_000_000
DEFAULT_MAX_ARTIFACT_SIDE = 2048
#: Hours a login session lasts when ``EBB_SESSION_HOURS`` is not set.
DEFAULT_SESSION_HOURS = 12.0
#: Owner of the bare ``<token>`` entries of ``EBB_API_TOKENS`` and of every job
#: created while no tokens are configured.
DEFAULT_OWNER = "default"
_OWNER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
#: Quotas (issue 15) when their variables are not set.
DEFAULT_MAX_ITERATIONS = 2000
DEFAULT_MAX_QUEUED_PER_OWNER = 20
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
        api_tokens: the entries of ``EBB_API_TOKENS`` (comma separated):
            ``<token>`` (owner ``default``), ``name:<token>`` or
            ``name:<token>:admin``; see :func:`parse_api_tokens` and
            :attr:`token_entries`. Empty (and no token made with
            ``ebb tokens create``) means the service is open.
        session_hours: lifetime of a login session in hours (server side, so
            logout revokes it); env ``EBB_SESSION_HOURS``, default 12.
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
        storage_url: where uploads and artifacts live; env ``STORAGE_URL``:
            ``file:///path`` (default ``file://<data_dir>``, one machine or a
            shared disk) or ``s3://bucket/prefix`` (any S3-compatible store;
            credentials from the standard ``AWS_ACCESS_KEY_ID`` /
            ``AWS_SECRET_ACCESS_KEY`` variables, read by boto3).
        s3_endpoint_url: the S3 service's URL (MinIO, SeaweedFS...); env
            ``S3_ENDPOINT_URL``, default AWS.
        s3_region: env ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, default ``us-east-1``.
        presigned_urls: redirect artifact downloads to short-lived presigned
            URLs of the S3 store instead of streaming them through the web;
            env ``EBB_PRESIGNED_URLS`` (``1``/``0``), default off.
        presigned_ttl_s: lifetime of a presigned URL; env ``EBB_PRESIGNED_TTL``,
            default 300 s.
        storage_retries: attempts of a worker's store read or write
            (exponential backoff from 0.5 s, at most 8 s apart, so 8 attempts
            span ~30 s; the job's heartbeat is kept up meanwhile) before the
            job fails; env ``EBB_STORAGE_RETRIES``, default 8.
        storage_timeout_s: connect timeout of a store request; env
            ``EBB_STORAGE_TIMEOUT``, default 2 s (a submission to a store that is
            down answers 503 within a few seconds).
        store_sweep_age_s: objects of killed or superseded attempts (S3
            prefixes no job row points at) older than this are deleted by the
            worker's sweeper; env ``EBB_STORE_SWEEP_AGE``, default 3600 s.
        reuse: answer a submission identical to a succeeded job from that
            job's artifacts; env ``EBB_REUSE`` (``1``/``0``), default on.
        arithmetic: the settings that change a job's arithmetic besides its
            config (``EBB_REPRODUCIBLE``, ``EBB_LAYOUT_WIDTH``,
            ``EBB_WEIGHTS_FILE``, as given); part of the reuse key.
        web_threads: threads per gunicorn worker process (the
            :class:`web.gunicorn_worker.JsonThreadWorker`); env
            ``EBB_WEB_THREADS``, default 16.
        web_timeout: gunicorn's worker ``timeout`` in seconds (a worker
            silent that long is restarted); env ``EBB_WEB_TIMEOUT``, default 30.
        web_body_timeout: seconds a client has to send a whole request
            (headers and body) once it started; slower ones get a JSON 408;
            env ``EBB_WEB_BODY_TIMEOUT``, default 30.
        min_free_mb: free space (MiB) ``data_dir`` must keep for an upload to
            be accepted (else 507 ``insufficient_storage``) and for ``/readyz``
            to say ready; env ``EBB_MIN_FREE_MB``, default 100.
        max_job_memory: admission limit on a job's estimated memory in bytes
            (:mod:`shared.cost`); env ``EBB_MAX_JOB_MEMORY`` (``4GiB``,
            ``512MiB``, ``2GB`` or bytes), default 4 GiB.
        max_job_work: admission limit on a job's mask-iterations (targets x
            iterations x areas); env ``EBB_MAX_JOB_WORK``, default 100000.
        max_pixels: largest decoded image (width x height), checked from the
            image header before decoding; env ``EBB_MAX_PIXELS``, default
            25000000.
        job_timeout_s: a job's time budget in seconds; env ``EBB_JOB_TIMEOUT``:
            ``auto`` (default, stored as None: max(600 s, 10 x the cost
            model's estimate)) or a number of seconds.
        max_artifact_side: longest side in pixels of the overlay, saliency and
            Grad-CAM images (and ``saliency.npy``); env
            ``EBB_MAX_ARTIFACT_SIDE``, default 2048.
        device_memory: memory budget in bytes of the worker engine's batch;
            env ``EBB_DEVICE_MEMORY``, default None: what the device reports.
        max_iterations: most optimisation steps one job may ask for; env
            ``EBB_MAX_ITERATIONS``, default 2000.
        max_queued_per_owner: most queued + running jobs one owner may have;
            env ``EBB_MAX_QUEUED_PER_OWNER``, default 20.
        work_budget: most mask-iterations (targets x iterations x areas) one
            owner may have accepted in any hour; env ``EBB_WORK_BUDGET``,
            default None (no budget).
        retention_days: the reaper deletes finished jobs (rows, artifacts,
            unused uploads) older than this many days; env
            ``EBB_RETENTION_DAYS``, default None (keep forever).
        test_slow_scoring_s: TEST ONLY: seconds the worker sleeps before
            scoring each target, so a test can cancel during scoring; env
            ``EBB_TEST_SLOW_SCORING_SECONDS``, default 0. Never set it in
            production.
    """

    data_dir: Path
    database_url: str
    redis_url: str
    model: str
    models: tuple[str, ...]
    max_batch: int
    api_tokens: tuple[str, ...] = field(default=())
    session_hours: float = DEFAULT_SESSION_HOURS
    max_upload_mb: float = 20.0
    weights_file: str | None = None
    rate_limit: str = DEFAULT_RATE_LIMIT
    rate_limit_prefix: str = "explain-ratelimit"
    trusted_proxies: int = 0
    reconcile_interval_s: float = 15.0
    resend_queued_after_s: float | None = 20.0
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    presigned_urls: bool = False
    presigned_ttl_s: int = 300
    storage_retries: int = 8
    storage_timeout_s: float = 2.0
    store_sweep_age_s: float = 3600.0
    reuse: bool = True
    arithmetic: tuple[tuple[str, str], ...] = ()
    web_threads: int = 16
    web_timeout: float = 30.0
    web_body_timeout: float = 30.0
    min_free_mb: float = 100.0
    max_job_memory: int = DEFAULT_MAX_JOB_MEMORY
    max_job_work: int = DEFAULT_MAX_JOB_WORK
    max_pixels: int = DEFAULT_MAX_PIXELS
    job_timeout_s: float | None = None
    max_artifact_side: int = DEFAULT_MAX_ARTIFACT_SIDE
    device_memory: int | None = None
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    max_queued_per_owner: int = DEFAULT_MAX_QUEUED_PER_OWNER
    work_budget: int | None = None
    retention_days: float | None = None
    test_slow_scoring_s: float = 0.0

    @property
    def storage(self) -> str:
        """``file://<data_dir>`` when ``storage_url`` is blank."""
        return self.storage_url or f"file://{self.data_dir}"

    @property
    def token_entries(self) -> tuple[TokenEntry, ...]:
        """``api_tokens`` parsed (validated once at :func:`load`)."""
        return parse_api_tokens(self.api_tokens)


@dataclass(frozen=True)
class TokenEntry:
    """One entry of ``EBB_API_TOKENS``: the owner ``name``, the token, the admin flag."""

    name: str
    token: str
    admin: bool = False


def valid_owner_name(name: str) -> bool:
    """True for 1-64 characters of ``A-Z a-z 0-9 _ . @ -`` starting with a letter or digit."""
    return bool(_OWNER_NAME.match(name or ""))


def parse_api_tokens(entries: tuple[str, ...]) -> tuple[TokenEntry, ...]:
    """Parse ``EBB_API_TOKENS`` entries: ``<token>`` (owner ``default``),
    ``name:<token>`` or ``name:<token>:admin``. Raises ValueError on a bad entry
    (an invalid name, an empty token, a third part other than ``admin``, or one
    token given twice)."""
    out: list[TokenEntry] = []
    seen: set[str] = set()
    for position, entry in enumerate(entries, start=1):
        parts = entry.split(":")
        admin = False
        if len(parts) == 1:
            name, token = DEFAULT_OWNER, parts[0]
        elif len(parts) == 2:
            name, token = parts
        elif len(parts) == 3 and parts[2].strip().lower() == "admin":
            name, token, admin = parts[0], parts[1], True
        else:
            raise ValueError(
                f"EBB_API_TOKENS entry {position} must be <token>, name:<token> or "
                "name:<token>:admin")
        name, token = name.strip(), token.strip()
        if not valid_owner_name(name):
            raise ValueError(
                f"EBB_API_TOKENS entry {position}: the name must be 1-64 characters of "
                "letters, digits, '_', '.', '@' or '-'")
        if not token:
            raise ValueError(f"EBB_API_TOKENS entry {position}: the token is empty")
        if token in seen:
            raise ValueError(f"EBB_API_TOKENS entry {position}: this token is given twice")
        seen.add(token)
        out.append(TokenEntry(name=name, token=token, admin=admin))
    return tuple(out)


def _session_hours(env) -> float:
    raw = str(env.get("EBB_SESSION_HOURS") or "").strip()
    if not raw:
        return DEFAULT_SESSION_HOURS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"EBB_SESSION_HOURS must be a positive number of hours, got {raw!r}")
    return value


def _rate_limit(value: str | None) -> str:
    value = (value or "").strip()
    if not value:
        return DEFAULT_RATE_LIMIT
    return "" if value.lower() in _RATE_LIMIT_OFF else value


def _interval(env, name: str, default: float) -> float:
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


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _flag(env, name: str, default: bool) -> bool:
    raw = str(env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name} must be 1 or 0, got {raw!r}")


def _storage_url(value: str | None, data_dir: Path) -> str:
    value = (value or "").strip()
    if not value:
        return f"file://{data_dir}"
    if value.startswith("file://"):
        path = value[len("file://"):]
        if not path.startswith("/"):
            raise ValueError(f"STORAGE_URL file:// needs an absolute path (file:///data), got {value!r}")
        return value
    if value.startswith("s3://"):
        bucket = value[len("s3://"):].split("/", 1)[0]
        if not bucket:
            raise ValueError(f"STORAGE_URL s3:// needs a bucket (s3://bucket/prefix), got {value!r}")
        return value
    raise ValueError(f"STORAGE_URL must start with file:// or s3://, got {value!r}")
def _number(env, name: str, default: float, minimum: float, cast=float):
    """``env[name]`` as ``cast`` (``default`` when unset or blank); ``ValueError``
    naming the variable when it is not a number or is below ``minimum``."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return cast(default)
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:  # also rejects NaN
        raise ValueError(f"{name} must be at least {minimum:g}, got {raw!r}")
    return value


def _positive_int(env, name: str, default: int) -> int:
    raw = str(env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _bytes(env, name: str, default: int | None) -> int | None:
    from shared.cost import parse_bytes

    raw = str(env.get(name) or "").strip()
    if not raw:
        return default
    try:
        return parse_bytes(raw)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _job_timeout(env) -> float | None:
    raw = str(env.get("EBB_JOB_TIMEOUT") or "").strip().lower()
    if raw in ("", "auto"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"EBB_JOB_TIMEOUT must be auto or a positive number of seconds, got {raw!r}")
    return value


def _optional_int(env, name: str) -> int | None:
    """A positive integer, or None when unset or blank."""
    if not str(env.get(name) or "").strip():
        return None
    return _positive_int(env, name, 0)


def _retention_days(env) -> float | None:
    raw = str(env.get("EBB_RETENTION_DAYS") or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"EBB_RETENTION_DAYS must be a positive number of days, got {raw!r}")
    return value


def _seconds(env, name: str) -> float:
    raw = str(env.get(name) or "").strip()
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    return max(0.0, value)


def load(environ: dict[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    data_dir = Path(env.get("DATA_DIR", "data")).resolve()
    model = env.get("EBB_MODEL", "vgg19")
    api_tokens = _csv(env.get("EBB_API_TOKENS"))
    parse_api_tokens(api_tokens)  # fail at start-up on a malformed entry
    return Settings(
        data_dir=data_dir,
        database_url=env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'ebb.sqlite3'}",
        redis_url=env.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        model=model,
        models=_csv(env.get("EBB_MODELS")) or (model,),
        max_batch=int(env.get("EBB_MAX_BATCH", "0") or 0),
        api_tokens=api_tokens,
        session_hours=_session_hours(env),
        max_upload_mb=float(env.get("EBB_MAX_UPLOAD_MB", "20")),
        weights_file=env.get("EBB_WEIGHTS_FILE") or None,
        rate_limit=_rate_limit(env.get("EBB_RATE_LIMIT")),
        rate_limit_prefix=(env.get("EBB_RATE_LIMIT_PREFIX") or "").strip()
        or f"{env.get('EBB_QUEUE_PREFIX') or 'explain'}-ratelimit",
        trusted_proxies=int(env.get("EBB_TRUSTED_PROXIES", "0") or 0),
        reconcile_interval_s=_interval(env, "EBB_RECONCILE_INTERVAL", 15.0),
        resend_queued_after_s=_interval(env, "EBB_RESEND_QUEUED_AFTER", 20.0) or None,
        storage_url=_storage_url(env.get("STORAGE_URL"), data_dir),
        s3_endpoint_url=(env.get("S3_ENDPOINT_URL") or "").strip() or None,
        s3_region=(env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1").strip(),
        presigned_urls=_flag(env, "EBB_PRESIGNED_URLS", False),
        presigned_ttl_s=max(1, int(env.get("EBB_PRESIGNED_TTL", "300") or 300)),
        storage_retries=max(1, int(env.get("EBB_STORAGE_RETRIES", "8") or 8)),
        storage_timeout_s=float(env.get("EBB_STORAGE_TIMEOUT", "2") or 2),
        store_sweep_age_s=float(env.get("EBB_STORE_SWEEP_AGE", "3600") or 3600),
        reuse=_flag(env, "EBB_REUSE", True),
        arithmetic=tuple(
            (name, str(env.get(name) or "").strip())
            for name in ("EBB_REPRODUCIBLE", "EBB_LAYOUT_WIDTH", "EBB_WEIGHTS_FILE")
        ),
        web_threads=_number(env, "EBB_WEB_THREADS", 16, 1, int),
        web_timeout=_number(env, "EBB_WEB_TIMEOUT", 30.0, 1.0),
        web_body_timeout=_number(env, "EBB_WEB_BODY_TIMEOUT", 30.0, 0.1),
        min_free_mb=_number(env, "EBB_MIN_FREE_MB", 100.0, 0.0),
        max_job_memory=_bytes(env, "EBB_MAX_JOB_MEMORY", DEFAULT_MAX_JOB_MEMORY) or DEFAULT_MAX_JOB_MEMORY,
        max_job_work=_positive_int(env, "EBB_MAX_JOB_WORK", DEFAULT_MAX_JOB_WORK),
        max_pixels=_positive_int(env, "EBB_MAX_PIXELS", DEFAULT_MAX_PIXELS),
        job_timeout_s=_job_timeout(env),
        max_artifact_side=_positive_int(env, "EBB_MAX_ARTIFACT_SIDE", DEFAULT_MAX_ARTIFACT_SIDE),
        device_memory=_bytes(env, "EBB_DEVICE_MEMORY", None),
        max_iterations=_positive_int(env, "EBB_MAX_ITERATIONS", DEFAULT_MAX_ITERATIONS),
        max_queued_per_owner=_positive_int(env, "EBB_MAX_QUEUED_PER_OWNER", DEFAULT_MAX_QUEUED_PER_OWNER),
        work_budget=_optional_int(env, "EBB_WORK_BUDGET"),
        retention_days=_retention_days(env),
        test_slow_scoring_s=_seconds(env, "EBB_TEST_SLOW_SCORING_SECONDS"),
    )
