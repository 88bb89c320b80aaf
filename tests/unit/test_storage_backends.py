"""The store behind ``open_storage``: the file backend's key interface, the
choice by ``STORAGE_URL``, an unreachable S3 store, the reuse key, and the
web's reuse / ``force`` / ``storage_unavailable`` answers (SQLite + Redis).

The S3 backend against a real server is tested in
``tests/integration/test_object_store.py`` (SeaweedFS).
"""

from __future__ import annotations

import io
import socket
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import update

from shared import reuse
from shared import settings as settings_mod
from shared.storage import S3Storage, Storage, StorageUnavailable, check_key, job_key, open_storage
from web.testing import TEST_MODELS, TestApps, image_bytes, queue_messages

REDIS_DB = 15
PREFIX = f"ebbtest-store{REDIS_DB}-{uuid.uuid4().hex[:8]}"
APPS = TestApps(REDIS_DB, PREFIX)
_redis, _dispose_engines = APPS.module_fixtures()
QUEUE = f"{PREFIX}.{TEST_MODELS[0]}"


def closed_port() -> int:
    """A local TCP port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- keys and the file store


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/../b", "", "a/b/", ".hidden", "a b"])
def test_bad_keys_are_refused(key):
    with pytest.raises(ValueError, match="not a valid store key"):
        check_key(key)


def test_file_store_key_interface(tmp_path):
    storage = Storage(tmp_path)
    job_id = uuid.uuid4()
    storage.put(f"jobs/{job_id}/mask.png", b"png")
    storage.put(f"jobs/{job_id}/results/1/mask.png", b"png1")
    assert storage.get(f"jobs/{job_id}/mask.png") == b"png"
    assert storage.exists(f"jobs/{job_id}/mask.png") and not storage.exists(f"jobs/{job_id}/heatmap.png")
    assert storage.local_path(f"jobs/{job_id}/mask.png") == tmp_path.resolve() / "jobs" / str(job_id) / "mask.png"
    assert storage.list_keys(f"jobs/{job_id}") == {f"jobs/{job_id}/mask.png", f"jobs/{job_id}/results/1/mask.png"}
    with pytest.raises(FileNotFoundError):
        storage.get(f"jobs/{job_id}/heatmap.png")
    storage.delete_prefix(f"jobs/{job_id}")
    assert storage.list_keys(f"jobs/{job_id}") == set()


def test_file_store_writes_artifacts_where_they_always_were(tmp_path):
    storage = Storage(tmp_path)
    job_id = uuid.uuid4()
    seen = []
    key = storage.write_artifacts(job_id, 3, lambda folder: seen.append(folder))
    assert key == job_key(job_id) == f"jobs/{job_id}"
    assert seen == [storage.job_dir(job_id)]  # unchanged single-machine layout


def test_storage_url_picks_the_backend(tmp_path):
    default = settings_mod.load({"DATA_DIR": str(tmp_path)})
    assert default.storage == f"file://{tmp_path.resolve()}"
    assert isinstance(open_storage(default), Storage) and open_storage(default).data_dir == tmp_path.resolve()
    other = settings_mod.load({"DATA_DIR": str(tmp_path), "STORAGE_URL": f"file://{tmp_path / 'elsewhere'}"})
    assert open_storage(other).data_dir == (tmp_path / "elsewhere").resolve()
    s3 = settings_mod.load({"DATA_DIR": str(tmp_path), "STORAGE_URL": "s3://bucket/some/prefix",
                            "S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    store = open_storage(s3)
    assert isinstance(store, S3Storage)
    assert (store.bucket, store.prefix, store.endpoint_url) == ("bucket", "some/prefix/", "http://127.0.0.1:9")
    assert store.local_path("jobs/x") is None and store.kind == "s3"


@pytest.mark.parametrize("url", ["s3://", "file://relative/path", "ftp://x", "bucket"])
def test_bad_storage_urls_are_start_up_errors(url, tmp_path):
    with pytest.raises(ValueError, match="STORAGE_URL"):
        settings_mod.load({"DATA_DIR": str(tmp_path), "STORAGE_URL": url})


def test_storage_and_reuse_settings(tmp_path):
    base = {"DATA_DIR": str(tmp_path)}
    s = settings_mod.load(base)
    assert (s.reuse, s.presigned_urls, s.presigned_ttl_s, s.storage_retries) == (True, False, 300, 8)
    s = settings_mod.load({**base, "EBB_REUSE": "0", "EBB_PRESIGNED_URLS": "1", "EBB_PRESIGNED_TTL": "60",
                           "EBB_STORAGE_RETRIES": "2", "EBB_REPRODUCIBLE": "1", "EBB_LAYOUT_WIDTH": "4"})
    assert (s.reuse, s.presigned_urls, s.presigned_ttl_s, s.storage_retries) == (False, True, 60, 2)
    assert dict(s.arithmetic) == {"EBB_REPRODUCIBLE": "1", "EBB_LAYOUT_WIDTH": "4", "EBB_WEIGHTS_FILE": ""}
    with pytest.raises(ValueError, match="EBB_REUSE"):
        settings_mod.load({**base, "EBB_REUSE": "maybe"})


# --------------------------------------------------------------------------- an unreachable S3 store


def dead_store(tmp_path: Path, monkeypatch) -> S3Storage:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    return S3Storage("bucket", "p", data_dir=tmp_path / "scratch",
                     endpoint_url=f"http://127.0.0.1:{closed_port()}", timeout_s=1.0, retries=2)


def test_unreachable_store_is_storage_unavailable(tmp_path, monkeypatch):
    store = dead_store(tmp_path, monkeypatch)
    with pytest.raises(StorageUnavailable, match="unreachable"):
        store.save_upload(b"image bytes")
    with pytest.raises(StorageUnavailable):
        store.check()


def test_worker_upload_retries_with_backoff_then_gives_up_readably(tmp_path, monkeypatch):
    store = dead_store(tmp_path, monkeypatch)

    def render(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "mask.png").write_bytes(b"png")

    started = time.monotonic()
    beats = []
    with pytest.raises(StorageUnavailable, match=r"upload of mask.png failed after 2 attempts"):
        store.write_artifacts(uuid.uuid4(), 1, render, on_retry=lambda: beats.append(1))
    assert time.monotonic() - started >= 0.5  # one backoff pause between the two attempts
    assert beats == [1]  # the job's heartbeat is written before each pause
    assert list((tmp_path / "scratch" / "staging").iterdir()) == []  # the staging copy is gone


def test_a_job_whose_artifacts_cannot_be_stored_fails_with_a_readable_message(tmp_path, tiny):
    from shared.attribution.config import PerturbationConfig
    from shared.db.migrations import upgrade_database
    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope
    from worker.jobs import run_job
    from worker.runtime import Runtime

    class StoreDownOnWrite(Storage):
        def write_artifacts(self, job_id, attempt, render, retries=1, on_retry=None):
            raise StorageUnavailable("upload of mask.npy failed after 6 attempts: object store unreachable")

    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade_database(url)
    settings = settings_mod.load({"DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": url, "EBB_MODEL": "tiny"})
    runtime = Runtime(model_name="tiny", classifier=tiny, device="cpu", settings=settings,
                      storage=StoreDownOnWrite(settings.data_dir), hostname="tiny.cpu@test")
    config = PerturbationConfig(iterations=4, input_size=64, mask_size=8)
    job_id = uuid.uuid4()
    with session_scope(url) as s:
        s.add(Job(id=job_id, status="queued", model="tiny", config=config.to_dict(),
                  image_sha256=runtime.storage.save_upload(image_bytes("PNG", (40, 32))), image_width=40,
                  image_height=32, image_filename="x.png", progress_total=4, created_at=utcnow()))
    assert run_job(job_id, runtime) == "failed"
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job.status == "failed" and job.artifacts_key is None
        assert job.error == ("could not write the artifacts to the store: upload of mask.npy failed "
                             "after 6 attempts: object store unreachable")


@pytest.mark.parametrize("env, method, reusable", [
    ({}, "meaningful_perturbation", True),
    ({"EBB_REPRODUCIBLE": "0"}, "meaningful_perturbation", False),  # not the fixed layout
    ({}, "extremal", False),  # equal only within float rounding
])
def test_the_worker_commits_artifacts_key_and_reuse_key(tmp_path, tiny, env, method, reusable):
    from shared.attribution.config import PerturbationConfig
    from shared.db.migrations import upgrade_database
    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope
    from worker.jobs import run_job
    from worker.runtime import Runtime

    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade_database(url)
    settings = settings_mod.load({"DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": url, "EBB_MODEL": "tiny",
                                  **env})
    runtime = Runtime(model_name="tiny", classifier=tiny, device="cpu", settings=settings,
                      storage=Storage(settings.data_dir), hostname="tiny.cpu@test")
    config = PerturbationConfig(iterations=4, input_size=64, mask_size=8, method=method, areas=(0.2,))
    job_id, request = uuid.uuid4(), "r" * 64
    with session_scope(url) as s:
        s.add(Job(id=job_id, status="queued", model="tiny", config=config.to_dict(),
                  image_sha256=runtime.storage.save_upload(image_bytes("PNG", (40, 32))), image_width=40,
                  image_height=32, image_filename="x.png", progress_total=4, created_at=utcnow(),
                  reuse_key=request))
    assert run_job(job_id, runtime) == "succeeded"
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job.artifacts_key == f"jobs/{job_id}"
        assert runtime.storage.exists(f"{job.artifacts_key}/mask.npy")
        expected = reuse.reuse_key(request, settings.arithmetic) if reusable else None
        assert job.reuse_key == expected


# --------------------------------------------------------------------------- the reuse key


def key(**changes):
    base = dict(image_sha256="a" * 64, model="vgg19", target_index=None, targets=None, top_k=None,
                config={"seed": 0, "precision": "fp32", "iterations": 300})
    base.update(changes)
    return reuse.request_key(**base)


def test_the_reuse_key_covers_inputs_config_and_arithmetic():
    assert key() == key()
    assert len({key(), key(image_sha256="b" * 64), key(model="resnet50"), key(target_index=3),
                key(targets=[3, 4]), key(top_k=3), key(config={"seed": 1, "precision": "fp32", "iterations": 300}),
                key(config={"seed": 0, "precision": "bf16", "iterations": 300})}) == 8
    assert key(top_k=1) == key()  # top-1 is the default
    a = (("EBB_REPRODUCIBLE", ""), ("EBB_LAYOUT_WIDTH", ""), ("EBB_WEIGHTS_FILE", ""))
    b = (("EBB_REPRODUCIBLE", ""), ("EBB_LAYOUT_WIDTH", "4"), ("EBB_WEIGHTS_FILE", ""))
    assert reuse.reuse_key(key(), a) == reuse.reuse_key(key(), tuple(reversed(a)))
    assert reuse.reuse_key(key(), a) != reuse.reuse_key(key(), b)
    assert reuse.reproducible(a) and not reuse.reproducible((("EBB_REPRODUCIBLE", "0"),))


# --------------------------------------------------------------------------- the web


def post_job(client, data: bytes, **fields):
    form = {k: str(v) for k, v in fields.items()}
    form["image"] = (io.BytesIO(data), "photo.png")
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")


def finish_as_the_worker_does(app, job_id: str, arithmetic=None) -> None:
    """Mark a queued job succeeded with its artifacts, as ``worker.jobs`` commits it."""
    from shared.db.models import Job

    st = app.extensions["ebb"]
    with st.session_factory() as db:
        job = db.get(Job, uuid.UUID(job_id))
        st.storage.put(f"jobs/{job_id}/overlay.png", image_bytes("PNG", (8, 8)))
        db.execute(update(Job).where(Job.id == job.id).values(
            status="succeeded", artifacts_key=f"jobs/{job_id}", results=[{"scores": {"before": 0.5, "after": 0.1}}],
            score_before=0.5, score_after=0.1, finished_at=job.created_at,
            reuse_key=reuse.reuse_key(job.reuse_key, arithmetic or st.settings.arithmetic)))
        db.commit()


@pytest.fixture
def app(tmp_path, monkeypatch):
    return APPS.make(tmp_path, monkeypatch)


def test_an_identical_submission_is_answered_at_once_from_the_succeeded_job(app):
    client = app.test_client()
    image = image_bytes("PNG", (64, 48))
    first = post_job(client, image, iterations=20, seed=3).get_json()
    assert first["status"] == "queued" and first["reused_from"] is None
    # queued (not succeeded yet): the same submission is queued again
    assert post_job(client, image, iterations=20, seed=3).get_json()["reused_from"] is None
    finish_as_the_worker_does(app, first["id"])
    messages = len(queue_messages(APPS.redis_url, QUEUE))

    response = post_job(client, image, iterations=20, seed=3)
    assert response.status_code == 202
    again = response.get_json()
    assert again["status"] == "succeeded" and again["reused_from"] == first["id"] and again["id"] != first["id"]
    assert again["artifacts"]["overlay_png"] == f"/api/v1/jobs/{again['id']}/artifacts/overlay_png"
    assert (client.get(again["artifacts"]["overlay_png"]).data
            == client.get(f"/api/v1/jobs/{first['id']}/artifacts/overlay_png").data)
    assert len(queue_messages(APPS.redis_url, QUEUE)) == messages  # nothing queued
    # a reuse of a reuse points at the original
    assert post_job(client, image, iterations=20, seed=3).get_json()["reused_from"] == first["id"]

    # anything else that changes the result runs
    for changed in ({"seed": 4}, {"precision": "bf16"}, {"target": "5"}, {"top_k": "2"}):
        body = post_job(client, image, **{"iterations": 20, "seed": 3, **changed}).get_json()
        assert body["status"] == "queued" and body["reused_from"] is None, changed
    # force runs it anyway
    for value in ("1", "true", "on"):
        body = post_job(client, image, iterations=20, seed=3, force=value).get_json()
        assert body["status"] == "queued" and body["reused_from"] is None
    assert post_job(client, image, iterations=20, seed=3, force="0").get_json()["reused_from"] == first["id"]


def test_force_must_be_a_flag(app):
    response = post_job(app.test_client(), image_bytes("PNG", (64, 48)), force="maybe")
    assert response.status_code == 400
    assert response.get_json()["error"] == {"code": "invalid_value", "message": "force must be 1 or 0, got 'maybe'",
                                            "field": "force"}


def test_other_arithmetic_settings_are_not_reused(app):
    client = app.test_client()
    image = image_bytes("PNG", (64, 40))
    first = post_job(client, image).get_json()
    # the worker ran with another fixed layout width than the web knows of
    finish_as_the_worker_does(app, first["id"], arithmetic=(("EBB_REPRODUCIBLE", ""), ("EBB_LAYOUT_WIDTH", "2"),
                                                            ("EBB_WEIGHTS_FILE", "")))
    assert post_job(client, image).get_json()["status"] == "queued"


def test_reuse_can_be_switched_off(tmp_path, monkeypatch):
    app = APPS.make(tmp_path, monkeypatch, EBB_REUSE="0")
    client = app.test_client()
    image = image_bytes("PNG", (48, 48))
    first = post_job(client, image).get_json()
    finish_as_the_worker_does(app, first["id"])
    assert post_job(client, image).get_json()["status"] == "queued"


def test_store_down_on_submit_is_a_503_and_nothing_is_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    app = APPS.make(tmp_path, monkeypatch, STORAGE_URL="s3://bucket/p",
                    S3_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}", EBB_STORAGE_TIMEOUT="1")
    before = len(queue_messages(APPS.redis_url, QUEUE))
    response = post_job(app.test_client(), image_bytes("PNG", (64, 48)))
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "storage_unavailable"
    assert "nothing was stored" in response.get_json()["error"]["message"]
    from sqlalchemy import func, select

    from shared.db.models import Job

    with app.extensions["ebb"].session_factory() as db:
        assert db.scalar(select(func.count()).select_from(Job)) == 0
    assert len(queue_messages(APPS.redis_url, QUEUE)) == before
    # and the readiness probe says why
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["object_store"] == "error: StorageUnavailable"
    assert "object_store" in ready.get_json()["failed"]


def test_readyz_has_no_object_store_check_on_the_file_store(app):
    body = app.test_client().get("/readyz").get_json()
    assert "object_store" not in body["checks"]
