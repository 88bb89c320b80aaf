"""API tokens (``EBB_API_TOKENS``) for the API and a login page for browsers.

When ``EBB_API_TOKENS`` (comma separated) is set, every request needs either

* ``Authorization: Bearer <token>`` with one of the tokens, or
* a browser session that logged in at ``/login`` with one of them (a signed
  Flask session cookie; ``/logout`` ends it).

Without them the API answers 401 JSON ``{"error": {"code": "unauthorized"}}``
with ``WWW-Authenticate: Bearer``, and HTML pages redirect to
``/login?next=<the page>``. ``/healthz``, ``/readyz``, static files, the login
page and ``/api/v1/openapi.json`` stay open.

A session stores a keyed fingerprint of the token it logged in with, so
removing a token from ``EBB_API_TOKENS`` (and restarting) ends its sessions.
A session-authenticated request that changes something on the API (POST)
must also carry the CSRF token (``X-CSRFToken`` header), as forms do; bearer
requests need none.

When ``EBB_API_TOKENS`` is unset the service is open to anyone who can reach
it, and says so in a warning at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
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
from wtforms import HiddenField, PasswordField

from .db import state
from .errors import is_api_request, json_error

log = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)

#: Session key holding the fingerprint of the token the session logged in with.
SESSION_KEY = "ebb_auth"
#: Endpoints reachable without credentials.
OPEN_ENDPOINTS = frozenset({
    "static", "health.healthz", "health.readyz", "auth.login", "auth.logout", "api.openapi",
})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_REALM = 'Bearer realm="explain-black-box"'


# --------------------------------------------------------------------------- tokens


def tokens() -> tuple[str, ...]:
    return tuple(state().settings.api_tokens)


def enabled() -> bool:
    """True when ``EBB_API_TOKENS`` is set (authentication is required)."""
    return bool(tokens())


def _bytes(value: str) -> bytes:
    return value.encode("utf-8", "replace")


def match_token(given: str) -> int | None:
    """Index of the configured token equal to ``given`` (constant time), else None."""
    found: int | None = None
    given_b = _bytes(given)
    for index, token in enumerate(tokens()):  # no early exit: same work for every token
        if hmac.compare_digest(given_b, _bytes(token)) and found is None:
            found = index
    return found


def _fingerprint(token: str) -> str:
    key = current_app.secret_key
    key_b = key if isinstance(key, bytes) else _bytes(str(key))
    return hmac.new(key_b, b"ebb-login\0" + _bytes(token), hashlib.sha256).hexdigest()


def _session_token_index() -> int | None:
    stored = session.get(SESSION_KEY)
    if not isinstance(stored, str) or not stored:
        return None
    found: int | None = None
    for index, token in enumerate(tokens()):
        if hmac.compare_digest(_bytes(stored), _bytes(_fingerprint(token))) and found is None:
            found = index
    return found


def _bearer() -> str | None:
    """The bearer credential of the request ('' if the header is malformed), None if absent."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, credential = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None  # another scheme: as if absent (a session may still apply)
    return credential.strip()


def logged_in() -> bool:
    """True when the browser session logged in with a still-configured token."""
    return enabled() and _session_token_index() is not None


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
    g.ebb_token_index = None
    if not enabled() or request.endpoint in OPEN_ENDPOINTS:
        return None
    bearer = _bearer()
    if bearer is not None:
        index = match_token(bearer) if bearer else None
        if index is None:
            return _unauthorized("The bearer token is not valid.", invalid_token=True)
        g.ebb_token_index = index
        g.ebb_auth = "token"
        return None
    index = _session_token_index()
    if index is None:
        return _unauthorized(
            "Authentication required: send 'Authorization: Bearer <token>' "
            "(a token of EBB_API_TOKENS) or log in at /login."
        )
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
    index = match_token(form.token.data or "")
    if index is None:
        log.warning("failed login from %s", request.remote_addr)
        form.next.data = target
        return _render_login(form, 401, "This token is not valid.")
    session.clear()  # a fresh session: no fixation
    session[SESSION_KEY] = _fingerprint(tokens()[index])
    return redirect(target, code=303)


@bp.route("/logout", methods=["GET", "POST"])
def logout():
    if request.method == "GET":
        return render_template("logout.html", logged_in=logged_in())
    # POST: CSRF checked by CSRFProtect
    session.clear()
    flash("You are logged out.", "info")
    return redirect(url_for("auth.login"), code=303)


def _template_context() -> dict[str, Any]:
    try:
        return {"auth_enabled": enabled(), "auth_logged_in": logged_in()}
    except Exception:  # noqa: BLE001 - never break an error page over this
        return {"auth_enabled": False, "auth_logged_in": False}


def init_app(app: Flask) -> None:
    """Register the guard (first ``before_request``), the login pages and the warning."""
    app.before_request(require_auth)
    app.register_blueprint(bp)
    app.context_processor(_template_context)
    settings = app.extensions["ebb"].settings
    if settings.api_tokens:
        log.info("API tokens configured: %d token(s); the API and pages require one",
                 len(settings.api_tokens))
    else:
        log.warning(
            "EBB_API_TOKENS is not set: the API and the web pages are open to anyone who "
            "can reach this service. Set EBB_API_TOKENS (comma separated) to require a "
            "bearer token or a login."
        )
