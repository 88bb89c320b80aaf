"""worker.jobs.run_job on a tiny model and a SQLite database (no Celery, no Redis)."""

from __future__ import annotations

import io
import threading
import uuid
from datetime import timedelta

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import update

from shared import settings as settings_mod
from shared.attribution.config import PerturbationConfig
from shared.db.migrations import upgrade_database
from shared.db.models import Job, utcnow
from shared.db.session import session_scope
from shared.imaging.render import ARTIFACT_NAMES
from shared.storage import Storage
from worker import jobs
from worker.jobs import one_line, run_job
from worker.runtime import Runtime

CONFIG = PerturbationConfig(iterations=6, input_size=64, mask_size=8)


def png_bytes(seed: int = 0) -> bytes:
    rs = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray((rs.rand(48, 40, 3) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def runtime(tmp_path, tiny) -> Runtime:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade_database(url)
    settings = settings_mod.load({"DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": url, "EBB_MODEL": "tiny"})
    return Runtime(model_name="tiny", classifier=tiny, device="cpu", settings=settings,
                   storage=Storage(settings.data_dir), hostname="tiny.cpu@test")


def add_job(runtime: Runtime, image: bytes | None = None, config: PerturbationConfig = CONFIG, **values) -> uuid.UUID:
    sha = runtime.storage.save_upload(png_bytes() if image is None else image)
    row = dict(id=uuid.uuid4(), status="queued", model="tiny", config=config.to_dict(), image_sha256=sha,
               image_width=40, image_height=48, image_filename="x.png", progress_iteration=0,
               progress_total=config.iterations, cancel_requested=False, attempts=0, created_at=utcnow())
    row.update(values)
    with session_scope(runtime.database_url) as s:
        s.add(Job(**row))
    return row["id"]


def get(runtime: Runtime, job_id: uuid.UUID) -> Job:
    with session_scope(runtime.database_url) as s:
        return s.get(Job, job_id)


def set_values(runtime: Runtime, job_id: uuid.UUID, **values) -> None:
    with session_scope(runtime.database_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def test_success_stores_results_and_artifacts(runtime):
    job_id = add_job(runtime)
    assert run_job(str(job_id), runtime) == "succeeded"
    job = get(runtime, job_id)
    assert job.status == "succeeded" and job.error is None
    assert job.attempts == 1 and job.worker_hostname == "tiny.cpu@test"
    assert job.progress_iteration == job.progress_total == 6
    assert job.target_index == job.top5["before"][0]["index"] and job.target_label.startswith("c")
    assert job.score_before is not None and job.score_after is not None
    assert job.current_score == job.score_after
    assert {"seconds", "iterations_run", "total_s", "save_s", "queued_s"} <= set(job.timings)
    for key in ARTIFACT_NAMES:
        assert runtime.storage.artifact_path(job_id, key).is_file()


def test_explicit_target(runtime):
    job_id = add_job(runtime, target_index=7)
    assert run_job(job_id, runtime) == "succeeded"
    job = get(runtime, job_id)
    assert job.target_index == 7 and job.target_label == "c7"


def test_progress_writes_are_throttled(runtime, monkeypatch):
    writes = []
    original = jobs.ProgressReporter.__call__

    def spy(self, iteration, total, losses, **kwargs):
        result = original(self, iteration, total, losses, **kwargs)
        writes.append(self.writes)
        return result

    monkeypatch.setattr(jobs.ProgressReporter, "__call__", spy)
    job_id = add_job(runtime, config=CONFIG.replace(iterations=30))
    assert run_job(job_id, runtime) == "succeeded"
    assert len(writes) == 30
    assert writes[-1] < 30  # not one write per step
    assert writes[0] == 1 and writes[-1] >= 2  # first and last step write


def test_redelivery_of_terminal_job_is_a_no_op(runtime):
    job_id = add_job(runtime)
    run_job(job_id, runtime)
    before = get(runtime, job_id)
    assert run_job(job_id, runtime) == "skipped"
    after = get(runtime, job_id)
    assert after.attempts == 1 and after.finished_at == before.finished_at


def test_cancel_requested_before_start(runtime):
    job_id = add_job(runtime, cancel_requested=True)
    assert run_job(job_id, runtime) == "skipped"
    job = get(runtime, job_id)
    assert job.status == "cancelled" and job.attempts == 0 and job.finished_at is not None


def test_cancel_while_running(runtime, monkeypatch):
    monkeypatch.setattr(jobs, "PROGRESS_INTERVAL_S", 0.0)
    job_id = add_job(runtime, config=CONFIG.replace(iterations=200))
    original = runtime.optimise_many

    def optimise(pixels, targets, config, on_steps):
        on_step = on_steps[0]

        def step(iteration, total, losses):
            if iteration == 3:
                set_values(runtime, job_id, cancel_requested=True)
            return on_step(iteration, total, losses)

        return original(pixels, targets, config, [step])

    runtime.optimise_many = optimise
    assert run_job(job_id, runtime) == "cancelled"
    job = get(runtime, job_id)
    assert job.status == "cancelled" and job.progress_iteration == 3
    assert not runtime.storage.job_dir(job_id).exists()


@pytest.mark.parametrize(
    ("image", "expected"),
    [(b"definitely not an image", "could not decode the image"), (None, "uploaded image is missing")],
)
def test_bad_inputs_fail_with_a_readable_message(runtime, image, expected):
    job_id = add_job(runtime, image=image if image is not None else b"gone")
    if image is None:
        runtime.storage.upload_path(get(runtime, job_id).image_sha256).unlink()
    assert run_job(job_id, runtime) == "failed"
    job = get(runtime, job_id)
    assert job.status == "failed" and expected in job.error and "\n" not in job.error
    assert job.finished_at is not None


def test_invalid_stored_config_fails(runtime):
    job_id = add_job(runtime)
    set_values(runtime, job_id, config={"iterations": -1})
    assert run_job(job_id, runtime) == "failed"
    assert get(runtime, job_id).error.startswith("invalid settings: iterations")


def test_unexpected_exception_fails_with_one_line_and_no_traceback(runtime):
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory\nline two")

    runtime.optimise_many = boom
    job_id = add_job(runtime)
    assert run_job(job_id, runtime) == "failed"
    error = get(runtime, job_id).error
    assert error == "RuntimeError: CUDA error: out of memory line two"


def test_wrong_model_fails(runtime):
    job_id = add_job(runtime, model="vgg19")
    assert run_job(job_id, runtime) == "skipped"
    job = get(runtime, job_id)
    assert job.status == "failed" and "vgg19" in job.error


def test_unknown_or_invalid_job_ids_are_dropped(runtime):
    assert run_job(uuid.uuid4(), runtime) == "skipped"
    assert run_job("../../etc/passwd", runtime) == "skipped"


def test_running_job_with_fresh_heartbeat_is_not_run_twice(runtime):
    job_id = add_job(runtime, status="running", attempts=1, started_at=utcnow(), heartbeat_at=utcnow())
    assert run_job(job_id, runtime) == "skipped"
    assert get(runtime, job_id).attempts == 1


def test_stale_running_job_is_taken_over_and_its_progress_restarts_at_zero(runtime):
    old = utcnow() - timedelta(hours=1)
    job_id = add_job(runtime, status="running", attempts=1, started_at=old, heartbeat_at=old,
                     progress_iteration=4)
    seen = []
    original = runtime.optimise_many

    def optimise(pixels, targets, config, on_steps):
        on_step = on_steps[0]

        def step(iteration, total, losses):
            result = on_step(iteration, total, losses)
            seen.append(get(runtime, job_id).progress_iteration)
            return result

        return original(pixels, targets, config, [step])

    runtime.optimise_many = optimise
    assert run_job(job_id, runtime) == "succeeded"
    # the new attempt counts from 0, not from the old attempt's high point (issue 10)
    assert seen[0] < 4 and seen == sorted(seen)
    assert get(runtime, job_id).attempts == 2
    assert runtime.held_jobs() == {}  # released once done


def test_attempts_exhausted(runtime):
    old = utcnow() - timedelta(hours=1)
    job_id = add_job(runtime, status="running", attempts=3, started_at=old, heartbeat_at=old)
    assert run_job(job_id, runtime) == "skipped"
    job = get(runtime, job_id)
    assert job.status == "failed" and "3 attempts" in job.error


def test_superseded_run_does_not_overwrite_the_new_one(runtime, monkeypatch):
    monkeypatch.setattr(jobs, "PROGRESS_INTERVAL_S", 0.0)
    job_id = add_job(runtime, config=CONFIG.replace(iterations=50))
    original = runtime.optimise_many

    def optimise(pixels, targets, config, on_steps):
        on_step = on_steps[0]

        def step(iteration, total, losses):
            if iteration == 2:  # the reaper gave the job to another attempt meanwhile
                set_values(runtime, job_id, attempts=2, heartbeat_at=utcnow())
            return on_step(iteration, total, losses)

        return original(pixels, targets, config, [step])

    runtime.optimise_many = optimise
    assert run_job(job_id, runtime) == "superseded"
    job = get(runtime, job_id)
    assert job.status == "running" and job.attempts == 2 and job.score_after is None


def test_worker_shutdown_requeues_the_running_job(runtime, monkeypatch):
    monkeypatch.setattr(jobs, "PROGRESS_INTERVAL_S", 0.0)
    job_id = add_job(runtime, config=CONFIG.replace(iterations=100))
    original = runtime.optimise_many
    requeued = []

    def optimise(pixels, targets, config, on_steps):
        on_step = on_steps[0]

        def step(iteration, total, losses):
            if iteration == 2:
                runtime.stopping.set()
            return on_step(iteration, total, losses)

        return original(pixels, targets, config, [step])

    runtime.optimise_many = optimise
    assert run_job(job_id, runtime, requeue=lambda jid, model: requeued.append((jid, model))) == "requeued"
    assert requeued == [(job_id, "tiny")]
    job = get(runtime, job_id)
    # a clean hand-back is not an attempt and the next one starts from 0 (issue 10)
    assert job.status == "queued" and job.finished_at is None
    assert (job.attempts, job.progress_iteration, job.live, job.heartbeat_at) == (0, 0, None, None)
    assert runtime.held_jobs() == {}


def test_a_running_job_is_held_for_the_heartbeat_thread(runtime):
    from worker.heartbeat import bump_job_heartbeats

    job_id = add_job(runtime)
    original = runtime.optimise_many
    held = []

    def optimise(pixels, targets, config, on_steps):
        held.append(runtime.held_jobs())
        set_values(runtime, job_id, heartbeat_at=utcnow() - timedelta(hours=1))
        assert bump_job_heartbeats(runtime.database_url, runtime.held_jobs()) == 1
        assert bump_job_heartbeats(runtime.database_url, {job_id: 99}) == 0  # another attempt's: untouched
        return original(pixels, targets, config, on_steps)

    runtime.optimise_many = optimise
    assert run_job(job_id, runtime) == "succeeded"
    assert held == [{job_id: 1}] and runtime.held_jobs() == {}


def test_concurrent_jobs_share_one_model(runtime):
    ids = [add_job(runtime, image=png_bytes(i)) for i in range(3)]
    results = {}
    threads = [threading.Thread(target=lambda j=j: results.__setitem__(j, run_job(j, runtime))) for j in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results.values()) == {"succeeded"}


def test_one_line_messages():
    assert one_line(ValueError("a\n  b")) == "ValueError: a b"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(jobs.JobError("plain message")) == "plain message"
    assert len(one_line(RuntimeError("x" * 2000))) == jobs.MAX_ERROR_CHARS


def test_message_received_while_stopping_is_handed_back_untouched(runtime, monkeypatch):
    monkeypatch.setattr(jobs, "STOPPING_REQUEUE_DELAY_S", 0.0)
    job_id = add_job(runtime)
    runtime.stopping.set()
    requeued = []
    assert run_job(job_id, runtime, requeue=lambda jid, model: requeued.append(jid)) == "requeued"
    assert requeued == [job_id]
    job = get(runtime, job_id)
    assert job.status == "queued" and job.attempts == 0


# --------------------------------------------------------------------------- faithfulness, several targets


def _decoded(runtime, job_id):
    from shared.imaging.decode import decode_image

    return decode_image(runtime.storage.read_upload(get(runtime, job_id).image_sha256)).pixels


def test_every_job_gets_deletion_insertion_scores_and_the_gradcam_baseline(runtime):
    from shared.attribution.gradcam import gradcam_saliency
    from shared.attribution.metrics import deletion_insertion
    from shared.attribution.perturbation import upsample_mask
    import torch

    job_id = add_job(runtime)
    assert run_job(job_id, runtime) == "succeeded"
    job = get(runtime, job_id)
    assert len(job.results) == 1
    entry = job.results[0]
    assert entry["target"] == {"index": job.target_index, "label": job.target_label}
    assert entry["method"] == "meaningful_perturbation" and entry["areas"] is None
    assert entry["scores"] == {"before": job.score_before, "after": job.score_after}
    metrics = entry["metrics"]
    assert set(metrics) == {"deletion_auc", "insertion_auc", "curves", "seconds"}
    curves = metrics["curves"]
    assert len(curves["fraction"]) == len(curves["deletion"]) == len(curves["insertion"]) == 64 // 8 + 1
    # the stored score is the one of the saved mask (recomputed independently)
    pixels = _decoded(runtime, job_id)
    mask = torch.from_numpy(np.load(runtime.storage.artifact_path(job_id, "mask_npy")))[None, None]
    saliency = 1 - upsample_mask(mask, CONFIG.input_size)[0, 0].numpy()
    again = deletion_insertion(runtime.classifier, pixels, saliency, job.target_index, input_size=CONFIG.input_size)
    assert metrics["deletion_auc"] == pytest.approx(again.deletion_auc, abs=1e-6)
    assert metrics["insertion_auc"] == pytest.approx(again.insertion_auc, abs=1e-6)
    # Grad-CAM: its map is saved and its scores are its own
    cam = np.load(runtime.storage.job_dir(job_id) / "gradcam.npy")
    np.testing.assert_allclose(cam, gradcam_saliency(runtime.classifier, pixels, job.target_index, input_size=64),
                               atol=1e-5)
    base = entry["gradcam"]
    assert set(base) == {"deletion_auc", "insertion_auc", "curves", "seconds"}
    direct = deletion_insertion(runtime.classifier, pixels, cam, job.target_index, input_size=CONFIG.input_size)
    assert base["deletion_auc"] == pytest.approx(direct.deletion_auc, abs=1e-6)
    assert (runtime.storage.job_dir(job_id) / "gradcam.png").is_file()
    assert job.timings["metrics_s"] > 0 and job.timings["gradcam_s"] > 0


def test_top_k_explains_the_k_most_probable_classes_side_by_side(runtime):
    from shared.attribution.evaluation import top_classes

    job_id = add_job(runtime, top_k=3)
    assert run_job(job_id, runtime) == "succeeded"
    job = get(runtime, job_id)
    expected = top_classes(runtime.classifier, _decoded(runtime, job_id), 3, CONFIG.input_size)
    assert [r["target"]["index"] for r in job.results] == expected
    assert job.target_index == expected[0]
    assert job.progress_iteration == job.progress_total == 3 * CONFIG.iterations
    folder = runtime.storage.job_dir(job_id)
    for k in (1, 2):
        sub = folder / "results" / str(k)
        assert {p.name for p in sub.iterdir()} >= set(ARTIFACT_NAMES.values()) | {"gradcam.png", "gradcam.npy"}
        saved = __import__("json").loads((sub / "result.json").read_text())
        assert saved["target"]["index"] == expected[k]
    assert all(r["metrics"] is not None for r in job.results)


def test_explicit_targets_in_the_order_given(runtime):
    job_id = add_job(runtime, targets=[7, 2], target_index=7)
    assert run_job(job_id, runtime) == "succeeded"
    job = get(runtime, job_id)
    assert [r["target"]["index"] for r in job.results] == [7, 2]
    assert job.target_index == 7 and job.target_label == "c7"


def test_extremal_job_stores_one_mask_per_area(runtime):
    config = CONFIG.replace(method="extremal", game="preservation", areas=(0.1, 0.3))
    job_id = add_job(runtime, config=config)
    assert run_job(job_id, runtime) == "succeeded"
    job = get(runtime, job_id)
    entry = job.results[0]
    assert entry["method"] == "extremal"
    assert [a["area"] for a in entry["areas"]] == [0.1, 0.3]
    assert all(0 <= a["area_achieved"] <= 1 and 0 <= a["score_after"] <= 1 for a in entry["areas"])
    assert entry["metrics"] is not None and entry["gradcam"] is not None
    assert (runtime.storage.job_dir(job_id) / "areas.png").is_file()


def test_gradcam_can_be_switched_off(runtime):
    runtime.gradcam = False
    job_id = add_job(runtime)
    assert run_job(job_id, runtime) == "succeeded"
    job = get(runtime, job_id)
    assert job.results[0]["gradcam"] is None and job.results[0]["metrics"] is not None
    assert not (runtime.storage.job_dir(job_id) / "gradcam.png").exists()


def test_a_scoring_failure_keeps_the_mask(runtime, monkeypatch):
    import shared.attribution.evaluation as evaluation

    def broken(*args, **kwargs):
        raise RuntimeError("scoring bug")

    monkeypatch.setattr(evaluation, "evaluate", broken)
    job_id = add_job(runtime)
    assert run_job(job_id, runtime) == "succeeded"
    job = get(runtime, job_id)
    assert job.results[0]["metrics"] is None and job.results[0]["gradcam"] is None
    assert runtime.storage.artifact_path(job_id, "overlay_png").is_file()


def test_cancel_stops_every_target(runtime, monkeypatch):
    monkeypatch.setattr(jobs, "PROGRESS_INTERVAL_S", 0.0)
    job_id = add_job(runtime, config=CONFIG.replace(iterations=200), top_k=2)
    original = runtime.optimise_many

    def optimise(pixels, targets, config, on_steps):
        def wrap(on_step):
            def step(iteration, total, losses):
                if iteration == 3:
                    set_values(runtime, job_id, cancel_requested=True)
                return on_step(iteration, total, losses)
            return step
        return original(pixels, targets, config, [wrap(cb) for cb in on_steps])

    runtime.optimise_many = optimise
    assert run_job(job_id, runtime) == "cancelled"
    job = get(runtime, job_id)
    assert job.status == "cancelled" and job.timings["iterations_run"] < 20
    assert not runtime.storage.job_dir(job_id).exists()


def test_live_state_while_running(runtime, monkeypatch):
    """target, score_before and per-target live progress and noise-free scores
    are in the row while the job runs; the live score is the noise-free score."""
    monkeypatch.setattr(jobs, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(jobs, "LIVE_SCORE_INTERVAL_S", 0.0)
    monkeypatch.setattr(jobs, "LIVE_SCORE_BUDGET", 1.0)
    job_id = add_job(runtime, config=CONFIG.replace(iterations=8, noise_std=0.5), targets=[2, 5])
    original = runtime.optimise_many
    seen = []

    def optimise(pixels, targets, config, on_steps):
        def wrap(k, on_step):
            def step(iteration, total, losses):
                stop = on_step(iteration, total, losses)
                if k == 1 and iteration == 4:
                    job = get(runtime, job_id)
                    seen.append((job.status, job.target_index, job.target_label, job.score_before,
                                 job.current_score, [dict(e) for e in job.live], losses["live_score"]))
                return stop
            return step
        return original(pixels, targets, config, [wrap(k, cb) for k, cb in enumerate(on_steps)])

    runtime.optimise_many = optimise
    assert run_job(job_id, runtime) == "succeeded"
    status, index, label, before, current, live, live_score = seen[0]
    assert status == "running" and index == 2 and label == "c2" and 0 < before < 1
    assert [e["index"] for e in live] == [2, 5] and [e["label"] for e in live] == ["c2", "c5"]
    assert [e["total"] for e in live] == [8, 8] and live[1]["iteration"] == 4
    assert live[1]["score"] == live_score and live[1]["score_iteration"] == 4
    assert current == live[0]["score"] and live[0]["score_before"] == before
    job = get(runtime, job_id)
    assert [e["score"] for e in job.live] == [r["scores"]["after"] for r in job.results]  # last step
    assert job.timings["live_score_s"] >= 0


def test_results_carry_warnings(runtime):
    black = io.BytesIO()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(black, format="PNG")
    job_id = add_job(runtime, image=black.getvalue(), config=CONFIG.replace(iterations=2, learning_rate=0.001),
                     target_index=7)
    assert run_job(job_id, runtime) == "succeeded"
    warnings = get(runtime, job_id).results[0]["warnings"]
    codes = [w["code"] for w in warnings]
    assert "small_input" in codes and "mask_unchanged" in codes and "score_not_halved" in codes
    assert all(isinstance(w["message"], str) and w["message"] for w in warnings)


def test_live_preview_written_while_running_then_removed(runtime, monkeypatch):
    monkeypatch.setattr(jobs, "PREVIEW_INTERVAL_S", 1e-9)
    job_id = add_job(runtime, config=CONFIG.replace(iterations=6))
    path = runtime.storage.preview_path(job_id)
    original = runtime.optimise_many
    seen = []

    def optimise(pixels, targets, config, on_steps):
        def step(iteration, total, losses):
            stop = on_steps[0](iteration, total, losses)
            seen.append(np.asarray(Image.open(path)).copy())
            return stop
        return original(pixels, targets, config, [step])

    runtime.optimise_many = optimise
    assert run_job(job_id, runtime) == "succeeded"
    assert len(seen) == 6 and seen[0].shape == (48, 40, 3)  # the image's size (under 256 px)
    assert not np.array_equal(seen[0], seen[-1])  # the mask moved
    assert not path.exists()
    assert get(runtime, job_id).timings["preview_s"] > 0


def test_extremal_live_score_is_a_probability(runtime, monkeypatch):
    monkeypatch.setattr(jobs, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(jobs, "LIVE_SCORE_INTERVAL_S", 0.0)
    monkeypatch.setattr(jobs, "LIVE_SCORE_BUDGET", 1.0)
    job_id = add_job(runtime, config=CONFIG.replace(method="extremal", game="preservation", iterations=5,
                                                    areas=(0.1, 0.3)))
    original = runtime.optimise_many
    seen = []

    def optimise(pixels, targets, config, on_steps):
        def step(iteration, total, losses):
            stop = on_steps[0](iteration, total, losses)
            job = get(runtime, job_id)
            seen.append((job.current_score, job.live[0]["score"], losses["score"], job.score_before))
            return stop
        return original(pixels, targets, config, [step])

    runtime.optimise_many = optimise
    assert run_job(job_id, runtime) == "succeeded"
    for current, live, reward, before in seen:
        assert current == live and 0 <= live <= 1 and 0 < before <= 1
    assert any(live != reward for _, live, reward, _ in seen)  # not the raw logit
