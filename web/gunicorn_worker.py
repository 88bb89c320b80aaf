"""gunicorn's threaded worker, with JSON early errors and a request deadline.

:class:`JsonThreadWorker` is gunicorn's ``gthread`` worker (``threads``
requests at once per process, idle keep-alive connections parked in a poller
rather than holding a thread) with two changes:

* Errors gunicorn answers itself, before the application sees the request
  (414 request line too long, 400 bad request line or header, 431 headers
  too large, ...) have the service's JSON shape
  ``{"error": {"code", "message"}}`` instead of gunicorn's HTML page.
* A client has ``EBB_WEB_BODY_TIMEOUT`` seconds (default 30) to send a whole
  request (request line, headers and body) from its first byte, however it
  trickles: every socket read of the request waits at most until that
  deadline. The body is read in full before the application runs; one not
  fully received in time gets a JSON 408 ``request_timeout`` and the
  connection is closed; a client that has not even sent its headers in time
  is disconnected. A slow client therefore holds one of the ``threads`` for
  at most that long, and ``/healthz`` keeps answering from the other threads.

Bodies larger than the application's upload limit are left to the
application (which answers 413 without reading them). A body is buffered in
memory, at most ``EBB_MAX_UPLOAD_MB`` plus 1 MiB per thread.

Used by ``web/gunicorn_conf.py`` (``worker_class``), hence by ``ebb web``,
``ebb run``, ``Dockerfile.web`` and the compose file.
"""

from __future__ import annotations

import html
import io
import json
import re
import socket
import time

from gunicorn import util
from gunicorn.http.errors import NoMoreData
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import ThreadWorker

#: Status -> stable error code, as in :data:`web.errors.CODES` (kept here so
#: the worker does not import Flask before the application does).
_CODES = {
    400: "bad_request",
    403: "forbidden",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "request_header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
}
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ([^\r\n]*)\r\n")
_HTML_MESSAGE = re.compile(rb"</h1>(.*)</body>", re.S)
#: Slack over the upload limit for the multipart envelope and the form's other fields.
_BODY_SLACK = 1024 * 1024


def json_error_response(status: int, reason: str, message: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with a JSON error body."""
    code = _CODES.get(status, f"http_{status}")
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def html_error_to_json(raw: bytes) -> bytes:
    """gunicorn's HTML error response ``raw`` (``util.write_error``) as JSON."""
    match = _STATUS_LINE.match(raw)
    if match is None:
        return raw
    status, reason = int(match.group(1)), match.group(2).decode("latin-1")
    found = _HTML_MESSAGE.search(raw)
    message = html.unescape(found.group(1).decode("utf-8", "replace")).strip() if found else ""
    if status == 414:
        message = f"The request line (URL) is too long. {message}".strip()
    return json_error_response(status, reason, message or reason)


class _Capture:
    """Stands in for the client socket while gunicorn writes its HTML error."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0  # util.write_nonblock then writes directly

    def sendall(self, data: bytes) -> None:
        self.data += data


class BodyTimeout(Exception):
    """The client did not send the whole request in time."""


class BodyTooLarge(Exception):
    """A chunked body went past the upload limit."""


class JsonThreadWorker(ThreadWorker):
    """``gthread`` with JSON early errors and a whole-request deadline (see the module)."""

    def init_process(self) -> None:
        from shared.settings import load

        settings = load()
        self.body_timeout = float(settings.web_body_timeout)
        self.body_limit = int(settings.max_upload_mb * 1048576) + _BODY_SLACK
        super().init_process()

    # ------------------------------------------------------------------ errors

    def handle_error(self, req, client, addr, exc) -> None:
        capture = _Capture()
        super().handle_error(req, capture, addr, exc)
        if capture.data:
            self._send(client, html_error_to_json(capture.data))

    def _send(self, client, data: bytes) -> None:
        try:
            client.settimeout(5.0)
            client.sendall(data)
        except OSError:
            self.log.debug("Failed to send error message.")

    def _answer_and_close(self, sock, data: bytes) -> None:
        """Send ``data``, then half-close and drain briefly (RFC 9112 9.6), so that
        the client, which may still be sending, reads the answer rather than a reset."""
        self._send(sock, data)
        util.close_graceful(sock, timeout=1.0)

    # ------------------------------------------------------------------ deadline

    def handle(self, conn):
        """Give this request ``body_timeout`` seconds from now, for its request
        line, headers and body together (see :class:`_DeadlineSocket`)."""
        init = conn.init
        timeout = getattr(self, "body_timeout", None)

        def init_with_deadline() -> None:
            init()
            unreader = getattr(conn.parser, "unreader", None)
            if timeout is not None and not conn.is_http2 and isinstance(unreader, SocketUnreader):
                unreader.sock = _DeadlineSocket(conn.sock, time.monotonic() + timeout)

        conn.init = init_with_deadline
        return super().handle(conn)

    def handle_request(self, req, conn):
        try:
            self._buffer_body(req, conn)
        except BodyTimeout as exc:
            self.log.warning("Request body from %s not received in time: %s", conn.client, exc)
            self._answer_and_close(conn.sock, json_error_response(408, "Request Timeout", str(exc)))
            return False
        except BodyTooLarge as exc:
            self._answer_and_close(conn.sock, json_error_response(413, "Payload Too Large", str(exc)))
            return False
        return super().handle_request(req, conn)

    def _buffer_body(self, req, conn) -> None:
        """Read ``req``'s body into memory before the application runs, by the
        request's deadline; :class:`BodyTimeout` if it does not arrive in time,
        :class:`BodyTooLarge` if a chunked body goes past the limit."""
        timeout = getattr(self, "body_timeout", None)
        if timeout is None or req.body is None:
            return
        length = _content_length(req)
        chunked = any(name == "TRANSFER-ENCODING" and "chunked" in value.lower()
                      for name, value in req.headers)
        if not chunked and (length is None or length == 0):
            return
        if length is not None and length > self.body_limit:
            return  # the application refuses it (413) without reading it
        buffer = io.BytesIO()
        try:
            while buffer.tell() <= self.body_limit:
                chunk = req.body.read(65536)
                if not chunk:
                    break
                buffer.write(chunk)
        except DeadlinePassed:
            raise BodyTimeout(
                f"The request body was not received within {timeout:g} s "
                f"({buffer.tell()} bytes arrived); send it faster or retry.") from None
        if buffer.tell() > self.body_limit:
            raise BodyTooLarge(f"The request body is larger than {self.body_limit // 1048576} MiB.")
        buffer.seek(0)
        req.body = buffer


class DeadlinePassed(NoMoreData):
    """The request was not received by its deadline (gthread closes the
    connection quietly when this happens before the body)."""


class _DeadlineSocket:
    """The client socket as the request parser sees it: every ``recv`` waits at
    most until ``deadline`` (``time.monotonic()``), however the client trickles."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self.deadline = deadline

    def recv(self, size: int) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlinePassed()
        current = self._sock.gettimeout()
        self._sock.settimeout(left if current is None else min(current, left))
        try:
            return self._sock.recv(size)
        except (socket.timeout, TimeoutError):
            if self.deadline - time.monotonic() <= 0:
                raise DeadlinePassed() from None
            raise
        finally:
            self._sock.settimeout(current)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def _content_length(req) -> int | None:
    for name, value in req.headers:
        if name == "CONTENT-LENGTH":
            try:
                return int(value)
            except ValueError:
                return None
    return None
