"""Liveness (``/healthz``) and readiness (``/readyz``) probes."""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify
from sqlalchemy import text

from shared.fleet import workers_by_model

from .db import get_db, state
from .fleet import live_workers

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """The process is up (no dependency is checked)."""
    response = jsonify({"status": "ok"})
    response.headers["Cache-Control"] = "no-store"
    return response


def _storage_problem() -> str | None:
    """Why the data store cannot take an upload now, or None when it can."""
    from shared.storage_check import StorageFault, check_storage

    st = state()
    folder = getattr(st.storage, "uploads_dir", None)
    if folder is None:
        return None
    try:
        check_storage(folder, st.settings.min_free_mb)
    except StorageFault as fault:
        log.warning("readyz: %s", fault.message)
        return fault.message
    return None


@bp.get("/readyz")
def readyz():
    """200 when the database answers ``SELECT 1``, Redis answers PING and the
    data store can take an upload (writable, ``EBB_MIN_FREE_MB`` free:
    ``checks.storage`` is ``ok``, else ``error`` with the reason in
    ``storage``) and, with an S3 store, its bucket answers
    (``checks.object_store``), else 503.

    The body also counts the live workers per model (``workers``); a model
    without a worker does not make the web unready: jobs wait for one.
    """
    checks: dict[str, str] = {}
    try:
        get_db().execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report, never raise
        log.warning("readyz: database unreachable: %s", exc)
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        import redis

        client = redis.Redis.from_url(
            state().settings.redis_url, socket_connect_timeout=1.0, socket_timeout=1.0
        )
        try:
            client.ping()
        finally:
            client.close()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        log.warning("readyz: redis unreachable: %s", exc)
        checks["redis"] = f"error: {type(exc).__name__}"
    storage_problem = _storage_problem()
    checks["storage"] = "ok" if storage_problem is None else "error"
    storage = state().storage
    if storage.kind != "file":  # STORAGE_URL=s3://...: the bucket must answer
        from shared.storage import StorageUnavailable

        try:
            storage.check()
            checks["object_store"] = "ok"
        except StorageUnavailable as exc:
            log.warning("readyz: object store unavailable: %s", exc)
            checks["object_store"] = "error: StorageUnavailable"
    failed = [name for name, result in checks.items() if result != "ok"]
    body = {"status": "ready" if not failed else "unavailable", "checks": checks}
    if storage_problem is not None:
        body["storage"] = storage_problem
    # Informational, never a failure: workers may join later (the web itself is ready).
    workers = live_workers() if checks["redis"] == "ok" else None
    if workers is not None:
        online = workers_by_model(workers)
        body["workers"] = {name: online.get(name, 0) for name in dict.fromkeys([*state().settings.models, *online])}
    if failed:
        body["failed"] = failed
    response = jsonify(body)
    response.status_code = 200 if not failed else 503
    response.headers["Cache-Control"] = "no-store"
    return response
