"""Admission control, job time budgets, cancel during scoring and bounded
artifacts (issue 10, findings 1 and 2), on the real stack: the Flask app in
front of real Redis and real worker processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import struct
import time
import uuid
import zlib

import numpy as np
import pytest
from PIL import Image

from .conftest import build_stack, noise_png, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(600)]

FAST_FORM = {"iterations": "12", "input_size": "96", "mask_size": "8"}
#: The request of the issue, accepted before admission control existed.
ISSUE_FORM = {"iterations": "10000", "top_k": "5", "input_size": "1024", "mask_size": "224",
              "method": "extremal", "areas": "0.05,0.1,0.2,0.3,0.4"}


def _app(stack, monkeypatch, **env):
    from web import create_app

    monkeypatch.setenv("EBB_QUEUE_PREFIX", stack.env["EBB_QUEUE_PREFIX"])
    return create_app({"TESTING": True, "EBB_ENV": {**stack.env, **env}})


@pytest.fixture
def client(stack, monkeypatch):
    return _app(stack, monkeypatch).test_client()


def _post(client, image: bytes, filename: str = "x.png", **form: str):
    data = {**form, "image": (io.BytesIO(image), filename)}
    return client.post("/api/v1/jobs", data=data, content_type="multipart/form-data")


def _photo_jpeg(width: int, height: int) -> bytes:
    """A smooth photo-like JPEG (compresses like a photograph)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([127 + 120 * np.sin(x / 97.0), 127 + 120 * np.cos(y / 71.0),
                       127 + 120 * np.sin((x + y) / 151.0)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` pixels
    (a few rows of real data: decoding it would fail as truncated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * (width // 8 + 1) * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _counts(stack) -> tuple[int, int]:
    """(job rows, stored uploads)."""
    from sqlalchemy import func, select

    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope(stack.database_url) as session:
        rows = int(session.scalar(select(func.count()).select_from(Job)) or 0)
    uploads = stack.data_dir / "uploads"
    return rows, len([p for p in uploads.rglob("*") if p.is_file()]) if uploads.exists() else 0


# --------------------------------------------------------------------------- admission


def test_the_issues_oversized_request_is_refused_and_nothing_stored(stack, client):
    before = _counts(stack)
    response = _post(client, noise_png(64, 48), **ISSUE_FORM)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "too_expensive"
    assert error["field"] == "input_size"
    assert "EBB_MAX_JOB_MEMORY" in error["message"]
    assert _counts(stack) == before


def test_work_over_the_limit_names_iterations(stack, client):
    form = {**FAST_FORM, "iterations": "10000", "top_k": "5", "method": "extremal", "areas": "0.1,0.2,0.3"}
    response = _post(client, noise_png(64, 48), **form)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert (error["code"], error["field"]) == ("too_expensive", "iterations")
    assert "EBB_MAX_JOB_WORK" in error["message"]


def test_a_40_megapixel_png_header_is_refused_before_decoding(stack, client):
    bomb = _png_bomb(8000, 5000)
    assert len(bomb) < 40_000
    before = _counts(stack)
    response = _post(client, bomb, **FAST_FORM)
    assert response.status_code == 400
    error = response.get_json()["error"]
    # refused from the header: decoding would have found the data truncated
    assert (error["code"], error["field"]) == ("too_expensive", "image")
    assert "40,000,000 pixels" in error["message"] and "25,000,000" in error["message"]
    assert _counts(stack) == before


def test_a_5000_digit_target_is_a_clean_400(stack, client):
    response = _post(client, noise_png(64, 48), target="9" * 5000, **FAST_FORM)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["field"] == "target" and error["code"] == "invalid_target"
    assert "digit" not in error["message"].lower() and "sys.set_int_max_str_digits" not in error["message"]
    assert len(error["message"]) < 300


def test_the_worker_checks_the_cost_again(stack):
    """A job over the worker's limits (queued behind the web's back) fails
    with a clear message before it starts optimising."""
    job_id = stack.submit(noise_png(64, 48), config={"iterations": 10000, "method": "extremal",
                                                 "areas": [0.1, 0.2, 0.3, 0.4, 0.5]}, top_k=5)
    job = stack.wait(job_id)
    assert job.status == "failed"
    assert job.error.startswith("refused by the worker's limits")
    assert "EBB_MAX_JOB_WORK" in job.error
    assert (job.progress_iteration or 0) == 0


# --------------------------------------------------------------------------- artifacts


def test_top5_job_on_a_large_photo_keeps_its_folder_bounded(stack, client):
    from shared.imaging.render import EXTRA_ARTIFACT_NAMES, RESULTS_SUBDIR

    width, height, side = 4000, 3000, 2048
    capped = (side, round(height * side / width))  # (W, H) = (2048, 1536)
    response = _post(client, _photo_jpeg(width, height), filename="big.jpg", top_k="5", **FAST_FORM)
    assert response.status_code == 202, response.get_json()
    job_id = uuid.UUID(response.get_json()["id"])
    job = stack.wait(job_id, timeout=300)
    assert job.status == "succeeded", job.error
    folder = stack.storage.job_dir(job_id)
    folders = [folder] + [folder / RESULTS_SUBDIR / str(k) for k in range(1, 5)]
    per_target_bound = 0
    for f in folders:
        for name in ("overlay.png", EXTRA_ARTIFACT_NAMES["saliency_png"], EXTRA_ARTIFACT_NAMES["gradcam_png"]):
            with Image.open(f / name) as img:
                assert img.size == capped, (f, name)
        assert np.load(f / "saliency.npy").shape == (capped[1], capped[0])
        assert np.load(f / "mask.npy").shape == (8, 8)  # the exact mask, unchanged
        assert np.load(f / "gradcam.npy").shape == (96, 96)
    # Bounded by the cap whatever the photo: at most the uncompressed size of
    # three RGB images and one float32 map at 2048 px, plus small files, per target.
    per_target_bound = capped[0] * capped[1] * (3 * 3 + 4) + 2 * 2**20
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total < 5 * per_target_bound
    assert total < 5 * width * height * 4  # a single uncapped saliency.npy per target would exceed it


def test_page_image_is_a_stored_capped_rendition_made_once(stack, client):
    response = _post(client, _photo_jpeg(3000, 2000), filename="big.jpg", **FAST_FORM)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    first = client.get(body["links"]["image"])
    assert first.status_code == 200 and first.mimetype == "image/png"
    with Image.open(io.BytesIO(first.data)) as img:
        assert img.size[0] == 2048 and abs(img.size[1] - 1365) <= 1
    rendition = stack.data_dir / "renditions" / f"{body['image']['sha256']}-2048.png"
    assert rendition.is_file()
    stamp = rendition.stat()
    second = client.get(body["links"]["image"])
    assert second.status_code == 200 and second.data == first.data
    again = rendition.stat()
    assert (again.st_ino, again.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)  # not re-encoded
    # a small browser image is served as uploaded, no rendition
    small = _post(client, _photo_jpeg(300, 200), filename="small.jpg", **FAST_FORM).get_json()
    got = client.get(small["links"]["image"])
    assert got.status_code == 200 and got.mimetype == "image/jpeg"
    assert not (stack.data_dir / "renditions" / f"{small['image']['sha256']}-2048.png").exists()


# --------------------------------------------------------------------------- cancel and time budget


@pytest.fixture(scope="module")
def slow_stack(stack, start_worker):
    """A second worker on the same database with slow scoring (4 s per
    target, the test hook) and a 40 s time budget per job."""
    built = build_stack(start_worker, database_url=stack.database_url, redis_url=stack.redis_url,
                        data_dir=stack.data_dir, queue_prefix=f"{stack.queue_prefix}-slow-{uuid.uuid4().hex[:4]}",
                        name="worker-slow", EBB_TEST_SLOW_SCORING_SECONDS="4", EBB_JOB_TIMEOUT="40")
    yield built
    built.worker.terminate()
    built.worker.stop()


def test_cancel_during_scoring_ends_cancelled(slow_stack):
    job_id = slow_stack.submit(noise_png(80, 60))
    # the last optimisation step has been written: the worker is now scoring (4 s sleep first)
    wait_for(lambda: (j := slow_stack.job(job_id)).status == "running"
             and j.progress_iteration >= j.progress_total, 120, what="the job to reach scoring")
    slow_stack.request_cancel(job_id)
    job = slow_stack.wait(job_id)
    assert job.status == "cancelled", job.error
    assert not slow_stack.storage.job_dir(job_id).exists()  # nothing half-kept


def test_job_over_its_time_budget_fails_alone_and_its_batch_mate_succeeds(slow_stack):
    long_id = slow_stack.submit(noise_png(80, 60, seed=1), config={"iterations": 10000})
    wait_for(lambda: slow_stack.job(long_id).status == "running", 60, what="the long job to start")
    mate_id = slow_stack.submit(noise_png(80, 60, seed=2))
    mate = slow_stack.wait(mate_id, timeout=120)
    assert mate.status == "succeeded", mate.error
    assert slow_stack.job(long_id).status == "running"  # the batch-mate's finish left it alone
    job = slow_stack.wait(long_id, timeout=180)
    assert job.status == "failed"
    assert job.error.startswith("stopped: the job ran longer than its time budget of 40 s")
    assert 0 < job.progress_iteration < 10000
    assert not slow_stack.storage.job_dir(long_id).exists()
