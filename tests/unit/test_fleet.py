"""The fleet: heartbeat records in a real Redis, the rate meter, and what the
web shows of them (API, job JSON, pages, /readyz).

Real SQLite file in ``tmp_path`` and real Redis (database 13; keys under a
prefix unique to the run, deleted afterwards).
"""

from __future__ import annotations

import io
import json
import time
import uuid

import pytest

from shared import fleet
from web.testing import TEST_MODELS, TestApps, image_bytes, openapi_to_jsonschema
from worker.heartbeat import RateMeter

REDIS_DB = 13
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PREFIX = f"ebbtest-fleet{REDIS_DB}-{uuid.uuid4().hex[:8]}"
ENV = {"EBB_QUEUE_PREFIX": PREFIX}

APPS = TestApps(REDIS_DB, PREFIX)
_redis, _dispose_engines = APPS.module_fixtures()


@pytest.fixture
def rclient():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    yield client
    for key in client.scan_iter(match=f"{PREFIX}*"):
        client.delete(key)
    client.close()


def record(hostname: str, model: str, busy_rate: float = 0.0, **extra) -> dict:
    return {
        "hostname": hostname, "model": model, "device": "cpu", "precision": "fp32", "max_batch": 4,
        "running_jobs": 0, "jobs_done": 0, "iterations_per_s": 0.0, "busy_iterations_per_s": busy_rate,
        "started_at": "2026-12-01T10:00:00Z", "version": "0.1.0", **extra,
    }


# --------------------------------------------------------------------------- shared.fleet


def test_records_round_trip_sorted_and_stamped(rclient):
    fleet.publish(rclient, record("b@host", "vgg19"), 5.0, ENV)
    fleet.publish(rclient, record("a@host", "vgg19"), 5.0, ENV)
    fleet.publish(rclient, record("z@host", "efficientnet_lite0"), 5.0, ENV)
    workers = fleet.list_workers(rclient, ENV)
    assert [w["hostname"] for w in workers] == ["z@host", "a@host", "b@host"]
    assert all(w["last_seen"].endswith("Z") for w in workers)
    assert fleet.workers_by_model(workers) == {"efficientnet_lite0": 1, "vgg19": 2}


def test_a_record_expires_after_missed_heartbeats_and_withdraw_removes_at_once(rclient):
    fleet.publish(rclient, record("short@host", "vgg19"), 0.4, ENV)  # expires after 2.5 × 0.4 s
    fleet.publish(rclient, record("long@host", "vgg19"), 60, ENV)
    assert len(fleet.list_workers(rclient, ENV)) == 2
    time.sleep(1.3)
    assert [w["hostname"] for w in fleet.list_workers(rclient, ENV)] == ["long@host"]
    fleet.withdraw(rclient, "long@host", ENV)
    assert fleet.list_workers(rclient, ENV) == []


def test_unreadable_records_are_skipped(rclient):
    rclient.set(fleet.key_prefix(ENV) + "junk", b"not json")
    rclient.set(fleet.key_prefix(ENV) + "list", json.dumps([1, 2]))
    fleet.publish(rclient, record("ok@host", "vgg19"), 5.0, ENV)
    assert [w["hostname"] for w in fleet.list_workers(rclient, ENV)] == ["ok@host"]


def test_other_prefixes_are_not_this_fleet(rclient):
    fleet.publish(rclient, record("mine@host", "vgg19"), 5.0, ENV)
    other = {"EBB_QUEUE_PREFIX": PREFIX + "-other"}
    fleet.publish(rclient, record("theirs@host", "vgg19"), 5.0, other)
    assert [w["hostname"] for w in fleet.list_workers(rclient, ENV)] == ["mine@host"]
    assert [w["hostname"] for w in fleet.list_workers(rclient, other)] == ["theirs@host"]


def test_model_rate_sums_busy_rates_of_the_model():
    workers = [record("a", "m", 10.0), record("b", "m", 5.5), record("c", "other", 100.0), record("d", "m")]
    assert fleet.model_rate(workers, "m") == pytest.approx(15.5)
    assert fleet.model_rate(workers, "nobody") is None
    assert fleet.model_rate([record("idle", "m")], "m") is None


@pytest.mark.parametrize("raw, expected", [(None, 3.0), ("", 3.0), ("0.5", 0.5), ("10", 10.0)])
def test_interval_setting(raw, expected):
    env = {} if raw is None else {"EBB_FLEET_INTERVAL": raw}
    assert fleet.interval_s(env) == expected


@pytest.mark.parametrize("raw", ["0", "-1", "soon"])
def test_bad_interval_setting_is_a_clear_error(raw):
    with pytest.raises(ValueError, match="EBB_FLEET_INTERVAL"):
        fleet.interval_s({"EBB_FLEET_INTERVAL": raw})


def test_rate_meter_measures_over_the_window_and_keeps_the_busy_rate_while_idle():
    now = [0.0]
    meter = RateMeter(window_s=60.0, clock=lambda: now[0])
    meter.sample(0, 0.0)
    now[0] = 10.0
    meter.sample(100, 5.0)  # 100 iterations in 10 s, 5 s of them busy
    assert meter.rate == pytest.approx(10.0)
    assert meter.busy_rate == pytest.approx(20.0)
    now[0] = 100.0
    meter.sample(100, 5.0)  # idle since: the last-minute rate falls, the busy rate stays
    assert meter.rate == pytest.approx(0.0)
    assert meter.busy_rate == pytest.approx(20.0)


# --------------------------------------------------------------------------- the web


@pytest.fixture
def app(tmp_path, monkeypatch):
    return APPS.make(tmp_path, monkeypatch)


@pytest.fixture
def client(app):
    return app.test_client()


def post_job(client, **fields):
    form = {k: str(v) for k, v in fields.items()}
    form["image"] = (io.BytesIO(image_bytes("PNG")), "photo.png")
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")


def test_workers_api_lists_the_live_workers_and_validates_against_openapi(client, rclient):
    jsonschema = pytest.importorskip("jsonschema")
    assert client.get("/api/v1/workers").get_json() == {"workers": []}
    fleet.publish(rclient, record("w1@box", TEST_MODELS[0], 12.5, jobs_done=3), 5.0, ENV)
    body = client.get("/api/v1/workers").get_json()
    assert [(w["hostname"], w["model"], w["jobs_done"]) for w in body["workers"]] == [("w1@box", TEST_MODELS[0], 3)]
    doc = client.get("/api/v1/openapi.json").get_json()
    schema = doc["paths"]["/workers"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(body, openapi_to_jsonschema(schema))


def test_models_api_counts_workers_and_queued_jobs(client, rclient):
    assert post_job(client, model=TEST_MODELS[1]).status_code == 202
    assert post_job(client, model=TEST_MODELS[1]).status_code == 202
    fleet.publish(rclient, record("w1@box", TEST_MODELS[0]), 5.0, ENV)
    fleet.publish(rclient, record("w2@box", TEST_MODELS[0]), 5.0, ENV)
    models = {m["name"]: m for m in client.get("/api/v1/models").get_json()["models"]}
    assert (models[TEST_MODELS[0]]["workers_online"], models[TEST_MODELS[0]]["queued"]) == (2, 0)
    assert (models[TEST_MODELS[1]]["workers_online"], models[TEST_MODELS[1]]["queued"]) == (0, 2)


def test_a_job_for_a_model_without_workers_is_accepted_and_says_so(client):
    response = post_job(client, model=TEST_MODELS[1])
    assert response.status_code == 202
    job = response.get_json()
    assert job["queue"] == {"position": 1, "workers_online": 0, "eta_s": None}
    html = client.get(job["links"]["page"]).get_data(as_text=True)
    assert f"No worker is serving {TEST_MODELS[1]} right now; the job starts when one joins." in html
    assert 'id="no-worker" role="status">' in html  # shown, not hidden


def test_queued_eta_comes_from_the_work_ahead_and_the_measured_rate(client, rclient):
    fleet.publish(rclient, record("w1@box", TEST_MODELS[0], busy_rate=100.0), 5.0, ENV)
    first = post_job(client, iterations=300).get_json()
    second = post_job(client, iterations=200).get_json()
    assert first["queue"] == {"position": 1, "workers_online": 1, "eta_s": 3.0}  # 300 / 100 per s
    assert second["queue"] == {"position": 2, "workers_online": 1, "eta_s": 5.0}  # (300 + 200) / 100
    html = client.get(second["links"]["page"]).get_data(as_text=True)
    assert 'id="no-worker" role="status" hidden' in html
    assert 'id="queue-eta">5.0 s<' in html


def test_form_marks_models_without_a_worker(client, rclient):
    fleet.publish(rclient, record("w1@box", TEST_MODELS[0]), 5.0, ENV)
    html = client.get("/").get_data(as_text=True)
    assert f'<option selected value="{TEST_MODELS[0]}">{TEST_MODELS[0]}</option>' in html
    assert f'<option value="{TEST_MODELS[1]}">{TEST_MODELS[1]} (no worker online: jobs wait)</option>' in html


def test_workers_page_shows_the_fleet_and_refreshes_itself(client, rclient):
    html = client.get("/workers").get_data(as_text=True)
    assert 'id="no-workers"' in html and 'http-equiv="refresh"' in html
    fleet.publish(rclient, record("gpu0@box", TEST_MODELS[0], iterations_per_s=41.25, device="NVIDIA H200"), 5.0, ENV)
    html = client.get("/workers").get_data(as_text=True)
    assert 'data-hostname="gpu0@box"' in html and "NVIDIA H200" in html and "41.2" in html


def test_readyz_counts_workers_per_model_and_stays_ready_without_any(client, rclient):
    body = client.get("/readyz").get_json()
    assert body["status"] == "ready"
    assert body["workers"] == {TEST_MODELS[0]: 0, TEST_MODELS[1]: 0}
    fleet.publish(rclient, record("w1@box", TEST_MODELS[1]), 5.0, ENV)
    assert client.get("/readyz").get_json()["workers"] == {TEST_MODELS[0]: 0, TEST_MODELS[1]: 1}


def test_fleet_unreadable_is_a_503_for_the_workers_api_and_unknown_elsewhere(tmp_path, monkeypatch):
    from web.testing import DEAD_REDIS_URL

    app = APPS.make(tmp_path, monkeypatch, REDIS_URL=DEAD_REDIS_URL)
    client = app.test_client()
    response = client.get("/api/v1/workers")
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "fleet_unavailable"
    models = client.get("/api/v1/models").get_json()["models"]
    assert all(m["workers_online"] is None for m in models)
    assert client.get("/workers").status_code == 200
