"""Service fixtures: real Redis, SQLite and PostgreSQL, and real worker subprocesses.

* Redis: ``127.0.0.1:6379``, database ``EBB_TEST_REDIS_DB`` (default 11);
  queues get a unique prefix per test session (``EBB_QUEUE_PREFIX``) and only
  keys containing it are deleted afterwards. Skips when Redis is down.
* Databases: every test using :func:`stack` runs twice, on a temporary SQLite
  file and on a fresh PostgreSQL database ``ebb_test_<random>`` created on
  ``EBB_TEST_POSTGRES_URL`` (default the local server) and dropped afterwards.
  The PostgreSQL run skips when the server is unreachable.
* Workers: ``python -m shared.cli worker`` (i.e. ``ebb worker``) with
  ``EBB_MODEL=efficientnet_lite0`` on the CPU, started in a temporary working
  directory, always terminated (then killed) at teardown.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_MODEL = "efficientnet_lite0"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DB = int(os.environ.get("EBB_TEST_REDIS_DB", "11"))
PG_ADMIN_URL = os.environ.get("EBB_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
WORKER_READY_TIMEOUT_S = float(os.environ.get("EBB_TEST_WORKER_READY_TIMEOUT", "180"))

#: Small settings so a job takes a second or two on a shared CPU.
FAST_CONFIG: dict[str, Any] = {"iterations": 12, "input_size": 96, "mask_size": 8}


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- redis


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"Redis not reachable at {url}: {error}")
    return url


def _delete_keys(redis_url: str, needle: str) -> None:
    """Delete this session's keys, and its entries in kombu's shared ``unacked`` hash."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"*{needle}*"))
    if keys:
        client.delete(*keys)
    mine = [tag for tag, payload in client.hscan_iter("unacked") if needle.encode() in payload]
    if mine:
        client.hdel("unacked", *mine)
        client.zrem("unacked_index", *mine)


@pytest.fixture(scope="session")
def queue_prefix(redis_url: str) -> Iterator[str]:
    """A unique queue prefix for this session, also set in this process's env."""
    prefix = f"ebbtest-{uuid.uuid4().hex[:10]}"
    patch = pytest.MonkeyPatch()
    patch.setenv("EBB_QUEUE_PREFIX", prefix)
    try:
        yield prefix
    finally:
        patch.undo()
        _delete_keys(redis_url, prefix)


# --------------------------------------------------------------------------- databases


def _postgres_available() -> str | None:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as error:  # noqa: BLE001
        return str(error).splitlines()[0]


def _create_pg_database() -> tuple[str, Callable[[], None]]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"ebb_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        from shared.db.session import dispose_engines

        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory) -> Iterator[str]:
    """A fresh, migrated database: a SQLite file, then a PostgreSQL database."""
    from shared.db.migrations import upgrade_database

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'ebb.sqlite3'}"
        upgrade_database(url)
        yield url
        return
    problem = _postgres_available()
    if problem:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {problem}")
    url, drop = _create_pg_database()
    try:
        upgrade_database(url)
        yield url
    finally:
        drop()


# --------------------------------------------------------------------------- workers


class WorkerProcess:
    """An ``ebb worker`` subprocess with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path, args: Iterable[str] = ()):
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> "WorkerProcess":
        self.cwd.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "worker", *self.args],
            env=self.env,
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> float:
        """Block until Celery logs ``ready.``; return seconds since start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log_text():
                return time.monotonic() - self.started_at
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout:.0f} s:\n{self.tail()}")

    def terminate(self) -> None:
        """Send SIGTERM to the worker's process group (no wait)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the worker's process group, then SIGKILL it if it lingers."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        except ProcessLookupError:
            pass
        finally:
            self._log.close()


def worker_env(*, database_url: str, redis_url: str, data_dir: Path, queue_prefix: str,
               **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATA_DIR=str(data_dir),
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        EBB_MODEL=TEST_MODEL,
        EBB_MODELS=TEST_MODEL,
        EBB_DEVICE="cpu",
        CUDA_VISIBLE_DEVICES="",
        EBB_QUEUE_PREFIX=queue_prefix,
        EBB_MAX_BATCH="2",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        EBB_REAP_INTERVAL="5",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def start_worker(tmp_path_factory) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: start a worker subprocess; every one is stopped at session end."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], name: str = "worker") -> WorkerProcess:
        base = tmp_path_factory.mktemp(name)
        hostname = f"{name}-{uuid.uuid4().hex[:6]}@%h"
        worker = WorkerProcess(env, base / "worker.log", cwd=base / "cwd", args=["--hostname", hostname])
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:  # signal all first: they shut down in parallel
        worker.terminate()
    for worker in started:
        worker.stop()


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    """A database + Redis + one running worker, and helpers to drive jobs."""

    database_url: str
    redis_url: str
    data_dir: Path
    queue_prefix: str
    worker: WorkerProcess
    env: dict[str, str] = field(default_factory=dict)

    @property
    def storage(self):
        from shared.storage import Storage

        return Storage(self.data_dir)

    def celery(self):
        from worker.celery_app import create_celery_app

        return create_celery_app(environ=self.env)

    def submit(self, image: bytes, config: dict[str, Any] | None = None, target: int | None = None,
               model: str = TEST_MODEL, send: bool = True) -> uuid.UUID:
        """Insert a queued job and send its task by name, as the web does."""
        from shared.attribution.config import PerturbationConfig
        from shared.db.models import Job, JobStatus, utcnow
        from shared.db.session import session_scope
        from worker.celery_app import TASK_EXPLAIN, queue_for

        cfg = PerturbationConfig.from_dict({**FAST_CONFIG, **(config or {})})
        sha = self.storage.save_upload(image)
        job_id = uuid.uuid4()
        with session_scope(self.database_url) as session:
            session.add(Job(
                id=job_id, status=JobStatus.QUEUED.value, model=model, target_index=target,
                config=cfg.to_dict(), image_sha256=sha, image_width=1, image_height=1,
                image_filename="test.png", progress_iteration=0, progress_total=cfg.iterations,
                created_at=utcnow(),
            ))
        if send:
            self.celery().send_task(TASK_EXPLAIN, args=[str(job_id)],
                                    queue=queue_for(model, self.env), task_id=str(job_id))
        return job_id

    def job(self, job_id: uuid.UUID):
        from shared.db.models import Job
        from shared.db.session import session_scope

        with session_scope(self.database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None, f"job {job_id} not found"
            session.expunge(job)
            return job

    def wait(self, job_id: uuid.UUID, statuses: Iterable[str] = ("succeeded", "failed", "cancelled"),
             timeout: float = 120.0, interval: float = 0.1):
        wanted = set(statuses)
        try:
            return wait_for(lambda: (j := self.job(job_id)).status in wanted and j, timeout, interval,
                            what=f"job {job_id} to reach {sorted(wanted)}")
        except AssertionError as error:
            raise AssertionError(f"{error}; status {self.job(job_id).status}; worker log:\n"
                                 f"{self.worker.tail()}") from None

    def request_cancel(self, job_id: uuid.UUID) -> None:
        """Set ``cancel_requested`` as the web's cancel endpoint does for running jobs."""
        from sqlalchemy import update

        from shared.db.models import Job
        from shared.db.session import session_scope

        with session_scope(self.database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))


def build_stack(start_worker, *, database_url: str, redis_url: str, data_dir: Path, queue_prefix: str,
                name: str = "worker", wait: bool = True, **extra_env: str) -> Stack:
    """Start a worker on ``database_url`` / ``queue_prefix`` and wrap it in a :class:`Stack`."""
    env = worker_env(database_url=database_url, redis_url=redis_url, data_dir=data_dir,
                     queue_prefix=queue_prefix, **extra_env)
    worker = start_worker(env, name=name)
    if wait:
        worker.wait_ready()
    return Stack(database_url, redis_url, data_dir, queue_prefix, worker, env)


@pytest.fixture(scope="session")
def stack(database_url, redis_url, queue_prefix, start_worker, tmp_path_factory) -> Stack:
    """One worker per database backend, shared by that backend's tests.

    Each backend gets its own queues: a worker must never take a job whose
    row lives in another database.
    """
    backend = database_url.split(":")[0].split("+")[0]
    return build_stack(start_worker, database_url=database_url, redis_url=redis_url,
                       data_dir=tmp_path_factory.mktemp("data"), queue_prefix=f"{queue_prefix}.{backend}",
                       name=f"worker-{backend}")


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A fresh, migrated SQLite database for one test."""
    from shared.db.migrations import upgrade_database

    url = f"sqlite:///{tmp_path / 'ebb.sqlite3'}"
    upgrade_database(url)
    return url


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="session")
def image_bytes() -> bytes:
    """``flute.jpg`` when the example images exist, else a synthetic PNG."""
    flute = REPO_ROOT.parent / "shared" / "images" / "flute.jpg"
    if flute.is_file():
        return flute.read_bytes()
    import numpy as np
    from PIL import Image

    rs = np.random.RandomState(0)
    buf = io.BytesIO()
    Image.fromarray((rs.rand(120, 160, 3) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
