"""Flask front end: upload form, live job pages and the JSON API.

The web side never imports torch (nor cv2): it validates uploads and settings,
stores the upload, records a :class:`~shared.db.models.Job` and queues an
``ebb.explain`` Celery task by name for the workers to pick up.

Run it with ``gunicorn web.wsgi:app``; :func:`create_app` is the application
factory (as in the Flask tutorial).

Access control is :mod:`web.auth` (``EBB_API_TOKENS``), submission rate limits
:mod:`web.ratelimit` (``EBB_RATE_LIMIT``, ``EBB_TRUSTED_PROXIES``).
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

from flask import Flask

from shared import settings as settings_mod
from shared.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["create_app", "WebState"]


@dataclass
class WebState:
    """Per-application state kept in ``app.extensions["ebb"]``."""

    settings: Settings
    storage: Any
    session_factory: Any
    labels: list[str]
    celery: Any = None
    label_index: dict[str, int] = field(default_factory=dict)
    #: Redis client for the fleet's heartbeats (created on first use, see web.fleet).
    redis: Any = None


def _secret_key() -> str:
    key = os.environ.get("EBB_SECRET_KEY", "").strip()
    if key:
        return key
    log.warning(
        "EBB_SECRET_KEY is not set: using a random secret key. Sessions and CSRF "
        "tokens will not survive a restart nor work across several web processes; "
        "set EBB_SECRET_KEY in production."
    )
    return secrets.token_hex(32)


def _flag(env: Mapping[str, str], name: str) -> bool:
    """A boolean environment variable: ``1/true/yes/on`` or ``0/false/no/off`` (default)."""
    raw = str(env.get(name) or "0").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0, got {raw!r}")


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Create the Flask application.

    Settings come from the environment through :func:`shared.settings.load`.
    ``test_config`` overrides Flask configuration keys; it may also carry
    ``EBB_SETTINGS`` (a :class:`~shared.settings.Settings`) or ``EBB_ENV``
    (a mapping used instead of ``os.environ``) and ``EBB_MIGRATE`` (bool,
    default True: run the Alembic migrations at start-up).
    """
    test_config = dict(test_config or {})
    app = Flask(__name__, instance_relative_config=False)

    settings: Settings | None = test_config.pop("EBB_SETTINGS", None)
    env = test_config.pop("EBB_ENV", None)
    if settings is None:
        settings = settings_mod.load(env)
    migrate = bool(test_config.pop("EBB_MIGRATE", True))
    secure_cookies = _flag(env if env is not None else os.environ, "EBB_SECURE_COOKIES")

    app.config.from_mapping(
        SECRET_KEY=_secret_key(),
        MAX_CONTENT_LENGTH=int(settings.max_upload_mb * 1024 * 1024),
        WTF_CSRF_TIME_LIMIT=None,  # tokens live as long as the session
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        # Behind HTTPS, the session cookie (login, CSRF) is never sent in clear.
        SESSION_COOKIE_SECURE=secure_cookies,
        JOBS_PER_PAGE=20,
        # Connection timeout (seconds) for the broker when queueing a job.
        BROKER_CONNECT_TIMEOUT=2.0,
    )
    app.config.update(test_config)
    app.debug = bool(test_config.get("DEBUG", False))
    app.json.sort_keys = False  # type: ignore[attr-defined]

    # Imports that pull SQLAlchemy, Celery, Pillow... stay inside the factory.
    from shared.db.session import session_factory, upgrade
    from shared.models.labels import imagenet_labels
    from shared.storage import open_storage
    from worker.celery_app import create_celery_app

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate:
        upgrade(settings.database_url)
    labels = list(imagenet_labels())
    storage = open_storage(settings)
    if storage.kind == "s3":
        storage.ensure_bucket()  # best effort: a store that is down answers 503 per request
    state = WebState(
        settings=settings,
        storage=storage,
        session_factory=session_factory(settings.database_url),
        labels=labels,
        celery=create_celery_app(redis_url=settings.redis_url),
        label_index={label: i for i, label in enumerate(labels)},
    )
    app.extensions["ebb"] = state

    from . import api, auth, db, errors, health, metrics, pages, ratelimit, security

    if settings.trusted_proxies > 0:
        # Behind N trusted reverse proxies: take the client address, scheme,
        # host and prefix from their X-Forwarded-* headers (never otherwise:
        # a direct client could forge them, e.g. to dodge the rate limit).
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n, x_prefix=n
        )

    db.init_app(app)
    auth.init_app(app)  # first before_request: nothing runs for an unauthenticated request
    security.init_app(app)
    errors.init_app(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    security.csrf.exempt(api.bp)
    security.csrf.exempt(health.bp)
    ratelimit.init_app(app, settings)
    return app
