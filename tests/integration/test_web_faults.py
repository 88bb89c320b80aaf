"""A web that slow clients cannot stall, and disk faults as clear errors (issue 10, findings 5 and 6).

Everything runs for real: ``gunicorn -c python:web.gunicorn_conf web.wsgi:app``
(the command of ``ebb web``, ``Dockerfile.web`` and the compose file, hence
:class:`web.gunicorn_worker.JsonThreadWorker`), Redis, SQLite or PostgreSQL,
an ``ebb worker`` process, and small ``tmpfs`` file systems mounted by the
tests (as root; the tests skip, saying why, where mounting is not permitted)
that are filled up or remounted read-only under the running processes.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from .conftest import TEST_MODEL, build_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SHORT = {"iterations": "8", "input_size": "64", "mask_size": "8"}


# --------------------------------------------------------------------------- helpers


@contextmanager
def tmpfs(path: Path, size: str = "8m") -> Iterator[Path]:
    """A fresh ``tmpfs`` of ``size`` mounted at ``path`` for the block; lazily unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """Write a file in ``folder`` until the file system is full (ENOSPC), then
    give ``leave`` bytes back; return the file."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (relative paths), temporary ones included."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def png(size: tuple[int, int] = (64, 48), seed: int = 0, noise: bool = False) -> bytes:
    from PIL import Image

    rs = np.random.RandomState(seed)
    if noise:  # incompressible: the PNG is about 3 bytes per pixel
        pixels = rs.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        pixels = np.full((size[1], size[0], 3), rs.randint(0, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def web_env(*, data_dir: Path, database_url: str, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DATA_DIR=str(data_dir), DATABASE_URL=database_url, REDIS_URL=redis_url,
               EBB_MODEL=TEST_MODEL, EBB_MODELS=TEST_MODEL, EBB_QUEUE_PREFIX=prefix,
               EBB_SECRET_KEY="test-secret-key", EBB_API_TOKENS="", EBB_RATE_LIMIT="1000/minute")
    env.update(extra)
    return env


def post_job(base: str, data: bytes, name: str = "x.png"):
    import requests

    return requests.post(f"{base}/api/v1/jobs", data=SHORT, files={"image": (name, data)}, timeout=30)


def assert_json_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text[:500]
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"] and "Traceback" not in error["message"]
    return error


def raw_response(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends on ``sock`` until it closes (or ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def parse_raw(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


@pytest.fixture
def prefix(queue_prefix: str) -> str:
    return f"{queue_prefix}.webfaults-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------- slow clients


class SlowPost:
    """A client that starts a job submission and then trickles its body, one
    byte every half second, until the server answers or closes."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        body_length = 200_000
        self.sock.sendall(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\n"
            + f"Content-Length: {body_length}\r\n\r\n".encode() + b"--xyz\r\n")
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.sock.send(b"a")
            except OSError:
                return

    def answer(self, timeout: float) -> tuple[bytes, float]:
        data = raw_response(self.sock, timeout)
        elapsed = time.monotonic() - self.started
        self.stop.set()
        self.sock.close()
        return data, elapsed


def test_slow_bodies_do_not_stall_healthz_and_get_a_json_408(start_gunicorn, redis_url, prefix, tmp_path):
    """Eight half-sent POSTs held open (still trickling) while ``/healthz`` is
    asked again and again: it answers within a second every time. Each slow
    client then gets a JSON 408 once ``EBB_WEB_BODY_TIMEOUT`` (4 s here) is
    over, although it kept sending, and the server takes a normal submission."""
    import requests

    env = web_env(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'ebb.sqlite3'}",
                  redis_url=redis_url, prefix=prefix, EBB_WEB_BODY_TIMEOUT="4")
    web = start_gunicorn(env)
    web.wait_ready()

    slow = [SlowPost(web.port) for _ in range(8)]
    time.sleep(0.5)  # the requests are read by the server's threads by now
    slowest = 0.0
    for _ in range(6):
        started = time.monotonic()
        response = requests.get(f"{web.base_url}/healthz", timeout=5)
        elapsed = time.monotonic() - started
        assert response.status_code == 200 and response.json() == {"status": "ok"}
        slowest = max(slowest, elapsed)
        time.sleep(0.25)
    assert slowest < 1.0, f"/healthz took {slowest:.2f} s while slow clients were connected"

    for client in slow:
        data, elapsed = client.answer(timeout=30)
        status, headers, body = parse_raw(data)
        assert status == 408, data[:300]
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and "within 4 s" in error["message"]
        assert elapsed < 20, f"the 408 came after {elapsed:.1f} s"
    assert post_job(web.base_url, png()).status_code == 202
    print(f"\nslow clients: /healthz at most {slowest * 1000:.0f} ms with 8 slow bodies open")


def test_gunicorn_early_errors_are_json(start_gunicorn, redis_url, prefix, tmp_path):
    """gunicorn's own answers (414 request line too long, 431 header too large,
    400 bad request line)
    have the service's JSON error shape, not gunicorn's HTML page."""
    import requests

    env = web_env(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'ebb.sqlite3'}",
                  redis_url=redis_url, prefix=prefix)
    web = start_gunicorn(env)
    web.wait_ready()

    response = requests.get(f"{web.base_url}/api/v1/jobs?x={'a' * 9000}", timeout=10)
    error = assert_json_error(response, 414, "uri_too_long")
    assert "too long" in error["message"]

    response = requests.get(f"{web.base_url}/healthz", headers={"X-Big": "b" * 9000}, timeout=10)
    assert_json_error(response, 431, "request_header_fields_too_large")

    sock = socket.create_connection(("127.0.0.1", web.port))
    sock.sendall(b"NOT AN HTTP REQUEST LINE\r\n\r\n")
    status, headers, body = parse_raw(raw_response(sock, 10))
    sock.close()
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "bad_request"


# --------------------------------------------------------------------------- disk faults


def test_full_disk_is_507_json_nothing_stored_and_not_ready(start_gunicorn, redis_url, prefix, tmp_path):
    """DATA_DIR on an 8 MiB tmpfs that fills up under the running web.

    Full (under ``EBB_MIN_FREE_MB`` = 1): 507 ``insufficient_storage`` and
    ``/readyz`` not ready (``checks.storage`` = ``error``). Above the minimum
    but too small for the upload: the write fails with ENOSPC, 507 again, no
    partial file. Space back: accepted, ready again.
    """
    import requests

    with tmpfs(tmp_path / "store", "8m") as store:
        data_dir = store / "data"
        env = web_env(data_dir=data_dir, database_url=f"sqlite:///{tmp_path / 'ebb.sqlite3'}",
                      redis_url=redis_url, prefix=prefix, EBB_MIN_FREE_MB="1")
        web = start_gunicorn(env)
        web.wait_ready()
        ready = requests.get(f"{web.base_url}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["checks"]["storage"] == "ok"

        filler = fill(store)
        error = assert_json_error(post_job(web.base_url, png(seed=1)), 507, "insufficient_storage")
        assert "full" in error["message"]
        assert files_under(data_dir) == []
        ready = requests.get(f"{web.base_url}/readyz", timeout=10)
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "unavailable" and body["checks"]["storage"] == "error"
        assert body["failed"] == ["storage"] and "full" in body["storage"]

        # 1.5 MiB free passes the 1 MiB check, but a 2.7 MiB upload does not fit.
        os.unlink(filler)
        fill(store, leave=3 << 19)
        big = png((960, 960), seed=2, noise=True)
        assert len(big) > 2_500_000
        assert_json_error(post_job(web.base_url, big), 507, "insufficient_storage")
        assert files_under(data_dir) == [], "a partial upload was left behind"

        os.unlink(store / "filler.bin")
        accepted = post_job(web.base_url, big)
        assert accepted.status_code == 202, accepted.text
        assert len(files_under(data_dir / "uploads")) == 1
        assert requests.get(f"{web.base_url}/readyz", timeout=10).status_code == 200
        web.stop()


def test_read_only_disk_is_503_json_and_pages_still_work(start_gunicorn, redis_url, prefix, tmp_path):
    """DATA_DIR remounted read-only under the running web: a submission gets
    503 ``storage_unavailable`` (nothing stored), ``/readyz`` is not ready,
    and earlier jobs' pages, images and thumbnails still answer 200 (the
    thumbnail and a TIFF's PNG rendition are served without being stored). Writable again: accepted."""
    import requests

    with tmpfs(tmp_path / "store", "8m") as store:
        data_dir = store / "data"
        env = web_env(data_dir=data_dir, database_url=f"sqlite:///{tmp_path / 'ebb.sqlite3'}",
                      redis_url=redis_url, prefix=prefix, EBB_MIN_FREE_MB="1")
        web = start_gunicorn(env)
        web.wait_ready()
        first = post_job(web.base_url, png(seed=3))
        assert first.status_code == 202, first.text
        job_id = first.json()["id"]
        tiff = io.BytesIO()  # not shown by browsers as is: its image view is a PNG rendition
        from PIL import Image

        Image.new("RGB", (80, 60), (10, 200, 30)).save(tiff, "TIFF")
        second = post_job(web.base_url, tiff.getvalue(), name="x.tif")
        assert second.status_code == 202, second.text
        tiff_id = second.json()["id"]
        before = files_under(data_dir)

        remount(store, "ro")
        try:
            error = assert_json_error(post_job(web.base_url, png(seed=4)), 503, "storage_unavailable")
            assert "cannot be written" in error["message"] and "Read-only" in error["message"]
            ready = requests.get(f"{web.base_url}/readyz", timeout=10)
            assert ready.status_code == 503
            assert ready.json()["checks"]["storage"] == "error" and ready.json()["failed"] == ["storage"]
            for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/image", f"/jobs/{job_id}/thumbnail",
                         f"/api/v1/jobs/{job_id}", f"/jobs/{tiff_id}/image", f"/jobs/{tiff_id}/thumbnail"):
                response = requests.get(f"{web.base_url}{path}", timeout=10)
                assert response.status_code == 200, (path, response.status_code, response.text[:300])
            assert requests.get(f"{web.base_url}/jobs/{job_id}/thumbnail", timeout=10).headers[
                "Content-Type"] == "image/jpeg"
            assert requests.get(f"{web.base_url}/jobs/{tiff_id}/image", timeout=10).headers[
                "Content-Type"] == "image/png"
            assert files_under(data_dir) == before
        finally:
            remount(store, "rw")
        assert post_job(web.base_url, png(seed=4)).status_code == 202
        assert requests.get(f"{web.base_url}/readyz", timeout=10).status_code == 200
        web.stop()


def test_redis_outage_on_submit_leaves_no_upload(start_redis_server, start_gunicorn, database_url, prefix,
                                                 tmp_path):
    """Redis goes down under the web: a submission gets 503 ``queue_unavailable``
    with no row and no upload left, except an upload an accepted job still uses."""
    import requests
    from sqlalchemy import func, select

    from shared.db.models import Job
    from shared.db.session import session_scope

    redis = start_redis_server("redis")
    data_dir = tmp_path / "data"
    web = start_gunicorn(web_env(data_dir=data_dir, database_url=database_url, redis_url=redis.url(),
                                 prefix=prefix))
    web.wait_ready()
    shared_image, new_image = png(seed=5), png(seed=6)
    accepted = post_job(web.base_url, shared_image)
    assert accepted.status_code == 202, accepted.text
    assert len(files_under(data_dir / "uploads")) == 1

    redis.kill()
    assert_json_error(post_job(web.base_url, new_image), 503, "queue_unavailable")
    assert_json_error(post_job(web.base_url, shared_image), 503, "queue_unavailable")
    uploads = files_under(data_dir / "uploads")
    import hashlib

    assert uploads == [hashlib.sha256(shared_image).hexdigest()], uploads
    with session_scope(database_url) as db:
        for image, expected in ((shared_image, 1), (new_image, 0)):
            sha = hashlib.sha256(image).hexdigest()
            assert db.scalar(select(func.count()).select_from(Job).where(Job.image_sha256 == sha)) == expected
    assert requests.get(f"{web.base_url}/readyz", timeout=10).json()["checks"]["redis"] != "ok"


@pytest.mark.realmodel
def test_worker_on_a_full_disk_fails_the_job_with_a_readable_message(start_worker, redis_url, sqlite_url,
                                                                    prefix, tmp_path):
    """A worker whose DATA_DIR (a 24 MiB tmpfs) fills up.

    * Space above ``EBB_MIN_FREE_MB`` (1) but too little for the results of a
      large image: the write fails with ENOSPC, the job fails saying the
      server ran out of disk space and to resubmit, no partial folder is left.
    * Under ``EBB_MIN_FREE_MB``: the job fails at once (no iteration run),
      saying the disk is full and to resubmit.
    * Space back: the same image, resubmitted, succeeds.
    """
    from shared.db.models import JobStatus

    config = {"iterations": 8, "input_size": 64, "mask_size": 8}
    with tmpfs(tmp_path / "store", "24m") as store:
        stack = build_stack(start_worker, database_url=sqlite_url, redis_url=redis_url,
                            data_dir=store / "data", queue_prefix=prefix, name="worker-full-disk",
                            EBB_MIN_FREE_MB="1", EBB_GRADCAM="0")
        image = png((1400, 1400), seed=7, noise=True)  # ~5.6 MiB; its overlays are as large
        stack.storage.save_upload(image)  # the upload is there; then the disk fills up
        filler = fill(store, leave=3 << 19)  # 1.5 MiB left: over the minimum, under the results
        job_id = stack.submit(image, config=config)
        job = stack.wait(job_id, timeout=180)
        assert job.status == JobStatus.FAILED.value, (job.status, stack.worker.tail())
        assert "ran out of disk space" in job.error and "resubmit" in job.error, job.error
        assert "No space left on device" in job.error and "Traceback" not in job.error
        assert job.progress_iteration > 0  # it ran, then could not save
        assert files_under(stack.storage.jobs_dir) == [], "a partial job folder was left"

        filler.unlink()
        filler = fill(store)
        early = stack.wait(stack.submit(image, config=config), timeout=180)
        assert early.status == JobStatus.FAILED.value, (early.status, stack.worker.tail())
        assert "disk is full" in early.error and "EBB_MIN_FREE_MB=1" in early.error, early.error
        assert "resubmit" in early.error and early.progress_iteration == 0

        filler.unlink()
        done = stack.wait(stack.submit(image, config=config), timeout=180)
        assert done.status == JobStatus.SUCCEEDED.value, (done.error, stack.worker.tail())
        stack.worker.terminate()
        stack.worker.stop()
