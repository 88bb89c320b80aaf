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


def test_top_k_job_scores_every_mask_against_gradcam(stack, image_bytes):
    """Two targets in one job on the real worker: both masks batched, each
    scored (deletion/insertion) next to its Grad-CAM baseline."""
    job_id = stack.submit(image_bytes, top_k=2)
    job = stack.wait(job_id)
    assert job.status == "succeeded", job.error
    assert len(job.results) == 2
    first, second = job.results
    assert first["target"]["index"] == job.target_index == job.top5["before"][0]["index"]
    assert second["target"]["index"] == job.top5["before"][1]["index"]
    for entry in job.results:
        for scores in (entry["metrics"], entry["gradcam"]):
            assert 0.0 <= scores["deletion_auc"] <= 1.0 and 0.0 <= scores["insertion_auc"] <= 1.0
            assert len(scores["curves"]["deletion"]) == 96 // 8 + 1  # steps of 8 rows + the start
    assert job.progress_iteration == job.progress_total == 24
    assert job.timings["metrics_s"] > 0 and job.timings["gradcam_s"] > 0
    folder = stack.storage.job_dir(job_id)
    for sub in (folder, folder / "results" / "1"):
        for name in ("overlay.png", "gradcam.png", "mask.npy", "result.json"):
            assert (sub / name).is_file(), sub / name


def test_extremal_job_on_the_real_worker(stack, image_bytes):
    job_id = stack.submit(image_bytes, config={"method": "extremal", "game": "preservation",
                                               "areas": [0.05, 0.2], "mask_size": 28})
    job = stack.wait(job_id)
    assert job.status == "succeeded", job.error
    entry = job.results[0]
    assert entry["method"] == "extremal"
    assert [a["area"] for a in entry["areas"]] == [0.05, 0.2]
    assert entry["metrics"]["insertion_auc"] >= 0
    assert (stack.storage.job_dir(job_id) / "areas.png").is_file()


def test_same_seed_same_mask_alone_together_and_beside_others(stack, image_bytes):
    """Bit-for-bit: one job alone, two identical jobs at once, and the job
    joining a batch where an unrelated job already runs (the worker's
    EBB_MAX_BATCH is 2)."""
    cfg = {"iterations": 20, "seed": 77}
    masks = []
    alone = stack.submit(image_bytes, config=cfg)
    assert stack.wait(alone).status == "succeeded"
    masks.append(np.load(stack.storage.artifact_path(alone, "mask_npy")))

    pair = [stack.submit(image_bytes, config=cfg) for _ in range(2)]
    for job_id in pair:
        assert stack.wait(job_id).status == "succeeded"
        masks.append(np.load(stack.storage.artifact_path(job_id, "mask_npy")))

    other = stack.submit(image_bytes, config={"iterations": 400, "seed": 5, "l1_coeff": 0.05}, target=3)
    wait_for(lambda: stack.job(other).progress_iteration > 0, timeout=60, interval=0.05,
             what="the unrelated job to run")
    beside = stack.submit(image_bytes, config=cfg)
    job = stack.wait(beside)
    assert job.status == "succeeded", job.error
    assert stack.job(other).status == "running"  # it really ran beside the other job
    masks.append(np.load(stack.storage.artifact_path(beside, "mask_npy")))
    stack.request_cancel(other)
    stack.wait(other)

    for mask in masks[1:]:
        assert np.array_equal(mask, masks[0])
    scores = {stack.job(j).score_after for j in (alone, *pair, beside)}
    assert len(scores) == 1


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_weak_explanations_carry_warnings(stack, image_bytes):
    """A 1×1 black image, and the puppies-style failure (noise alone kills the
    score, so the mask never moves and the score after is not lower)."""
    tiny = stack.submit(_png(np.zeros((1, 1, 3), np.uint8)), config={"iterations": 20})
    noisy = stack.submit(image_bytes, config={"iterations": 30, "noise_std": 10.0}, target=558)
    job = stack.wait(tiny)
    assert job.status == "succeeded", job.error
    codes = [w["code"] for w in job.results[0]["warnings"]]
    assert codes == ["low_confidence", "score_not_halved", "mask_unchanged", "small_input"], codes
    job = stack.wait(noisy)
    assert job.status == "succeeded", job.error
    codes = [w["code"] for w in job.results[0]["warnings"]]
    assert codes == ["score_not_halved", "mask_unchanged"], (codes, job.score_before, job.score_after)
    assert "noise_std" in job.results[0]["warnings"][1]["message"]


def test_saliency_artifacts_at_the_original_size(stack, image_bytes):
    from PIL import Image
    import io

    job_id = stack.submit(image_bytes)
    assert stack.wait(job_id).status == "succeeded"
    width, height = Image.open(io.BytesIO(image_bytes)).size
    folder = stack.storage.job_dir(job_id)
    saliency = np.load(folder / "saliency.npy")
    assert saliency.shape == (height, width) and saliency.dtype == np.float32
    assert 0 <= saliency.min() and saliency.max() <= 1 and saliency.max() > 0
    assert Image.open(folder / "saliency.png").size == (width, height)
    mask = np.load(folder / "mask.npy")  # 1 = keep: the saliency is high where the mask is low
    assert saliency.mean() == pytest.approx(1 - mask.mean(), abs=0.05)


def test_target_score_before_and_live_state_while_running(stack, image_bytes):
    job_id = stack.submit(image_bytes, config={"iterations": 400})
    job = wait_for(lambda: (j := stack.job(job_id)).status == "running" and j.live
                   and j.live[0].get("score") is not None and j,
                   timeout=60, interval=0.05, what="the job's first live score")
    assert isinstance(job.target_index, int) and job.target_label  # the top-1, known early
    assert 0 < job.score_before <= 1 and job.score_after is None
    [entry] = job.live
    assert entry["index"] == job.target_index and entry["score_before"] == job.score_before
    assert 0 <= entry["score"] <= 1 and entry["total"] == 400 and entry["score_iteration"] >= 1
    assert job.current_score == entry["score"]
    wait_for(lambda: stack.storage.preview_path(job_id).is_file(), timeout=30, interval=0.05,
             what="the live preview")
    stack.request_cancel(job_id)
    assert stack.wait(job_id).status == "cancelled"
    assert not stack.storage.preview_path(job_id).exists()
