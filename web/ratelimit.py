"""Per-client rate limits on job submission (Flask-Limiter, counters in Redis).

``EBB_RATE_LIMIT`` (default ``30/minute;500/hour``, ``off`` to disable) is one
budget shared by ``POST /api/v1/jobs`` and the upload form's ``POST /``; the
same limit applies, separately, to failed logins on ``POST /login``.

Clients are told apart by their owner (the name of their API token) when they send a valid one (so
several users behind one NAT have their own budgets), else by the remote
address. Behind a reverse proxy the remote address is the proxy's: set
``EBB_TRUSTED_PROXIES`` to the number of proxies in front of the app and the
address is taken from ``X-Forwarded-For`` (werkzeug ``ProxyFix``, see
:func:`web.create_app`). Never set it when clients can reach the app directly:
they could then choose their own address.

Counters live in Redis (``REDIS_URL``) under keys prefixed with
``EBB_RATE_LIMIT_PREFIX`` (default ``<EBB_QUEUE_PREFIX>-ratelimit``), so every
gunicorn worker shares them. If Redis is unreachable the limiter falls back to
per-process in-memory counters and never turns a request into an error: the
submission then fails with the 503 ``queue_unavailable`` it gives whenever the
queue is down.

A refused request gets a 429 (JSON ``too_many_requests`` under ``/api``, the
form page with a message for the form) with a ``Retry-After`` header in
seconds; limited endpoints also send ``X-RateLimit-Limit/Remaining/Reset``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from flask import Flask, Response, current_app, g, request

log = logging.getLogger(__name__)

#: Endpoints sharing the job-submission budget.
SUBMIT_ENDPOINTS = ("api.create_job", "pages.submit")
#: Endpoint of the login form (only failed attempts count).
LOGIN_ENDPOINT = "auth.login"


def client_key() -> str:
    """The rate-limit identity of the current request.

    ``owner:<name>`` for a request authenticated with a token (or a login) of
    owner ``name`` (see :mod:`web.auth`), else ``ip:<remote address>``.
    """
    owner = g.get("ebb_owner")
    if owner is not None:
        return f"owner:{owner.name}"
    return f"ip:{request.remote_addr or 'unknown'}"


def get_limiter(app: Flask | None = None) -> Any:
    """The app's :class:`flask_limiter.Limiter`, or None when rate limiting is off."""
    app = app or current_app
    return app.extensions.get("ebb_limiter")


def retry_after_seconds(default: int = 60) -> int:
    """Seconds until the limit that refused the current request resets (at least 1)."""
    limiter = get_limiter()
    try:
        current = limiter.current_limit if limiter is not None else None
        if current is not None:
            return max(1, int(math.ceil(current.reset_at - time.time())))
    except Exception:  # noqa: BLE001 - the storage failing: a default is good enough
        log.debug("could not compute Retry-After", exc_info=True)
    return default


def _strip_retry_after(response: Response) -> Response:
    # Flask-Limiter writes Retry-After on every limited response; it only
    # means something on a refusal (or a 503).
    if g.get("ebb_retry_after"):  # an error's own Retry-After (a quota, a running job)
        response.headers["Retry-After"] = g.ebb_retry_after
    elif response.status_code not in (429, 503):
        response.headers.pop("Retry-After", None)
    return response


def init_app(app: Flask, settings: Any) -> None:
    """Create the app's limiter and attach the limits to the submit and login views.

    Call after the blueprints are registered. Does nothing when
    ``settings.rate_limit`` is empty (``EBB_RATE_LIMIT=off``).
    """
    if not settings.rate_limit:
        log.warning("EBB_RATE_LIMIT is off: job submissions are not rate limited")
        return
    from flask_limiter import Limiter
    from limits import parse_many

    try:
        parse_many(settings.rate_limit)
    except ValueError as exc:
        raise ValueError(
            f"EBB_RATE_LIMIT={settings.rate_limit!r} is not a valid rate limit "
            "(expected e.g. '30/minute;500/hour')"
        ) from exc

    # Registered before the limiter's own after_request, so it runs after it.
    app.after_request(_strip_retry_after)
    limiter = Limiter(
        key_func=client_key,
        storage_uri=settings.redis_url,
        storage_options={
            "key_prefix": settings.rate_limit_prefix,
            "socket_connect_timeout": 1.0,
            "socket_timeout": 1.0,
        },
        strategy="fixed-window",
        headers_enabled=True,
        retry_after="delta-seconds",
        swallow_errors=True,
        in_memory_fallback_enabled=True,
    )
    limiter.init_app(app)
    app.extensions["ebb_limiter"] = limiter

    submit_limit = limiter.shared_limit(settings.rate_limit, scope="submit")
    for endpoint in SUBMIT_ENDPOINTS:
        app.view_functions[endpoint] = submit_limit(app.view_functions[endpoint])
    if LOGIN_ENDPOINT in app.view_functions:
        login_limit = limiter.shared_limit(
            settings.rate_limit, scope="login", methods=["POST"],
            deduct_when=lambda response: response.status_code == 401,
        )
        app.view_functions[LOGIN_ENDPOINT] = login_limit(app.view_functions[LOGIN_ENDPOINT])
