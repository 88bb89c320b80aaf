"""Error handling: JSON under ``/api``, HTML pages elsewhere, never a stack trace.

API errors have the shape ``{"error": {"code", "message", "field"?}}``.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, current_app, jsonify, render_template, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    429: "too_many_requests",
    431: "request_header_fields_too_large",
    500: "internal_error",
    503: "service_unavailable",
    507: "insufficient_storage",
}

TITLES = {
    400: "Bad request",
    401: "Log in required",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Upload too large",
    429: "Too many requests",
    500: "Something went wrong",
    503: "Service unavailable",
    507: "Storage full",
}


class ApiError(Exception):
    """An error with an HTTP status, a stable machine code and a message."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None,
        headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        #: Response headers (e.g. ``Retry-After`` of a 429).
        self.headers = dict(headers or {})
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return {"error": body}


def is_api_request() -> bool:
    return request.path == "/api" or request.path.startswith("/api/")


def json_error(status: int, code: str, message: str, field: str | None = None, headers=None):
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    response = jsonify({"error": body})
    response.status_code = status
    for key, value in headers or ():
        if key.lower() != "content-type":
            response.headers[key] = value
    return response


def html_error(status: int, message: str, headers=None):
    title = TITLES.get(status, "Error")
    response = render_template("error.html", status=status, title=title, message=message)
    from flask import make_response

    out = make_response(response, status)
    for key, value in headers or ():
        if key.lower() != "content-type":
            out.headers[key] = value
    return out


def _max_upload_mb() -> float:
    state = current_app.extensions.get("ebb")
    if state is not None:
        return float(state.settings.max_upload_mb)
    return round((request.max_content_length or 0) / 1048576, 2)


def remember_headers(exc: ApiError) -> None:
    """Note ``exc``'s ``Retry-After`` so the rate limiter's own header
    (written on every limited response) does not replace it."""
    if "Retry-After" in exc.headers:
        from flask import g

        g.ebb_retry_after = exc.headers["Retry-After"]


def _handle_api_error(exc: ApiError):
    remember_headers(exc)
    if is_api_request():
        response = jsonify(exc.to_dict())
        response.status_code = exc.status
        response.headers.extend(exc.headers)
        return response
    return html_error(exc.status, exc.message, headers=exc.headers.items())


def _handle_http(exc: HTTPException):
    status = exc.code or 500
    headers = [(k, v) for k, v in exc.get_headers() if k.lower() == "allow"]
    if status == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        length = request.content_length
        if limit and length is not None and length <= limit:
            message = "The form has too many fields or a text field is too long."
        else:
            message = f"The upload is too large (the limit is {_max_upload_mb():g} MiB)."
    elif status == 429:
        from .ratelimit import retry_after_seconds

        retry = retry_after_seconds()
        headers.append(("Retry-After", str(retry)))
        message = (f"Too many requests from this client (limit: {exc.description}). "
                   f"Retry in {retry} s.")
    else:
        message = exc.description or TITLES.get(status, "Error")
    if is_api_request():
        return json_error(status, CODES.get(status, f"http_{status}"), message, headers=headers)
    from . import pages

    special = pages.form_error_response(status, message)
    if special is not None:
        return special
    return html_error(status, message, headers=headers)


def _handle_csrf(exc: CSRFError):
    message = (
        "The form could not be verified (missing or expired security token). "
        "Reload the page and try again."
    )
    if is_api_request():
        return json_error(400, "csrf_failed", message)
    from . import pages

    special = pages.form_error_response(400, message)
    if special is not None:
        return special
    return html_error(400, message)


def _handle_unexpected(exc: Exception):
    log.exception("unhandled error on %s %s", request.method, request.path)
    if is_api_request():
        return json_error(500, "internal_error", "Internal server error.")
    return html_error(500, "An unexpected error occurred. Please try again later.")


def init_app(app: Flask) -> None:
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(CSRFError, _handle_csrf)
    app.register_error_handler(HTTPException, _handle_http)
    app.register_error_handler(Exception, _handle_unexpected)
