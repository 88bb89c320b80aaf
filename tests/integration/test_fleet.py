"""The fleet with real worker processes: heartbeats appear, count jobs and
throughput, and vanish when a worker stops (cleanly or killed); a job for a
model nobody serves says so.
"""

from __future__ import annotations

import io
import os
import signal
import time
import uuid

import pytest

from .conftest import FAST_CONFIG, TEST_MODEL, wait_for, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(600)]

OTHER_MODEL = "vgg19"  # offered by the web, served by no worker in these tests


@pytest.fixture
def fleet_env(sqlite_url, redis_url, queue_prefix, tmp_path):
    return worker_env(database_url=sqlite_url, redis_url=redis_url, data_dir=tmp_path / "data",
                      queue_prefix=f"{queue_prefix}.fleet-{uuid.uuid4().hex[:6]}",
                      EBB_FLEET_INTERVAL="1", EBB_MODELS=f"{TEST_MODEL},{OTHER_MODEL}")


@pytest.fixture
def client(fleet_env, monkeypatch):
    from web import create_app

    monkeypatch.setenv("EBB_QUEUE_PREFIX", fleet_env["EBB_QUEUE_PREFIX"])
    return create_app({"TESTING": True, "EBB_ENV": fleet_env}).test_client()


def _workers(client) -> dict[str, dict]:
    response = client.get("/api/v1/workers")
    assert response.status_code == 200, response.get_data(as_text=True)
    return {w["hostname"]: w for w in response.get_json()["workers"]}


def _mine(client, worker) -> dict | None:
    """The record of ``worker`` (its node name is ``<name>-<hex>@<host>``)."""
    name = worker.args[worker.args.index("--hostname") + 1].split("@")[0]
    return next((w for h, w in _workers(client).items() if h.startswith(name + "@")), None)


def _models(client) -> dict[str, dict]:
    return {m["name"]: m for m in client.get("/api/v1/models").get_json()["models"]}


def test_workers_join_report_and_leave_within_seconds(client, fleet_env, start_worker, image_bytes):
    assert _workers(client) == {}
    worker = start_worker(fleet_env, name="fleet-a")
    worker.wait_ready()
    record = wait_for(lambda: _mine(client, worker), timeout=10, interval=0.2, what="the worker's heartbeat")
    assert record["model"] == TEST_MODEL and record["device"] == "cpu"
    assert record["max_batch"] == 2 and record["jobs_done"] == 0 and record["version"]
    assert _models(client)[TEST_MODEL]["workers_online"] == 1
    assert client.get("/readyz").get_json()["workers"] == {TEST_MODEL: 1, OTHER_MODEL: 0}

    # A job for a model with no worker is accepted and says so; it stays queued.
    form = {**{k: str(v) for k, v in FAST_CONFIG.items()}, "model": OTHER_MODEL,
            "image": (io.BytesIO(image_bytes), "flute.jpg")}
    orphan = client.post("/api/v1/jobs", data=form, content_type="multipart/form-data").get_json()
    assert orphan["queue"]["workers_online"] == 0 and orphan["queue"]["position"] == 1
    assert _models(client)[OTHER_MODEL]["queued"] == 1

    # A job the worker runs: counted as done, with a measured rate.
    form = {**{k: str(v) for k, v in FAST_CONFIG.items()}, "image": (io.BytesIO(image_bytes), "flute.jpg")}
    job = client.post("/api/v1/jobs", data=form, content_type="multipart/form-data").get_json()
    assert job["queue"]["workers_online"] == 1
    wait_for(lambda: client.get(f"/api/v1/jobs/{job['id']}").get_json()["status"] == "succeeded",
             timeout=120, interval=0.2, what="the job to succeed")
    record = wait_for(lambda: (r := _mine(client, worker)) and r["jobs_done"] == 1 and r, timeout=10,
                      interval=0.2, what="jobs_done to count the job")
    assert record["iterations_per_s"] > 0 and record["busy_iterations_per_s"] > 0
    assert record["running_jobs"] == 0

    # A second worker joins; then one is killed (no goodbye) and one stops cleanly.
    killed = start_worker(fleet_env, name="fleet-b")
    killed.wait_ready()
    wait_for(lambda: _mine(client, killed), timeout=10, interval=0.2, what="the second heartbeat")
    assert _models(client)[TEST_MODEL]["workers_online"] == 2
    os.killpg(killed.proc.pid, signal.SIGKILL)  # no clean shutdown: the record must expire
    started = time.monotonic()
    wait_for(lambda: _mine(client, killed) is None, timeout=10, interval=0.2, what="the killed worker to expire")
    assert time.monotonic() - started < 10
    worker.terminate()
    wait_for(lambda: _mine(client, worker) is None, timeout=20, interval=0.2,
             what="the stopped worker to leave the fleet")
    assert _models(client)[TEST_MODEL]["workers_online"] == 0
