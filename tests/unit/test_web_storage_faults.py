"""Storage and early-error checks of the web, without a real fault.

The pure functions of :mod:`shared.storage_check`, the ``EBB_WEB_*`` /
``EBB_MIN_FREE_MB`` settings, the JSON rewriting of gunicorn's own errors
(:mod:`web.gunicorn_worker`), and the app's answers when the data store is
"full" because ``EBB_MIN_FREE_MB`` is set above what the disk has, or
unwritable because ``DATA_DIR/uploads`` is a file. Real full and read-only
file systems (tmpfs) are in ``tests/integration/test_web_faults.py``.
"""

from __future__ import annotations

import errno
import io
import json
import uuid

import pytest

from shared.settings import load
from shared.storage_check import (
    FULL,
    UNAVAILABLE,
    StorageFault,
    check_free_space,
    check_storage,
    check_writable,
    classify_os_error,
    disk_full_message,
    disk_low_message,
    free_mb,
    is_disk_full,
)
from web.testing import TestApps, image_bytes

REDIS_DB = 13
PREFIX = f"ebbtest-storage{REDIS_DB}-{uuid.uuid4().hex[:8]}"
APPS = TestApps(REDIS_DB, PREFIX)
_redis, _dispose_engines = APPS.module_fixtures()

HUGE_MB = str(10**12)  # more than any disk has


# --------------------------------------------------------------------------- settings


def test_settings_defaults():
    s = load({})
    assert (s.web_threads, s.web_timeout, s.web_body_timeout, s.min_free_mb) == (16, 30.0, 30.0, 100.0)


def test_settings_from_env():
    s = load({"EBB_WEB_THREADS": "4", "EBB_WEB_TIMEOUT": "12", "EBB_WEB_BODY_TIMEOUT": "2.5",
              "EBB_MIN_FREE_MB": "0"})
    assert (s.web_threads, s.web_timeout, s.web_body_timeout, s.min_free_mb) == (4, 12.0, 2.5, 0.0)
    assert load({"EBB_WEB_THREADS": " "}).web_threads == 16  # blank is the default


@pytest.mark.parametrize("name,value", [("EBB_WEB_THREADS", "0"), ("EBB_WEB_THREADS", "many"),
                                        ("EBB_WEB_BODY_TIMEOUT", "-1"), ("EBB_MIN_FREE_MB", "nan"),
                                        ("EBB_WEB_TIMEOUT", "0.5")])
def test_settings_reject_bad_values_naming_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        load({name: value})


# --------------------------------------------------------------------------- storage checks


def test_check_storage_passes_on_a_writable_folder_and_leaves_no_probe(tmp_path):
    free = check_storage(tmp_path / "uploads", 0)
    assert free == pytest.approx(free_mb(tmp_path), rel=0.01)
    assert list((tmp_path / "uploads").iterdir()) == []


def test_too_little_free_space_is_full(tmp_path):
    with pytest.raises(StorageFault) as info:
        check_free_space(tmp_path, float(HUGE_MB))
    assert info.value.kind == FULL
    assert "MiB free" in info.value.message and "nothing was stored" in info.value.message


def test_a_folder_that_cannot_be_created_is_unavailable(tmp_path):
    blocker = tmp_path / "uploads"
    blocker.write_bytes(b"a file where the folder should be")
    with pytest.raises(StorageFault) as info:
        check_writable(blocker)
    assert info.value.kind == UNAVAILABLE
    assert "cannot be written" in info.value.message


@pytest.mark.parametrize("code,kind", [(errno.ENOSPC, FULL), (errno.EDQUOT, FULL),
                                       (errno.EROFS, UNAVAILABLE), (errno.EACCES, UNAVAILABLE),
                                       (errno.EIO, UNAVAILABLE)])
def test_classify_os_error(code, kind):
    fault = classify_os_error(OSError(code, "boom"))
    assert fault.kind == kind
    assert ("full" if kind == FULL else "cannot be written") in fault.message


def test_is_disk_full_follows_causes():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EROFS, "Read-only file system"))
    assert not is_disk_full(ValueError("x"))
    message = disk_full_message(OSError(errno.ENOSPC, "No space left on device"))
    assert "ran out of disk space" in message and "resubmit" in message
    low = disk_low_message(12.4, 100)
    assert "12 MiB free" in low and "EBB_MIN_FREE_MB=100" in low and "resubmit" in low


# --------------------------------------------------------------------------- gunicorn's own errors


def test_gunicorn_html_error_becomes_json():
    from gunicorn import util

    from web.gunicorn_worker import _Capture, html_error_to_json

    capture = _Capture()
    util.write_error(capture, 414, "URI Too Long", "Request Line is too large (8192 > 4094)")
    assert capture.data.startswith(b"HTTP/1.1 414") and b"<html>" in capture.data
    out = html_error_to_json(capture.data)
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 414 URI Too Long\r\n")
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    error = json.loads(body)["error"]
    assert error["code"] == "uri_too_long"
    assert "too long" in error["message"] and "8192 > 4094" in error["message"]


def test_json_error_response_for_408():
    from web.gunicorn_worker import json_error_response

    head, body = json_error_response(408, "Request Timeout", "too slow").split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 Request Timeout")
    assert json.loads(body) == {"error": {"code": "request_timeout", "message": "too slow"}}


class _Req:
    def __init__(self, headers, body: bytes):
        self.headers = headers
        self.body = io.BytesIO(body)


def _worker(limit: int):
    from web.gunicorn_worker import JsonThreadWorker

    worker = object.__new__(JsonThreadWorker)  # no process: only the body buffering is used
    worker.body_timeout, worker.body_limit = 5.0, limit
    return worker


def test_body_is_buffered_up_to_the_limit():
    from web.gunicorn_worker import BodyTooLarge

    worker = _worker(limit=1000)
    req = _Req([("CONTENT-LENGTH", "600")], b"x" * 600)
    worker._buffer_body(req, None)
    assert req.body.read() == b"x" * 600
    # declared larger than the limit: left unread for the app's 413
    big = _Req([("CONTENT-LENGTH", "5000")], b"y" * 5000)
    original = big.body
    worker._buffer_body(big, None)
    assert big.body is original and original.tell() == 0
    # chunked (no length) beyond the limit: refused after at most limit + one read
    chunked = _Req([("TRANSFER-ENCODING", "chunked")], b"z" * 200_000)
    with pytest.raises(BodyTooLarge):
        worker._buffer_body(chunked, None)
    assert chunked.body.tell() <= 1000 + 65536


def test_gunicorn_conf_uses_the_json_thread_worker(monkeypatch):
    """The settings every deployment gets from ``-c python:web.gunicorn_conf``."""
    from gunicorn.config import Config

    monkeypatch.setenv("EBB_WEB_THREADS", "7")
    monkeypatch.setenv("EBB_WEB_TIMEOUT", "45")
    cfg = Config()
    from gunicorn.app.base import Application

    class _Probe(Application):
        def init(self, parser, opts, args):  # noqa: ARG002
            return None

        def load(self):  # pragma: no cover - never served
            return None

    probe = _Probe.__new__(_Probe)
    probe.cfg = cfg
    probe.load_config_from_module_name_or_filename("python:web.gunicorn_conf")
    from web.gunicorn_worker import JsonThreadWorker

    assert cfg.worker_class is JsonThreadWorker
    assert cfg.threads == 7 and cfg.timeout == 45


# --------------------------------------------------------------------------- the app


def _post(client, data: bytes):
    return client.post("/api/v1/jobs", data={"image": (io.BytesIO(data), "x.png"), "iterations": "10"},
                       content_type="multipart/form-data")


def _uploads(app) -> list[str]:
    folder = app.extensions["ebb"].storage.uploads_dir
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def test_full_store_is_507_json_and_not_ready(tmp_path, monkeypatch):
    app = APPS.make(tmp_path, monkeypatch, EBB_MIN_FREE_MB=HUGE_MB)
    client = app.test_client()
    response = _post(client, image_bytes("PNG"))
    assert response.status_code == 507 and response.is_json
    error = response.get_json()["error"]
    assert error["code"] == "insufficient_storage" and "almost full" in error["message"]
    assert _uploads(app) == []
    ready = client.get("/readyz")
    assert ready.status_code == 503
    body = ready.get_json()
    assert body["checks"]["storage"] == "error" and body["failed"] == ["storage"]
    assert "almost full" in body["storage"]
    # the form says it too, as a page
    import re

    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', client.get("/").text).group(1)
    page = client.post("/", data={"csrf_token": token, "image": (io.BytesIO(image_bytes("PNG")), "x.png")},
                       content_type="multipart/form-data")
    assert page.status_code == 507 and "almost full" in page.text
    assert _uploads(app) == []


def test_unwritable_store_is_503_storage_unavailable(tmp_path, monkeypatch):
    app = APPS.make(tmp_path, monkeypatch)
    uploads = app.extensions["ebb"].storage.uploads_dir
    if uploads.is_dir():
        uploads.rmdir()
    uploads.write_bytes(b"not a folder")
    client = app.test_client()
    response = _post(client, image_bytes("PNG"))
    assert response.status_code == 503 and response.is_json
    assert response.get_json()["error"]["code"] == "storage_unavailable"
    ready = client.get("/readyz").get_json()
    assert ready["checks"]["storage"] == "error" and ready["status"] == "unavailable"


def test_healthy_store_is_ready_and_accepts(tmp_path, monkeypatch):
    app = APPS.make(tmp_path, monkeypatch, EBB_MIN_FREE_MB="0")
    client = app.test_client()
    assert client.get("/readyz").get_json()["checks"]["storage"] == "ok"
    response = _post(client, image_bytes("PNG"))
    assert response.status_code == 202, response.get_data(as_text=True)
    assert len(_uploads(app)) == 1
