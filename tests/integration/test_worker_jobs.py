"""A real ``ebb worker`` (Celery, Redis, efficientnet_lite0) running jobs from the database.

Each test runs on SQLite and on PostgreSQL (see ``conftest.py``).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from .conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(600)]


def test_job_succeeds_with_artifacts_and_fields(stack, image_bytes):
    job_id = stack.submit(image_bytes)
    job = stack.wait(job_id)
    assert job.status == "succeeded", job.error
    assert job.error is None
    assert job.attempts == 1
    assert job.worker_hostname and "@" in job.worker_hostname
    assert job.progress_iteration == job.progress_total == 12
    assert isinstance(job.target_index, int) and job.target_label
    assert 0.0 <= job.score_after <= 1.0 and 0.0 < job.score_before <= 1.0
    # No target given: the worker explains the top-1 class and stores it.
    assert job.top5["before"][0]["index"] == job.target_index
    assert len(job.top5["after"]) == 5
    assert job.timings["iterations_run"] == 12 and job.timings["total_s"] > 0
    assert job.started_at is not None and job.finished_at is not None and job.heartbeat_at is not None

    from shared.imaging.render import ARTIFACT_NAMES

    for key in ARTIFACT_NAMES:
        path = stack.storage.artifact_path(job_id, key)
        assert path.is_file() and path.stat().st_size > 0, key
    mask = np.load(stack.storage.artifact_path(job_id, "mask_npy"))
    assert mask.shape == (8, 8)
    result = json.loads(stack.storage.artifact_path(job_id, "result_json").read_text())
    assert result["target"]["index"] == job.target_index


def test_explicit_target_is_kept(stack, image_bytes):
    job_id = stack.submit(image_bytes, target=3)
    job = stack.wait(job_id)
    assert job.status == "succeeded", job.error
    assert job.target_index == 3
    assert job.target_label  # resolved by the worker from the model's labels


def test_progress_only_increases(stack, image_bytes):
    job_id = stack.submit(image_bytes, config={"iterations": 60})
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = stack.job(job_id)
        seen.append(job.progress_iteration)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.05)
    assert job.status == "succeeded", job.error
    assert seen == sorted(seen), seen
    assert seen[-1] == 60
    assert len(set(seen)) >= 3, f"expected intermediate progress, saw {sorted(set(seen))}"


def test_cancel_while_running_stops_within_2s(stack, image_bytes):
    job_id = stack.submit(image_bytes, config={"iterations": 5000})
    wait_for(lambda: (j := stack.job(job_id)).status == "running" and j.progress_iteration > 0,
             timeout=60, interval=0.05, what="the job to make progress")
    asked = time.monotonic()
    stack.request_cancel(job_id)
    job = stack.wait(job_id, timeout=10, interval=0.05)
    took = time.monotonic() - asked
    assert job.status == "cancelled"
    assert took < 2.0, f"cancel took {took:.2f} s"
    assert 0 < job.progress_iteration < 5000
    assert not stack.storage.job_dir(job_id).exists()


def test_failures_are_reported_and_the_worker_carries_on(stack, image_bytes):
    corrupt = stack.submit(b"this is not an image at all")
    # An upload that was never stored (e.g. data folder wiped).
    missing = stack.submit(b"\x89PNG gone", send=False)
    stack.storage.upload_path(stack.job(missing).image_sha256).unlink()
    from worker.celery_app import TASK_EXPLAIN, queue_for

    stack.celery().send_task(TASK_EXPLAIN, args=[str(missing)], queue=queue_for("efficientnet_lite0", stack.env))
    good = stack.submit(image_bytes)

    job = stack.wait(corrupt)
    assert job.status == "failed"
    assert job.error and "decode" in job.error.lower() and "\n" not in job.error
    assert "Traceback" not in job.error
    job = stack.wait(missing)
    assert job.status == "failed" and "missing" in job.error
    job = stack.wait(good)
    assert job.status == "succeeded", job.error


def test_redelivered_finished_job_is_not_rerun(stack, image_bytes):
    job_id = stack.submit(image_bytes)
    first = stack.wait(job_id)
    assert first.status == "succeeded"
    from worker.celery_app import TASK_EXPLAIN, queue_for

    stack.celery().send_task(TASK_EXPLAIN, args=[str(job_id)], queue=queue_for("efficientnet_lite0", stack.env))
    # A later job on the same queue finishing proves the duplicate was consumed.
    later = stack.wait(stack.submit(image_bytes))
    assert later.status == "succeeded"
    again = stack.job(job_id)
    assert again.attempts == 1 and again.finished_at == first.finished_at
