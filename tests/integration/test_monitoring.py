"""Monitoring with real processes: Flower, Prometheus, JSON logs.

One worker (``ebb worker``, ``EBB_METRICS_PORT`` set, ``EBB_LOG_FORMAT=json``)
on a SQLite database and its own queues, the web under real gunicorn with two
processes (``gunicorn -c python:web.gunicorn_conf web.wsgi:app``, JSON logs
too), and the real Flower from PyPI started with the README's command
(``celery -A worker.celery_app flower``, basic auth) against the same broker.

* Flower sees the worker and its queue, a job's task from ``task-sent`` to
  ``SUCCESS``, a cancelled job's as ``REVOKED``, a failed job's as ``FAILURE``.
* ``/metrics`` of the web (whichever gunicorn process answers) and of the
  worker parse with ``prometheus_client``'s parser and count the finished job.
* Every job event line of both logs is one JSON object with the job id.
* A busy ``EBB_METRICS_PORT`` stops a worker at start-up, before it consumes.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from .conftest import FAST_CONFIG, TEST_MODEL, build_stack, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(600)]

FLOWER_AUTH = ("ebb", "flower-test-secret")
FAST_FORM = {k: str(v) for k, v in FAST_CONFIG.items()}


class FlowerProcess:
    """``celery -A worker.celery_app flower`` on 127.0.0.1:<free port>, basic auth."""

    def __init__(self, env: dict[str, str], workdir: Path):
        self.env = {k: v for k, v in env.items() if k != "FLOWER_UNAUTHENTICATED_API"}
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / "flower.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FlowerProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower",
             "--address=127.0.0.1", f"--port={self.port}", f"--basic-auth={':'.join(FLOWER_AUTH)}",
            ],
            env=self.env, cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def get(self, path: str, **params: Any) -> Any:
        import requests

        response = requests.get(self.url + path, params=params, auth=FLOWER_AUTH, timeout=10)
        response.raise_for_status()
        return response.json()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture(scope="module")
def monitored(redis_url, queue_prefix, start_worker, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A worker with metrics and JSON logs, and Flower watching the broker."""
    from shared.db.migrations import upgrade_database

    base = tmp_path_factory.mktemp("monitoring")
    database_url = f"sqlite:///{base / 'ebb.sqlite3'}"
    upgrade_database(database_url)
    metrics_port = free_port()
    stack = build_stack(start_worker, database_url=database_url, redis_url=redis_url,
                        data_dir=base / "data", queue_prefix=f"{queue_prefix}.mon-{uuid.uuid4().hex[:6]}",
                        name="worker-mon", wait=False, EBB_METRICS_PORT=str(metrics_port),
                        EBB_METRICS_ADDR="127.0.0.1", EBB_LOG_FORMAT="json", EBB_FLEET_INTERVAL="1")
    flower = FlowerProcess(stack.env, base / "flower").start()
    try:
        stack.worker.wait_ready()
        hostname = wait_for(lambda: next((line for line in stack.worker.log_text().splitlines()
                                          if " ready." in line), None), 30, what="the ready line")
        hostname = json.loads(hostname)["message"].split(" ready.")[0]
        yield {"stack": stack, "flower": flower, "metrics_port": metrics_port, "hostname": hostname}
    finally:
        flower.stop()
        stack.worker.terminate()
        stack.worker.stop()


@pytest.fixture
def web(monitored, start_gunicorn):
    env = {**monitored["stack"].env, "EBB_SECRET_KEY": "monitoring-test", "EBB_RATE_LIMIT": "off",
           "EBB_MAX_ITERATIONS": "10000"}  # the long job below runs 5000
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn_conf makes its own
    env.pop("EBB_METRICS_PORT", None)
    server = start_gunicorn(env, name="web-mon")
    server.wait_ready()
    return server


def submit(web, image: bytes, **form: str) -> str:
    import requests

    response = requests.post(f"{web.base_url}/api/v1/jobs", files={"image": ("flute.jpg", image)},
                             data={**FAST_FORM, "model": TEST_MODEL, **form}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job_status(web, job_id: str) -> dict:
    import requests

    return requests.get(f"{web.base_url}/api/v1/jobs/{job_id}", timeout=10).json()


def wait_job(web, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout=180.0) -> dict:
    return wait_for(lambda: (body := job_status(web, job_id))["status"] in statuses and body, timeout,
                    interval=0.2, what=f"job {job_id} to reach {statuses}")


def flower_task(flower: FlowerProcess, task_id: str, state: str, timeout: float = 60.0) -> dict:
    import requests

    def seen():
        try:
            info = flower.get(f"/api/task/info/{task_id}")
        except requests.HTTPError:
            return None
        return info if info.get("state") == state else None

    try:
        return wait_for(seen, timeout, interval=0.3, what=f"Flower to show task {task_id} as {state}")
    except AssertionError as error:
        raise AssertionError(f"{error}\nflower log:\n{flower.tail()}") from None


def wait_flower_sees_worker(flower: FlowerProcess, hostname: str) -> None:
    """Until Flower's event receiver has the worker's heartbeats (so it will see
    the next task's task-sent) and its inspection lists the worker's queues."""
    import requests

    def alive():
        try:
            return flower.get("/api/workers", status=1).get(hostname) is True
        except requests.RequestException:
            return False

    try:
        wait_for(alive, 90, interval=0.5, what=f"Flower to see worker {hostname} alive")
    except AssertionError as error:
        raise AssertionError(f"{error}\nflower log:\n{flower.tail()}") from None


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(families: dict, name: str, **labels: str) -> float:
    return families.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def json_events(text: str, job_id: str) -> list[dict]:
    """The JSON log lines about ``job_id``; fails on a non-JSON line that names it."""
    events = []
    for line in text.splitlines():
        if job_id not in line:
            continue
        assert line.startswith("{"), f"not a JSON log line: {line!r}"
        record = json.loads(line)
        if record.get("job_id") == job_id and "event" in record:
            events.append(record)
    return events


def test_a_finished_job_in_flower_prometheus_and_the_logs(monitored, web, image_bytes):
    stack, flower, hostname = monitored["stack"], monitored["flower"], monitored["hostname"]
    worker_metrics = f"http://127.0.0.1:{monitored['metrics_port']}/metrics"
    wait_flower_sees_worker(flower, hostname)
    web_before = scrape(f"{web.base_url}/metrics")
    worker_before = scrape(worker_metrics)

    job_id = submit(web, image_bytes)
    assert wait_job(web, job_id)["status"] == "succeeded"

    # Flower: the task (its id is the job id) from task-sent to SUCCESS, on our worker.
    task = flower_task(flower, job_id, "SUCCESS")
    assert task["name"] == "ebb.explain" and task["worker"] == hostname
    assert task["sent"] and task["received"] and task["started"] and task["succeeded"]
    # (sent is the web's clock, the rest the worker's: no order across processes)
    assert task["received"] <= task["started"] <= task["succeeded"]
    assert task["routing_key"] == f"{stack.queue_prefix}.{TEST_MODEL}" or task["routing_key"] is None
    listed = flower.get("/api/tasks", workername=hostname)
    assert listed[job_id]["state"] == "SUCCESS"
    workers = flower.get("/api/workers", refresh=1, workername=hostname)
    queues = [q["name"] for q in workers[hostname]["active_queues"]]
    assert queues == [f"{stack.queue_prefix}.{TEST_MODEL}"]
    lengths = {q["name"]: q["messages"] for q in flower.get("/api/queues/length")["active_queues"]}
    assert lengths[f"{stack.queue_prefix}.{TEST_MODEL}"] == 0

    # Prometheus, web: every scrape (either gunicorn process) counts the one submission.
    for _ in range(6):
        families = scrape(f"{web.base_url}/metrics")
        assert value(families, "ebb_jobs_submitted_total", model=TEST_MODEL) == \
            value(web_before, "ebb_jobs_submitted_total", model=TEST_MODEL) + 1
        assert value(families, "ebb_workers_online", model=TEST_MODEL) == 1
        assert value(families, "ebb_queue_length", model=TEST_MODEL) == 0
        assert value(families, "ebb_redis_up") == 1

    # Prometheus, worker: started, finished (succeeded), its duration, queue wait, batches.
    after = scrape(worker_metrics)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(worker_before, name, **labels)

    assert delta("ebb_jobs_started_total", model=TEST_MODEL) == 1
    assert delta("ebb_jobs_finished_total", model=TEST_MODEL, status="succeeded") == 1
    assert delta("ebb_job_duration_seconds_count", model=TEST_MODEL, status="succeeded") == 1
    assert delta("ebb_job_duration_seconds_sum", model=TEST_MODEL, status="succeeded") > 0
    assert delta("ebb_job_queue_wait_seconds_count", model=TEST_MODEL) == 1
    assert delta("ebb_mask_iterations_total", model=TEST_MODEL) == FAST_CONFIG["iterations"]
    assert delta("ebb_engine_batch_size_count", model=TEST_MODEL, kind="mp") == FAST_CONFIG["iterations"]
    assert "process_cpu_seconds_total" in after  # the client's default collectors

    # Logs: one JSON object per job event, with the job id, model and duration.
    web_events = json_events(web.log_path.read_text(errors="replace"), job_id)
    assert [(e["event"], e["model"]) for e in web_events] == [("submitted", TEST_MODEL)]
    worker_events = json_events(stack.worker.log_text(), job_id)
    assert [e["event"] for e in worker_events] == ["started", "succeeded"]
    assert all(e["model"] == TEST_MODEL and e["level"] == "INFO" for e in worker_events)
    assert worker_events[1]["duration_s"] > 0 and worker_events[0]["queued_s"] >= 0
    log_lines = stack.worker.log_text().splitlines()
    assert "[config]" not in "\n".join(log_lines), "no Celery banner among the JSON lines"
    records = [json.loads(line) for line in log_lines if line.startswith("{")]
    assert any(r["logger"].startswith("celery") for r in records), "Celery's own records are JSON too"
    access = [json.loads(line) for line in web.log_path.read_text().splitlines()
              if f"/api/v1/jobs/{job_id}" in line and '"gunicorn.access"' in line]
    assert access, "gunicorn's access log is JSON too"


def test_cancelled_and_failed_jobs_end_revoked_and_failed(monitored, web, image_bytes):
    stack, flower, hostname = monitored["stack"], monitored["flower"], monitored["hostname"]
    worker_metrics = f"http://127.0.0.1:{monitored['metrics_port']}/metrics"
    wait_flower_sees_worker(flower, hostname)
    before = scrape(worker_metrics)

    # A long job, cancelled while it runs: REVOKED.
    long_job = submit(web, image_bytes, iterations="5000")
    wait_for(lambda: job_status(web, long_job)["progress"]["iteration"] > 0, 120, interval=0.2,
             what="the long job to make progress")
    import requests

    assert requests.post(f"{web.base_url}/api/v1/jobs/{long_job}/cancel", timeout=10).status_code == 200
    assert wait_job(web, long_job)["status"] == "cancelled"
    task = flower_task(flower, long_job, "REVOKED")
    assert task["sent"] and task["started"] and task["revoked"] and not task["succeeded"]

    # Not an image: the job fails, its task is FAILURE with the job's error.
    bad = submit_raw(stack, b"this is not an image")
    assert stack.wait(bad).status == "failed"
    task = flower_task(flower, str(bad), "FAILURE")
    assert "could not decode the image" in task["exception"] and task["sent"]

    after = scrape(worker_metrics)
    for status in ("cancelled", "failed"):
        assert value(after, "ebb_jobs_finished_total", model=TEST_MODEL, status=status) == \
            value(before, "ebb_jobs_finished_total", model=TEST_MODEL, status=status) + 1, status
    events = {e["event"] for e in json_events(stack.worker.log_text(), long_job)}
    assert events == {"started", "cancelled"}
    failed = json_events(stack.worker.log_text(), str(bad))
    assert [e["event"] for e in failed] == ["started", "failed"] and failed[1]["level"] == "WARNING"

    # Nothing was redelivered: both messages were acknowledged.
    time.sleep(1.0)
    assert stack.job(bad).attempts == 1
    import redis

    client = redis.Redis.from_url(stack.redis_url)
    try:
        assert client.llen(f"{stack.queue_prefix}.{TEST_MODEL}") == 0
        assert client.hlen("unacked") == 0 or not any(
            long_job in str(v) or str(bad) in str(v) for v in client.hvals("unacked"))
    finally:
        client.close()


def submit_raw(stack, data: bytes) -> uuid.UUID:
    """A job whose upload is ``data`` (the web would refuse it), sent as the web sends it."""
    return stack.submit(data)


def test_a_busy_metrics_port_stops_the_worker_before_it_consumes(start_worker, sqlite_url, redis_url,
                                                                 queue_prefix, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = build_stack(start_worker, database_url=sqlite_url, redis_url=redis_url,
                            data_dir=tmp_path / "data", queue_prefix=f"{queue_prefix}.busyport", name="busy",
                            wait=False, EBB_METRICS_PORT=str(port), EBB_METRICS_ADDR="127.0.0.1")
        code = wait_for(lambda: stack.worker.proc.poll() is not None and (stack.worker.proc.returncode,),
                        timeout=120, what="the worker to exit")[0]
    log = stack.worker.log_text()
    assert code != 0 and "start-up failed" in log and " ready." not in log, log
