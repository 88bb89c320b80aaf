"""Quotas on work and deletion (issue 15): the pure parts (job work, budget
refill time, ages, settings) and the web routes on SQLite with real Redis."""

from __future__ import annotations

import io
import re
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared import settings as settings_mod
from shared.quotas import WINDOW, budget_refill, job_work
from shared.retention import parse_age
from web.testing import TestApps, image_bytes

REDIS_DB = 10
PREFIX = f"ebbtest-quota{REDIS_DB}-{uuid.uuid4().hex[:8]}"
APPS = TestApps(REDIS_DB, PREFIX)
_redis, _dispose_engines = APPS.module_fixtures()
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


# --------------------------------------------------------------------------- pure


def test_job_work_is_targets_times_iterations_times_areas():
    assert job_work({"iterations": 300}) == 300
    assert job_work({"iterations": 300}, targets=[1, 2, 3]) == 900
    assert job_work({"iterations": 300}, top_k=4) == 1200
    assert job_work({"iterations": 100, "method": "extremal", "areas": [0.1, 0.2]}, top_k=2) == 400
    # areas only count for extremal jobs; odd stored values never raise
    assert job_work({"iterations": 100, "areas": [0.1, 0.2]}) == 100
    assert job_work(None) == 1 and job_work({"iterations": "x"}, top_k=True) == 1


def test_budget_refill_is_when_enough_work_leaves_the_hour():
    entries = [(T0, 400), (T0 + timedelta(minutes=10), 300), (T0 + timedelta(minutes=20), 300)]
    now = T0 + timedelta(minutes=30)
    assert budget_refill(entries, 0, 1000, now) is None          # exactly full: a 0 job fits
    assert budget_refill(entries, 1, 1000, now) == T0 + WINDOW   # the first job must leave
    assert budget_refill(entries, 500, 1000, now) == T0 + timedelta(minutes=10) + WINDOW
    # jobs older than the hour do not count
    assert budget_refill([(T0 - WINDOW, 1000)], 1000, 1000, T0) is None


def test_parse_age():
    assert parse_age("30d") == timedelta(days=30)
    assert parse_age("12h") == timedelta(hours=12)
    assert parse_age("90m") == timedelta(minutes=90)
    assert parse_age("2") == timedelta(days=2)
    for bad in ("", "0d", "-1d", "3w", "d"):
        with pytest.raises(ValueError):
            parse_age(bad)


def test_quota_and_retention_settings(tmp_path):
    base = {"DATA_DIR": str(tmp_path)}
    s = settings_mod.load(base)
    assert (s.max_iterations, s.max_queued_per_owner, s.work_budget, s.retention_days) == (2000, 20, None, None)
    s = settings_mod.load({**base, "EBB_MAX_ITERATIONS": "50", "EBB_MAX_QUEUED_PER_OWNER": "3",
                           "EBB_WORK_BUDGET": "1000", "EBB_RETENTION_DAYS": "0.5"})
    assert (s.max_iterations, s.max_queued_per_owner, s.work_budget, s.retention_days) == (50, 3, 1000, 0.5)
    for name, bad in (("EBB_MAX_ITERATIONS", "0"), ("EBB_WORK_BUDGET", "lots"),
                      ("EBB_RETENTION_DAYS", "-1"), ("EBB_RETENTION_DAYS", "forever")):
        with pytest.raises(ValueError, match=name):
            settings_mod.load({**base, name: bad})


# --------------------------------------------------------------------------- web


def _post(client, data: bytes | None = None, **fields):
    form = {k: str(v) for k, v in fields.items()}
    form["image"] = (io.BytesIO(data or image_bytes("PNG", (64, 48))), "photo.png")
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")


def _set(app, job_id, **values):
    from sqlalchemy import update

    from shared.db.models import Job

    with app.extensions["ebb"].session_factory() as db:
        db.execute(update(Job).where(Job.id == uuid.UUID(str(job_id))).values(**values))
        db.commit()


def _count(app) -> int:
    from sqlalchemy import func, select

    from shared.db.models import Job

    with app.extensions["ebb"].session_factory() as db:
        return int(db.scalar(select(func.count()).select_from(Job)))


def test_iterations_over_the_cap_are_a_400_naming_iterations(tmp_path, monkeypatch):
    app = APPS.make(tmp_path, monkeypatch, EBB_MAX_ITERATIONS="100")
    client = app.test_client()
    response = _post(client, iterations=101)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert (error["code"], error["field"]) == ("too_expensive", "iterations")
    assert "at most 100" in error["message"] and "EBB_MAX_ITERATIONS" in error["message"]
    assert _count(app) == 0
    assert _post(client, iterations=100).status_code == 202


def test_queued_cap_is_a_429_with_retry_after_at_exactly_the_limit(tmp_path, monkeypatch):
    app = APPS.make(tmp_path, monkeypatch, EBB_MAX_QUEUED_PER_OWNER="2")
    client = app.test_client()
    first = _post(client, iterations=10)
    assert first.status_code == 202 and _post(client, iterations=10).status_code == 202
    refused = _post(client, iterations=10)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.get_json()["error"]
    assert error["code"] == "too_many_jobs" and "EBB_MAX_QUEUED_PER_OWNER=2" in error["message"]
    assert _count(app) == 2
    # a finished job frees its place
    _set(app, first.get_json()["id"], status="succeeded")
    assert _post(client, iterations=10).status_code == 202


def test_work_budget_is_a_429_saying_when_it_refills_and_bad_input_spends_nothing(tmp_path, monkeypatch):
    app = APPS.make(tmp_path, monkeypatch, EBB_WORK_BUDGET="100")
    client = app.test_client()
    for _ in range(3):  # refused input spends nothing
        assert _post(client, iterations="abc").status_code == 400
        assert _post(client, b"not an image", iterations=60).status_code == 400
    assert client.get("/api/v1/usage").get_json()["work_last_hour"] == 0
    first = _post(client, iterations=60)
    assert first.status_code == 202
    assert first.get_json()["usage"]["work_last_hour"] == 60
    assert _post(client, iterations=40).status_code == 202  # exactly the budget
    refused = _post(client, iterations=1)
    assert refused.status_code == 429
    error = refused.get_json()["error"]
    assert error["code"] == "work_budget_exceeded"
    wait = int(refused.headers["Retry-After"])
    assert 3500 <= wait <= 3600 and error["retry_after_s"] == wait
    assert error["refills_at"] in error["message"] and "EBB_WORK_BUDGET" in error["message"]
    usage = client.get("/api/v1/usage").get_json()
    assert usage == {**usage, "owner": "default", "work_last_hour": 100, "work_budget": 100,
                     "work_left": 0, "active_jobs": 2, "max_active_jobs": 20, "max_iterations": 2000}
    # deleting a job does not give its work back
    second = client.get("/api/v1/jobs").get_json()["jobs"][0]
    assert second["usage"]["work_last_hour"] == 100
    _set(app, second["id"], status="cancelled")
    assert client.get("/api/v1/usage").get_json()["work_last_hour"] == 100  # cancelled: still counts
    assert client.delete(f"/api/v1/jobs/{second['id']}").status_code == 204
    assert client.get("/api/v1/usage").get_json()["work_last_hour"] == 100
    assert _post(client, iterations=1).status_code == 429
    # an hour later the first job has left the window
    _set(app, first.get_json()["id"], created_at=datetime.now(timezone.utc) - timedelta(minutes=61))
    assert _post(client, iterations=60).status_code == 202
    # a job larger than the whole budget can never fit: 400, not 429
    too_big = _post(client, iterations=101)
    assert too_big.status_code == 400 and too_big.get_json()["error"]["field"] == "iterations"


def _finish(app, storage_dir: Path, job_id: str) -> Path:
    folder = storage_dir / "jobs" / job_id
    folder.mkdir(parents=True)
    (folder / "mask.png").write_bytes(b"png")
    _set(app, job_id, status="succeeded")
    return folder


def test_delete_removes_row_artifacts_and_unshared_upload(tmp_path, monkeypatch):
    app = APPS.make(tmp_path, monkeypatch)
    client = app.test_client()
    data_dir = app.extensions["ebb"].settings.data_dir
    shared_png, own_png = image_bytes("PNG", (64, 48)), image_bytes("PNG", (50, 40))
    a = _post(client, shared_png, iterations=10).get_json()
    b = _post(client, shared_png, iterations=10).get_json()
    c = _post(client, own_png, iterations=10).get_json()
    folders = {j["id"]: _finish(app, data_dir, j["id"]) for j in (a, b, c)}
    assert client.get(f"/jobs/{c['id']}/thumbnail").status_code == 200
    assert list((data_dir / "thumbnails").glob(f"{c['image']['sha256']}-*"))

    assert client.delete(f"/api/v1/jobs/{a['id']}").status_code == 204
    assert client.get(f"/api/v1/jobs/{a['id']}").status_code == 404
    assert not folders[a["id"]].exists() and folders[b["id"]].exists()
    assert (data_dir / "uploads" / a["image"]["sha256"]).is_file()  # b still uses it
    assert client.delete(f"/api/v1/jobs/{a['id']}").status_code == 404

    assert client.delete(f"/api/v1/jobs/{c['id']}").status_code == 204
    assert not (data_dir / "uploads" / c["image"]["sha256"]).exists()
    assert not list((data_dir / "thumbnails").glob(f"{c['image']['sha256']}-*"))
    assert client.get(f"/api/v1/jobs/{b['id']}").status_code == 200


def test_delete_cancels_a_queued_job_first(tmp_path, monkeypatch):
    app = APPS.make(tmp_path, monkeypatch)
    client = app.test_client()
    job = _post(client, iterations=10).get_json()
    assert client.delete(f"/api/v1/jobs/{job['id']}").status_code == 204
    assert _count(app) == 0


def test_delete_of_a_running_job_that_does_not_stop_is_a_409(tmp_path, monkeypatch):
    import web.jobs as jobs_svc

    monkeypatch.setattr(jobs_svc, "DELETE_WAIT_S", 0.3)
    app = APPS.make(tmp_path, monkeypatch)
    client = app.test_client()
    job = _post(client, iterations=10).get_json()
    _set(app, job["id"], status="running")  # no worker: it never stops
    response = client.delete(f"/api/v1/jobs/{job['id']}")
    assert response.status_code == 409 and response.headers["Retry-After"] == "2"
    assert response.get_json()["error"]["code"] == "job_running"
    assert client.get(f"/api/v1/jobs/{job['id']}").get_json()["cancel_requested"] is True
    _set(app, job["id"], status="cancelled")
    assert client.delete(f"/api/v1/jobs/{job['id']}").status_code == 204


def test_page_delete_button_needs_the_csrf_token(tmp_path, monkeypatch):
    app = APPS.make(tmp_path, monkeypatch)
    client = app.test_client()
    job = _post(client, iterations=10).get_json()
    _set(app, job["id"], status="failed")
    html = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert f'action="/jobs/{job["id"]}/delete"' in html
    assert client.post(f"/jobs/{job['id']}/delete").status_code == 400  # no token
    assert _count(app) == 1
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    response = client.post(f"/jobs/{job['id']}/delete", data={"csrf_token": token})
    assert response.status_code == 303 and response.headers["Location"].endswith("/jobs")
    assert _count(app) == 0
