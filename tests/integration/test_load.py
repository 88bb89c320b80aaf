"""Load: 500 concurrent submissions through gunicorn, two real workers, no job lost.

* The web app runs under ``gunicorn web.wsgi:app`` (2 workers) on a free port.
* Two ``ebb worker`` subprocesses (``EBB_MODEL=efficientnet_lite0`` on the
  CPU, distinct Celery hostnames) consume the queue.
* A fresh PostgreSQL database is created and dropped; Redis database 8 with a
  queue prefix unique to the run (only its keys are deleted); a temporary
  ``DATA_DIR`` shared by the web and the workers.

500 tiny jobs (1 iteration, 64 px input, 8 px mask) are submitted by 16
threads at once; every one must be accepted (202), reach ``succeeded`` with
``attempts == 1`` (processed exactly once), and the jobs table must hold
exactly the rows submitted. ``EBB_LOAD_JOBS`` changes the count (for a quick
local run). Every subprocess is stopped, and the database dropped, even when
the test fails.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from web.testing import delete_keys

from .conftest import REPO_ROOT, WorkerProcess, wait_for, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(1200)]

JOBS = int(os.environ.get("EBB_LOAD_JOBS", "500"))
THREADS = 16
REDIS_DB = 8
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
FORM = {"iterations": "1", "input_size": "64", "mask_size": "8", "seed": "0"}
TERMINAL = ("succeeded", "failed", "cancelled")
FINISH_TIMEOUT_S = 15 * 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def small_png(index: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (72, 56), ((index * 37) % 256, (index * 11) % 256, 90))
    for x in range(0, 72, 6):
        img.putpixel((x, (x + index) % 56), (255, 255, 255))
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


class Gunicorn:
    def __init__(self, env: dict[str, str], log_path: Path, workers: int = 2):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        gunicorn = Path(sys.executable).with_name("gunicorn")
        self.proc = subprocess.Popen(
            [str(gunicorn), "--workers", str(workers), "--threads", "4",
             "--bind", f"127.0.0.1:{self.port}", "--timeout", "120",
             "--graceful-timeout", "10", "web.wsgi:app"],
            env=env, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 90.0) -> None:
        import requests

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                return requests.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(ready, timeout, 0.3, what="gunicorn /readyz")

    def stop(self) -> None:
        import signal

        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
        except ProcessLookupError:
            pass
        finally:
            self._log.close()


def status_counts(database_url: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope(database_url) as session:
        rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {status: int(count) for status, count in rows}


def test_500_concurrent_jobs_all_succeed_exactly_once(fresh_postgres_url, tmp_path):
    import redis
    import requests
    from sqlalchemy import func, select

    from shared.db.migrations import upgrade_database
    from shared.db.models import Job
    from shared.db.session import session_scope

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {error}")

    prefix = f"ebbtest-load-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    upgrade_database(fresh_postgres_url)  # once, before gunicorn's workers start in parallel
    env = worker_env(database_url=fresh_postgres_url, redis_url=REDIS_URL, data_dir=data_dir,
                     queue_prefix=prefix, EBB_MAX_BATCH="4", EBB_SECRET_KEY="load-test",
                     EBB_RATE_LIMIT="off", EBB_REUSE="0",  # every job runs (images repeat)
                     EBB_MAX_QUEUED_PER_OWNER=str(JOBS))  # one client queues them all at once
    env.pop("EBB_API_TOKENS", None)

    started = time.monotonic()
    timings: dict[str, float] = {}
    workers = [
        WorkerProcess(env, tmp_path / f"worker{i}.log", cwd=tmp_path / f"cwd{i}",
                      args=["--hostname", f"load{i}-{prefix}@%h"])
        for i in (1, 2)
    ]
    web = None
    try:
        for worker in workers:
            worker.start()
        web = Gunicorn(env, tmp_path / "gunicorn.log")
        web.wait_ready()
        for worker in workers:
            worker.wait_ready()
        timings["startup_s"] = time.monotonic() - started

        # ---- submit JOBS jobs from THREADS threads at once
        images = [small_png(i) for i in range(20)]
        local = threading.local()

        def submit(index: int) -> tuple[int, str]:
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
            files = {"image": (f"img{index}.png", images[index % len(images)], "image/png")}
            response = session.post(f"{web.url}/api/v1/jobs", data=FORM, files=files, timeout=60)
            return response.status_code, (response.json().get("id") if response.status_code == 202
                                          else response.text[:300])

        t0 = time.monotonic()
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(submit, range(JOBS)))
        timings["submit_s"] = time.monotonic() - t0
        refused = [r for r in results if r[0] != 202]
        assert not refused, f"{len(refused)} submissions refused, e.g. {refused[:3]}\n{web.tail()}"
        ids = {job_id for _, job_id in results}
        assert len(ids) == JOBS

        # ---- wait until every job is terminal
        def all_terminal():
            counts = status_counts(fresh_postgres_url)
            return sum(counts.get(s, 0) for s in TERMINAL) >= JOBS and counts

        try:
            counts = wait_for(all_terminal, FINISH_TIMEOUT_S, 2.0, what=f"{JOBS} jobs to finish")
        except AssertionError as error:
            raise AssertionError(f"{error}: {status_counts(fresh_postgres_url)}\n"
                                 f"worker 1:\n{workers[0].tail()}\nworker 2:\n{workers[1].tail()}")
        timings["process_s"] = time.monotonic() - t0 - timings["submit_s"]

        # ---- exactly once, nothing lost, nothing extra
        with session_scope(fresh_postgres_url) as session:
            total = int(session.scalar(select(func.count()).select_from(Job)))
            rows = session.execute(select(Job.id, Job.status, Job.attempts, Job.worker_hostname,
                                          Job.error)).all()
        assert total == JOBS, f"jobs table holds {total} rows, {JOBS} submitted"
        assert {str(r.id) for r in rows} == ids
        not_ok = [r for r in rows if r.status != "succeeded"]
        assert not not_ok, f"{len(not_ok)} jobs did not succeed, e.g. {not_ok[:3]}"
        repeated = [r for r in rows if r.attempts != 1]
        assert not repeated, f"{len(repeated)} jobs ran more than once, e.g. {repeated[:3]}"
        by_worker: dict[str, int] = {}
        for r in rows:
            by_worker[r.worker_hostname] = by_worker.get(r.worker_hostname, 0) + 1
        assert len(by_worker) == 2, f"both workers should have taken jobs: {by_worker}"

        # the API agrees (one sample through gunicorn)
        sample = next(iter(ids))
        body = requests.get(f"{web.url}/api/v1/jobs/{sample}", timeout=10).json()
        assert body["status"] == "succeeded" and body["attempts"] == 1
        timings["total_s"] = time.monotonic() - started
        print(f"\nload: {JOBS} jobs, {counts}, per worker {by_worker}, "
              + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    finally:
        for worker in workers:
            worker.terminate()
        if web is not None:
            web.stop()
        for worker in workers:
            if worker.proc is not None:
                worker.stop()
        delete_keys(REDIS_URL, prefix)
