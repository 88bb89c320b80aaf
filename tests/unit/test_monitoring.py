"""Monitoring pieces in one process: the JSON log formatter, the task's Celery
outcome, the worker's and the web's Prometheus metrics (parsed with the
client's own parser), the batch engine's metrics hook.

The web tests use a real Redis (database 4, a prefix unique to the run) and
a SQLite file; the worker ones a tiny model.
"""

from __future__ import annotations

import io
import json
import logging
import uuid

import pytest
from celery.exceptions import Ignore
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from shared.logs import JsonFormatter, configure_logging, log_format
from web.testing import TEST_MODELS, TestApps, image_bytes
from worker.tasks import JobFailed, report_outcome

REDIS_DB = 4
PREFIX = f"ebbtest-mon{REDIS_DB}-{uuid.uuid4().hex[:8]}"
APPS = TestApps(REDIS_DB, PREFIX)
_redis, _dispose_engines = APPS.module_fixtures()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------- logs


def test_json_formatter_one_object_per_line_with_the_extra_fields():
    record = logging.LogRecord("worker.jobs", logging.INFO, __file__, 1, "job %s succeeded\nin %.1f s",
                               ("abc", 2.5), None)
    record.event, record.job_id, record.model, record.duration_s = "succeeded", "abc", "m", 2.5
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "job abc succeeded\nin 2.5 s"
    assert data["level"] == "INFO" and data["logger"] == "worker.jobs"
    assert (data["event"], data["job_id"], data["model"], data["duration_s"]) == ("succeeded", "abc", "m", 2.5)
    assert data["time"].endswith("+00:00")


def test_json_formatter_keeps_the_traceback():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    data = json.loads(JsonFormatter().format(record))
    assert "RuntimeError: boom" in data["exc_info"]


def test_log_format_setting():
    assert log_format({}) == "text" and log_format({"EBB_LOG_FORMAT": " JSON "}) == "json"
    with pytest.raises(ValueError, match="EBB_LOG_FORMAT"):
        log_format({"EBB_LOG_FORMAT": "xml"})


def test_configure_logging_switches_existing_handlers_to_json():
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        configure_logging(environ={"EBB_LOG_FORMAT": "json"})
        assert isinstance(handler.formatter, JsonFormatter)
    finally:
        root.removeHandler(handler)


# --------------------------------------------------------------------------- the task's Celery state


class FakeTask:
    """What report_outcome uses of a bound task: its app's conf and send_event."""

    def __init__(self, events: bool = True):
        from types import SimpleNamespace

        self.app = SimpleNamespace(conf=SimpleNamespace(worker_send_task_events=events))
        self.sent: list[tuple[str, dict]] = []

    def send_event(self, type_, **fields):
        self.sent.append((type_, fields))


def test_a_cancelled_job_ends_its_task_revoked():
    task = FakeTask()
    with pytest.raises(Ignore):
        report_outcome(task, "cancelled", {"job_status": "cancelled"})
    assert task.sent == [("task-revoked", {"terminated": False, "signum": None, "expired": False})]
    task = FakeTask()  # cancelled while queued: the worker skips the message, still revoked
    with pytest.raises(Ignore):
        report_outcome(task, "skipped", {"job_status": "cancelled"})
    assert [t for t, _ in task.sent] == ["task-revoked"]


def test_a_failed_job_ends_its_task_failed():
    task = FakeTask()
    with pytest.raises(JobFailed, match="could not decode"):
        report_outcome(task, "failed", {"job_status": "failed", "error": "could not decode the image"})
    assert task.sent == []


def test_jobs_that_go_on_elsewhere_end_their_message_without_a_state():
    for outcome, status in (("requeued", "queued"), ("superseded", "running"), ("skipped", "running")):
        with pytest.raises(Ignore):
            report_outcome(FakeTask(), outcome, {"job_status": status})
    assert report_outcome(FakeTask(), "succeeded", {"job_status": "succeeded"}) == "succeeded"
    assert report_outcome(FakeTask(), "skipped", {"job_status": None}) == "skipped"


def test_the_explain_task_is_acked_and_never_retried_on_failure():
    from worker.tasks import explain_task

    assert explain_task.acks_late and explain_task.acks_on_failure_or_timeout
    assert JobFailed in explain_task.throws
    assert not getattr(explain_task, "autoretry_for", ())
    from worker.celery_app import celery_config

    conf = celery_config({})
    assert conf["worker_send_task_events"] and conf["task_send_sent_event"]


# --------------------------------------------------------------------------- worker metrics


def test_run_job_counts_and_logs_its_events(tmp_path, tiny, caplog):
    from shared import settings as settings_mod
    from shared.attribution.config import PerturbationConfig
    from shared.db.migrations import upgrade_database
    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope
    from shared.storage import Storage
    from worker.jobs import run_job
    from worker.runtime import Runtime

    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade_database(url)
    settings = settings_mod.load({"DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": url, "EBB_MODEL": "mon"})
    runtime = Runtime(model_name="mon", classifier=tiny, device="cpu", settings=settings,
                      storage=Storage(settings.data_dir), hostname="mon.cpu@test")
    config = PerturbationConfig(iterations=3, input_size=64, mask_size=8)

    def add(**values) -> uuid.UUID:
        sha = runtime.storage.save_upload(image_bytes("PNG", (40, 48)))
        row = dict(id=uuid.uuid4(), status="queued", model="mon", config=config.to_dict(), image_sha256=sha,
                   image_width=40, image_height=48, image_filename="x.png", progress_iteration=0,
                   progress_total=3, cancel_requested=False, attempts=0, created_at=utcnow())
        row.update(values)
        with session_scope(url) as s:
            s.add(Job(**row))
        return row["id"]

    before = {key: sample("ebb_jobs_finished_total", model="mon", status=key)
              for key in ("succeeded", "failed", "cancelled")}
    started = sample("ebb_jobs_started_total", model="mon")
    waits = sample("ebb_job_queue_wait_seconds_count", model="mon")
    durations = sample("ebb_job_duration_seconds_count", model="mon", status="succeeded")

    ok = add()
    with caplog.at_level(logging.INFO, logger="worker.jobs"):
        details: dict = {}
        assert run_job(ok, runtime, details=details) == "succeeded"
    assert details == {"job_status": "succeeded", "error": None}
    events = [(r.event, r.job_id, r.model) for r in caplog.records if hasattr(r, "event")]
    assert events == [("started", str(ok), "mon"), ("succeeded", str(ok), "mon")]
    finished = [r for r in caplog.records if getattr(r, "event", None) == "succeeded"][0]
    assert finished.duration_s >= 0 and str(ok) in finished.getMessage() and "mon" in finished.getMessage()

    bad = add(image_sha256="0" * 64)  # the upload is missing: the job fails
    details = {}
    assert run_job(bad, runtime, details=details) == "failed"
    assert details["job_status"] == "failed" and "missing" in details["error"]

    cancelled = add(cancel_requested=True, status="running", heartbeat_at=None)
    details = {}
    assert run_job(cancelled, runtime, details=details) == "skipped"
    assert details["job_status"] == "cancelled"

    assert sample("ebb_jobs_started_total", model="mon") == started + 2
    assert sample("ebb_job_queue_wait_seconds_count", model="mon") == waits + 2
    assert sample("ebb_job_duration_seconds_count", model="mon", status="succeeded") == durations + 1
    for key in ("succeeded", "failed", "cancelled"):
        assert sample("ebb_jobs_finished_total", model="mon", status=key) == before[key] + 1, key


def test_engine_reports_batch_sizes_and_mask_iterations(tiny):
    import numpy as np

    from shared.attribution.config import PerturbationConfig
    from worker.engine import BatchEngine
    from worker.metrics import engine_hook

    seen: list[tuple[str, int, int]] = []
    hook = engine_hook("engine-test")
    iterations = sample("ebb_mask_iterations_total", model="engine-test")
    engine = BatchEngine(tiny, max_batch=2, channels_last=False,
                         on_batch=lambda *a: (seen.append(a), hook(*a)))
    image = (np.random.RandomState(0).rand(40, 40, 3) * 255).astype(np.uint8)
    try:
        mp = PerturbationConfig(iterations=4, input_size=64, mask_size=8)
        extremal = PerturbationConfig(iterations=3, input_size=64, mask_size=8, method="extremal",
                                      areas=(0.1, 0.3))
        futures = [engine.submit(image, 1, mp), engine.submit(image, 2, extremal)]
        for f in futures:
            f.result(timeout=120)
    finally:
        engine.stop()
    assert sum(m for kind, _, m in seen if kind == "mp") == 4
    assert sum(m for kind, _, m in seen if kind == "extremal") == 3
    assert sample("ebb_mask_iterations_total", model="engine-test") == iterations + 7 == iterations + engine.mask_iterations
    assert sample("ebb_engine_batch_size_count", model="engine-test", kind="mp") == len(
        [s for s in seen if s[0] == "mp"])


def test_worker_metrics_port_setting():
    from worker.metrics import metrics_port

    assert metrics_port({}) == 0 and metrics_port({"EBB_METRICS_PORT": "9100"}) == 9100
    for bad in ("x", "-1", "70000"):
        with pytest.raises(ValueError, match="EBB_METRICS_PORT"):
            metrics_port({"EBB_METRICS_PORT": bad})


# --------------------------------------------------------------------------- web metrics


def scrape(client) -> dict[str, dict[tuple, float]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_web_metrics_count_submissions_and_read_the_queues(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    client = APPS.make(tmp_path, monkeypatch).test_client()
    model = TEST_MODELS[0]
    first = scrape(client)
    assert first["ebb_redis_up"][()] == 1
    assert first["ebb_queue_length"][(("model", model),)] == 0
    assert first["ebb_workers_online"][(("model", model),)] == 0

    import redis

    from shared import fleet

    redis_client = redis.Redis.from_url(APPS.redis_url)
    try:  # two workers' heartbeats (under this run's EBB_QUEUE_PREFIX)
        for name in ("a", "b"):
            fleet.publish(redis_client, {"hostname": f"{name}@test", "model": model, "device": "cpu"}, 30.0)
    finally:
        redis_client.close()
    assert scrape(client)["ebb_workers_online"][(("model", model),)] == 2
    submitted = first.get("ebb_jobs_submitted_total", {}).get((("model", model),), 0.0)
    cancelled = first.get("ebb_jobs_finished_total", {}).get((("model", model), ("status", "cancelled")), 0.0)

    ids = []
    for _ in range(2):
        response = client.post("/api/v1/jobs", data={"image": (io.BytesIO(image_bytes()), "x.png"),
                                                     "model": model})
        assert response.status_code == 202, response.get_json()
        ids.append(response.get_json()["id"])
    assert client.post(f"/api/v1/jobs/{ids[0]}/cancel").status_code == 200

    after = scrape(client)
    assert after["ebb_jobs_submitted_total"][(("model", model),)] == submitted + 2
    assert after["ebb_jobs_finished_total"][(("model", model), ("status", "cancelled"))] == cancelled + 1
    # Both messages still wait in Redis (nothing consumes this queue).
    assert after["ebb_queue_length"][(("model", model),)] == 2
    assert (("model", TEST_MODELS[1]),) in after["ebb_queue_length"]


def test_web_metrics_survive_a_dead_redis(tmp_path, monkeypatch):
    from web.testing import DEAD_REDIS_URL

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    client = APPS.make(tmp_path, monkeypatch, REDIS_URL=DEAD_REDIS_URL).test_client()
    families = scrape(client)
    assert families["ebb_redis_up"][()] == 0 and "ebb_queue_length" not in families


def test_web_metrics_need_a_token_when_the_api_does(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    client = APPS.make(tmp_path, monkeypatch, EBB_API_TOKENS="metrics-test-token").test_client()
    assert client.get("/metrics").status_code in (302, 401)
    response = client.get("/metrics", headers={"Authorization": "Bearer metrics-test-token"})
    assert response.status_code == 200 and b"ebb_redis_up 1.0" in response.data


def test_gunicorn_conf_prepares_the_multiprocess_folder(tmp_path):
    """Imported by gunicorn's master: empties PROMETHEUS_MULTIPROC_DIR, or makes one."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "prom"
    folder.mkdir()
    (folder / "counter_123.db").write_bytes(b"stale")
    (folder / "keep.txt").write_text("not ours")
    code = "import os, web.gunicorn_conf as c; print(os.environ['PROMETHEUS_MULTIPROC_DIR']); print(c.workers)"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "EBB_WEB_WORKERS": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(folder), "3"]
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]

    env.pop("PROMETHEUS_MULTIPROC_DIR")
    code = "import os, web.gunicorn_conf; p = os.environ['PROMETHEUS_MULTIPROC_DIR']; print(p, os.path.isdir(p))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    made, exists = out.stdout.split()
    assert exists == "True" and "ebb-prometheus-" in made
    assert not os.path.exists(made), "the temporary folder is removed when the master exits"
