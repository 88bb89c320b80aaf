"""API tokens and owners (``EBB_API_TOKENS``), and a login page for browsers.

Tokens have names: ``EBB_API_TOKENS=lab-a:<token>,lab-b:<token>,ops:<token>:admin``
(a bare ``<token>`` has the name ``default``); ``ebb tokens create NAME [--admin]``
adds tokens to the database (only their SHA-256 is stored). The name of the
token a request comes with is its *owner* (:func:`current_owner`): every job
records it, and an owner sees only their own jobs; an admin token sees all.

When tokens are configured (in ``EBB_API_TOKENS`` or in the database), every
request needs either

* ``Authorization: Bearer <token>`` with one of the tokens, or
* a browser session that logged in at ``/login`` with one of them.

Without them the API answers 401 JSON ``{"error": {"code": "unauthorized"}}``
with ``WWW-Authenticate: Bearer``, and HTML pages redirect to
``/login?next=<the page>``. ``/healthz``, ``/readyz``, static files, the login
page and ``/api/v1/openapi.json`` stay open.

Login sessions live on the server (table ``login_sessions``): the signed
cookie carries only a random session id. Logging out revokes the session; a
session expires after ``EBB_SESSION_HOURS`` (default 12) and ends when the
token it logged in with is no longer configured. A session-authenticated
request that changes something on the API (POST, DELETE) must also carry the
CSRF token (``X-CSRFToken`` header), as forms do; bearer requests need none.

Failed attempts (a wrong bearer token or a wrong login) are counted per client
address: after :data:`FAILURE_LIMIT` failures within :data:`FAILURE_WINDOW_S`
seconds, every bearer or login attempt from that address gets 429 with
``Retry-After`` until the window ends (counters in Redis, per process if Redis
is down).

When no token is configured the service is open to anyone who can reach it
(single-user mode: :func:`current_owner` is None and jobs belong to
``default``), and says so in a warning at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    current_app,
    flash,
    g,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf import FlaskForm
from sqlalchemy import delete
from wtforms import HiddenField, PasswordField

from shared.settings import DEFAULT_OWNER, parse_api_tokens

from .db import get_db, state
from .errors import ApiError, is_api_request, json_error

log = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)

#: Session key holding the (random) id of the server-side login session.
SESSION_KEY = "ebb_auth"
#: Endpoints reachable without credentials.
OPEN_ENDPOINTS = frozenset({
    "static", "health.healthz", "health.readyz", "auth.login", "auth.logout", "api.openapi",
})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_REALM = 'Bearer realm="explain-black-box"'
#: Failed bearer/login attempts per client address before it is locked out ...
FAILURE_LIMIT = 5
#: ... for the rest of this window (seconds, counted from the first failure).
FAILURE_WINDOW_S = 900
#: How long (seconds) a process trusts its answer to "are there database tokens?".
DB_TOKENS_CACHE_S = 5.0


@dataclass(frozen=True)
class Owner:
    """Who a request acts for: the token's name, and whether it may see every owner's jobs."""

    name: str
    admin: bool = False


# --------------------------------------------------------------------------- tokens


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()


@lru_cache(maxsize=16)
def _env_entries(raw: tuple[str, ...]) -> tuple[tuple[str, Owner], ...]:
    """(sha256 of the token, owner) of each ``EBB_API_TOKENS`` entry."""
    return tuple((_sha256(e.token), Owner(e.name, e.admin)) for e in parse_api_tokens(raw))


def env_tokens() -> tuple[tuple[str, Owner], ...]:
    return _env_entries(tuple(state().settings.api_tokens))


def _db_call(fn):
    """``fn()``, a 503 ``service_unavailable`` (never a 500) when the database fails."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return fn()
    except SQLAlchemyError:
        log.warning("authentication: the database is unavailable", exc_info=True)
        try:
            get_db().rollback()
        except Exception:  # noqa: BLE001
            pass
        raise ApiError(503, "service_unavailable",
                       "The database is unavailable right now. Please retry later.") from None


def _db_tokens_exist() -> bool:
    """Whether ``ebb tokens create`` made any token (cached a few seconds per app)."""
    cache = current_app.extensions.setdefault("ebb_db_tokens", {"at": -1e9, "value": False})
    now = time.monotonic()
    if now - cache["at"] > DB_TOKENS_CACHE_S:
        from shared.tokens import any_tokens

        def read() -> bool:
            with state().session_factory() as db:
                return any_tokens(db)

        cache["value"] = _db_call(read)
        cache["at"] = now
    return bool(cache["value"])


def enabled() -> bool:
    """True when tokens are configured (``EBB_API_TOKENS`` or the database): auth is required."""
    if "ebb_auth_enabled" not in g:
        g.ebb_auth_enabled = bool(state().settings.api_tokens) or _db_tokens_exist()
    return bool(g.ebb_auth_enabled)


def owner_for_hash(digest: str) -> Owner | None:
    """The owner of the token whose SHA-256 is ``digest`` (environment, then database)."""
    found: Owner | None = None
    digest_b = digest.encode()
    for entry_hash, owner in env_tokens():  # no early exit: same work for every token
        if hmac.compare_digest(digest_b, entry_hash.encode()) and found is None:
            found = owner
    if found is not None:
        return found
    from shared.tokens import find_token

    row = _db_call(lambda: find_token(get_db(), digest))
    return Owner(row.name, bool(row.admin)) if row is not None else None


def match_token(given: str) -> Owner | None:
    """The owner of token ``given`` (compared by hash), else None."""
    if not given:
        return None
    return owner_for_hash(_sha256(given))


def current_owner() -> Owner | None:
    """The owner of the current request; None in single-user mode (no tokens configured)."""
    return g.get("ebb_owner")


def owner_name() -> str:
    """The owner name a new job records: the request's owner, ``default`` without tokens."""
    owner = current_owner()
    return owner.name if owner is not None else DEFAULT_OWNER


def _bearer() -> str | None:
    """The bearer credential of the request ('' if the header is malformed), None if absent."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, credential = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None  # another scheme: as if absent (a session may still apply)
    return credential.strip()


# --------------------------------------------------------------------------- sessions


def _utcnow():
    from shared.db.models import utcnow

    return utcnow()


def _as_utc(value):
    from datetime import timezone

    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def start_session(token: str) -> None:
    """Log the browser in with ``token``: a new server-side session, its id in the cookie."""
    from shared.db.models import LoginSession

    session_id = secrets.token_urlsafe(32)
    now = _utcnow()
    db = get_db()

    def store() -> None:
        # expired sessions are of no use any more: drop them as new ones start
        db.execute(delete(LoginSession).where(LoginSession.expires_at < now))
        db.add(LoginSession(id_sha256=_sha256(session_id), token_sha256=_sha256(token),
                            created_at=now,
                            expires_at=now + timedelta(hours=state().settings.session_hours)))
        db.commit()

    _db_call(store)
    session.clear()  # a fresh session: no fixation
    session.permanent = True
    session[SESSION_KEY] = session_id


def _session_row():
    from shared.db.models import LoginSession

    stored = session.get(SESSION_KEY)
    if not isinstance(stored, str) or not stored or len(stored) > 200:
        return None
    row = _db_call(lambda: get_db().get(LoginSession, _sha256(stored)))
    if row is None or row.revoked_at is not None or _as_utc(row.expires_at) <= _utcnow():
        return None
    return row


def _session_owner() -> Owner | None:
    row = _session_row()
    return owner_for_hash(row.token_sha256) if row is not None else None


def end_session() -> None:
    """Revoke the browser's server-side session (if any) and clear the cookie."""
    row = _session_row()
    if row is not None:
        row.revoked_at = _utcnow()
        _db_call(get_db().commit)
    session.clear()


def logged_in() -> bool:
    """True when the browser session is live and its token still configured."""
    return enabled() and _session_owner() is not None


# --------------------------------------------------------------------------- failures


_memory_failures: dict[str, tuple[int, float]] = {}
_memory_lock = threading.Lock()


def _failure_key() -> str:
    return f"{state().settings.rate_limit_prefix}:auth-failures:{request.remote_addr or 'unknown'}"


def _redis():
    client = current_app.extensions.get("ebb_auth_redis")
    if client is None:
        import redis

        client = redis.Redis.from_url(state().settings.redis_url, socket_connect_timeout=1.0,
                                      socket_timeout=1.0)
        current_app.extensions["ebb_auth_redis"] = client
    return client


def locked_for() -> int | None:
    """Seconds this client address stays locked out, or None when it is not."""
    key = _failure_key()
    try:
        client = _redis()
        count = client.get(key)
        if count is not None and int(count) >= FAILURE_LIMIT:
            return max(1, int(client.ttl(key)))
        return None
    except Exception:  # noqa: BLE001 - Redis down: count in this process
        with _memory_lock:
            count, reset_at = _memory_failures.get(key, (0, 0.0))
        left = reset_at - time.time()
        return max(1, int(left + 0.999)) if count >= FAILURE_LIMIT and left > 0 else None


def record_failure() -> None:
    """Count a failed bearer or login attempt from this client address."""
    key = _failure_key()
    log.warning("failed authentication from %s", request.remote_addr)
    try:
        client = _redis()
        if int(client.incr(key)) == 1 or client.ttl(key) < 0:
            client.expire(key, FAILURE_WINDOW_S)
    except Exception:  # noqa: BLE001
        now = time.time()
        with _memory_lock:
            count, reset_at = _memory_failures.get(key, (0, 0.0))
            if reset_at <= now:
                count, reset_at = 0, now + FAILURE_WINDOW_S
            _memory_failures[key] = (count + 1, reset_at)


def _locked_response(retry: int):
    message = (f"Too many failed authentication attempts from this address. "
               f"Retry in {retry} s.")
    headers = [("Retry-After", str(retry))]
    if is_api_request():
        return json_error(429, "too_many_requests", message, headers=headers)
    from .errors import html_error

    return html_error(429, message, headers=headers)


# --------------------------------------------------------------------------- next


def safe_next(value: Any, default: str = "/") -> str:
    """``value`` if it is a local path (``/...``, no scheme, no host), else ``default``."""
    if not isinstance(value, str) or not value or len(value) > 2000:
        return default
    if any(ord(ch) < 32 or ord(ch) == 127 or ch == "\\" for ch in value):
        return default
    if not value.startswith("/") or value.startswith("//"):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    if parts.path.rstrip("/") in (url_for("auth.login"), url_for("auth.logout")):
        return default
    return value


def _here() -> str:
    path = request.script_root + request.path
    query = request.query_string.decode("latin-1")
    return f"{path}?{query}" if query else path


# --------------------------------------------------------------------------- the guard


def _unauthorized(message: str, invalid_token: bool = False):
    challenge = f'{_REALM}, error="invalid_token"' if invalid_token else _REALM
    if is_api_request():
        return json_error(401, "unauthorized", message, headers=[("WWW-Authenticate", challenge)])
    target = _here() if request.method in ("GET", "HEAD") else None
    response = redirect(url_for("auth.login", next=target) if target else url_for("auth.login"),
                        code=302 if request.method in ("GET", "HEAD") else 303)
    response.headers["WWW-Authenticate"] = challenge
    return response


def require_auth():
    """``before_request``: refuse requests without a valid token or login session."""
    g.ebb_owner = None
    if request.endpoint in OPEN_ENDPOINTS or not enabled():
        return None
    bearer = _bearer()
    if bearer is not None:
        retry = locked_for()
        if retry is not None:
            return _locked_response(retry)
        owner = match_token(bearer)
        if owner is None:
            record_failure()
            return _unauthorized("The bearer token is not valid.", invalid_token=True)
        g.ebb_owner = owner
        g.ebb_auth = "token"
        return None
    owner = _session_owner()
    if owner is None:
        return _unauthorized(
            "Authentication required: send 'Authorization: Bearer <token>' "
            "(a token of EBB_API_TOKENS) or log in at /login."
        )
    g.ebb_owner = owner
    g.ebb_auth = "session"
    if is_api_request() and request.method not in _SAFE_METHODS:
        # A browser session changing state through the (CSRF-exempt) API must
        # prove it comes from our pages, like a form does.
        from .security import csrf

        csrf.protect()
    return None


# --------------------------------------------------------------------------- pages


class LoginForm(FlaskForm):
    token = PasswordField("API token", render_kw={"autocomplete": "current-password",
                                                  "autofocus": True, "required": True,
                                                  "maxlength": "4096"})
    next = HiddenField()


def _render_login(form: LoginForm, status: int = 200, error: str | None = None):
    html = render_template("login.html", form=form, error=error)
    return make_response(html, status)


@bp.route("/login", methods=["GET", "POST"])
def login():
    target = safe_next(request.values.get("next"))
    if not enabled():
        flash("No login is needed: this service has no API tokens configured.", "info")
        return redirect(target, code=303)
    form = LoginForm()
    if request.method == "GET":
        if logged_in():
            return redirect(target, code=303)
        form.next.data = target
        return _render_login(form)
    if not form.validate_on_submit():  # CSRF already checked by CSRFProtect
        return _render_login(form, 400, "The form could not be verified. Please try again.")
    retry = locked_for()
    if retry is not None:
        form.next.data = target
        response = _render_login(form, 429, f"Too many failed attempts from this address. "
                                            f"Retry in {retry} s.")
        response.headers["Retry-After"] = str(retry)
        return response
    token = form.token.data or ""
    if match_token(token) is None:
        record_failure()
        form.next.data = target
        return _render_login(form, 401, "This token is not valid.")
    start_session(token)
    return redirect(target, code=303)


@bp.route("/logout", methods=["GET", "POST"])
def logout():
    if request.method == "GET":
        return render_template("logout.html", logged_in=logged_in())
    # POST: CSRF checked by CSRFProtect
    end_session()
    flash("You are logged out.", "info")
    return redirect(url_for("auth.login"), code=303)


def _template_context() -> dict[str, Any]:
    try:
        return {"auth_enabled": enabled(), "auth_logged_in": logged_in()}
    except Exception:  # noqa: BLE001 - never break an error page over this
        return {"auth_enabled": False, "auth_logged_in": False}


#: Endpoints serving one owner's content (uploads, thumbnails, artifacts, job
#: JSON, job pages): ``Cache-Control: private, no-store`` when auth is on.
USER_CONTENT_ENDPOINTS = frozenset({
    "api.list_jobs", "api.get_job", "api.create_job", "api.cancel_job", "api.delete_job",
    "api.job_artifact", "api.job_result_artifact", "api.usage",
    "pages.jobs", "pages.job", "pages.job_image", "pages.job_thumbnail",
})


def _no_store(response):
    """``after_request``: user content is never cached by a shared proxy when auth is on."""
    try:
        on = request.endpoint in USER_CONTENT_ENDPOINTS and enabled()
    except Exception:  # noqa: BLE001 - never break a response over this
        on = True
    if on:
        response.headers["Cache-Control"] = "private, no-store"
        response.headers.pop("Expires", None)
        vary = {v.strip() for v in response.headers.get("Vary", "").split(",") if v.strip()}
        response.headers["Vary"] = ", ".join(sorted(vary | {"Authorization", "Cookie"}))
    return response


def init_app(app: Flask) -> None:
    """Register the guard (first ``before_request``), the login pages and the warning."""
    app.before_request(require_auth)
    app.after_request(_no_store)
    app.register_blueprint(bp)
    app.context_processor(_template_context)
    settings = app.extensions["ebb"].settings
    app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(hours=settings.session_hours)
    if settings.api_tokens:
        log.info("API tokens configured: %d token(s); the API and pages require one",
                 len(settings.api_tokens))
    else:
        log.warning(
            "EBB_API_TOKENS is not set: the API and the web pages are open to anyone who "
            "can reach this service (unless tokens were made with 'ebb tokens create'). "
            "Set EBB_API_TOKENS (comma separated) to require a bearer token or a login."
        )
