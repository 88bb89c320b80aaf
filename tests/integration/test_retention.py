"""Deletion and retention (issue 15) on the real stack: the Flask app in front
of real Redis and a real worker process, on SQLite and PostgreSQL, with the
artifacts and uploads on disk.

* ``DELETE /api/v1/jobs/<id>`` removes the row, the artifacts and the upload,
  but never what another job still uses;
* a running job is cancelled, then deleted, and leaves no files behind;
* ``ebb purge --older-than`` deletes exactly the expired finished jobs
  (``--dry-run`` deletes nothing);
* a worker with ``EBB_RETENTION_DAYS`` deletes them by itself.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest

from .conftest import REPO_ROOT, build_stack, noise_png, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAST = {"iterations": "12", "input_size": "96", "mask_size": "8"}


def _app(stack, monkeypatch, **env):
    from web import create_app

    monkeypatch.setenv("EBB_QUEUE_PREFIX", stack.env["EBB_QUEUE_PREFIX"])
    return create_app({"TESTING": True, "EBB_ENV": {**stack.env, "EBB_RATE_LIMIT": "off", **env}})


@pytest.fixture
def client(stack, monkeypatch):
    return _app(stack, monkeypatch).test_client()


def _submit(client, image: bytes, **form: str) -> dict:
    data = {**FAST, **form, "image": (io.BytesIO(image), "x.png")}
    response = client.post("/api/v1/jobs", data=data, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def _wait(client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout=180.0) -> dict:
    return wait_for(lambda: (j := client.get(f"/api/v1/jobs/{job_id}").get_json())["status"] in statuses and j,
                    timeout, 0.2, what=f"job {job_id} to reach {statuses}")


def _set(stack, job_id, **values) -> None:
    from sqlalchemy import update

    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope(stack.database_url) as session:
        session.execute(update(Job).where(Job.id == uuid.UUID(str(job_id))).values(**values))


def _ids(stack) -> set[str]:
    from sqlalchemy import select

    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope(stack.database_url) as session:
        return {str(i) for i in session.scalars(select(Job.id))}


def test_delete_removes_only_what_no_other_job_uses(stack, client):
    shared_image, own_image = noise_png(seed=1), noise_png(seed=2)
    a, b = _submit(client, shared_image), _submit(client, shared_image, seed="3")
    c = _submit(client, own_image)
    for job in (a, b, c):
        assert _wait(client, job["id"])["status"] == "succeeded"
    storage = stack.storage
    folder = {j["id"]: storage.job_dir(j["id"]) for j in (a, b, c)}
    upload = {j["id"]: storage.upload_path(j["image"]["sha256"]) for j in (a, b, c)}
    assert all(p.is_dir() for p in folder.values()) and all(p.is_file() for p in upload.values())

    assert client.delete(f"/api/v1/jobs/{a['id']}").status_code == 204
    assert client.get(f"/api/v1/jobs/{a['id']}").status_code == 404
    assert client.get(f"/api/v1/jobs/{a['id']}/artifacts/mask_png").status_code == 404
    assert not folder[a["id"]].exists()
    assert upload[a["id"]].is_file()  # b uses the same upload
    # b is intact: its JSON, artifacts and image
    assert client.get(f"/api/v1/jobs/{b['id']}").get_json()["status"] == "succeeded"
    assert client.get(f"/api/v1/jobs/{b['id']}/artifacts/mask_png").status_code == 200
    assert client.get(f"/jobs/{b['id']}/image").status_code == 200

    assert client.delete(f"/api/v1/jobs/{b['id']}").status_code == 204
    assert not folder[b["id"]].exists() and not upload[b["id"]].exists()
    assert client.delete(f"/api/v1/jobs/{b['id']}").status_code == 404
    # c was never touched
    assert folder[c["id"]].is_dir() and upload[c["id"]].is_file()
    assert client.get(f"/api/v1/jobs/{c['id']}/artifacts/overlay_png").status_code == 200
    assert client.delete(f"/api/v1/jobs/{c['id']}").status_code == 204


def test_delete_of_a_running_job_cancels_it_first_and_leaves_no_files(stack, client):
    job = _submit(client, noise_png(seed=4), iterations="2000")
    wait_for(lambda: client.get(f"/api/v1/jobs/{job['id']}").get_json()["progress"]["iteration"] > 0,
             180, 0.2, what="the long job to run")
    response = client.delete(f"/api/v1/jobs/{job['id']}")
    assert response.status_code == 204, response.get_json()
    assert job["id"] not in _ids(stack)
    # the worker has moved on: a later job runs to the end on the same worker
    later = _submit(client, noise_png(seed=5))
    assert _wait(client, later["id"])["status"] == "succeeded"
    assert not stack.storage.job_dir(job["id"]).exists()
    assert not stack.storage.preview_path(job["id"]).exists()
    assert not stack.storage.upload_path(job["image"]["sha256"]).exists()
    assert client.delete(f"/api/v1/jobs/{later['id']}").status_code == 204


def _purge(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**stack.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "shared.cli", "purge", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_purge_deletes_exactly_the_expired_jobs_and_dry_run_nothing(stack, client):
    from shared.db.models import utcnow

    shared_image = noise_png(seed=6)
    old = _submit(client, shared_image)            # expired; its upload is shared with `recent`
    old_alone = _submit(client, noise_png(seed=7))           # expired; its upload is its own
    recent = _submit(client, shared_image, seed="9")
    for job in (old, old_alone, recent):
        assert _wait(client, job["id"])["status"] == "succeeded"
    long_ago = utcnow() - timedelta(days=31)
    for job in (old, old_alone):
        _set(stack, job["id"], finished_at=long_ago, created_at=long_ago)
    before = _ids(stack)

    dry = _purge(stack, "--older-than", "30d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert set(dry.stdout.split()[:2]) == {old["id"], old_alone["id"]}
    assert "would delete 2 job(s)" in dry.stdout
    assert _ids(stack) == before
    assert stack.storage.job_dir(old["id"]).is_dir()

    done = _purge(stack, "--older-than", "30d")
    assert done.returncode == 0, done.stderr
    assert "deleted 2 job(s)" in done.stdout
    assert _ids(stack) == before - {old["id"], old_alone["id"]}
    storage = stack.storage
    assert not storage.job_dir(old["id"]).exists() and not storage.job_dir(old_alone["id"]).exists()
    assert not storage.upload_path(old_alone["image"]["sha256"]).exists()
    assert storage.upload_path(old["image"]["sha256"]).is_file()  # `recent` uses it
    assert client.get(f"/api/v1/jobs/{recent['id']}/artifacts/mask_png").status_code == 200

    bad = _purge(stack, "--older-than", "soon")
    assert bad.returncode == 2 and "not an age" in bad.stderr
    assert client.delete(f"/api/v1/jobs/{recent['id']}").status_code == 204


def test_a_worker_with_retention_days_deletes_expired_jobs(stack, start_worker, tmp_path, monkeypatch):
    """A second worker (its own queues, the same database and folder) with
    EBB_RETENTION_DAYS=30 and a 1 s reaper: expired rows and files go, the rest stays."""
    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope

    storage = stack.storage
    long_ago = utcnow() - timedelta(days=31)
    rows = {}
    for name, status, when in (("expired", "succeeded", long_ago), ("expired_failed", "failed", long_ago),
                               ("young", "succeeded", utcnow() - timedelta(days=29)),
                               ("old_but_queued", "queued", long_ago)):
        image = noise_png(seed=100 + len(rows))
        sha = storage.save_upload(image)
        job_id = uuid.uuid4()
        folder = storage.job_dir(job_id)
        folder.mkdir(parents=True)
        (folder / "mask.png").write_bytes(b"x")
        with session_scope(stack.database_url) as session:
            session.add(Job(id=job_id, status=status, model="other-model", config={"iterations": 1},
                            image_sha256=sha, image_width=56, image_height=40, created_at=when,
                            finished_at=when if status != "queued" else None, enqueued_at=utcnow()))
        rows[name] = (str(job_id), folder, storage.upload_path(sha))

    reaping = build_stack(start_worker, database_url=stack.database_url, redis_url=stack.redis_url,
                          data_dir=stack.data_dir, queue_prefix=f"{stack.queue_prefix}-retention",
                          name="worker-retention", EBB_RETENTION_DAYS="30", EBB_REAP_INTERVAL="1")
    try:
        wait_for(lambda: rows["expired"][0] not in _ids(stack) and rows["expired_failed"][0] not in _ids(stack),
                 120, 0.5, what="the reaper to delete the expired jobs")
    finally:
        reaping.worker.stop()
    ids = _ids(stack)
    for name in ("expired", "expired_failed"):
        assert not rows[name][1].exists() and not rows[name][2].exists()
    for name in ("young", "old_but_queued"):
        assert rows[name][0] in ids and rows[name][1].is_dir() and rows[name][2].is_file()
    with session_scope(stack.database_url) as session:  # leave the shared stack as found
        for name in ("young", "old_but_queued"):
            session.delete(session.get(Job, uuid.UUID(rows[name][0])))
