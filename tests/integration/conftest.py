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

from web.testing import delete_keys

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
        delete_keys(redis_url, prefix)


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


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """An empty (not migrated) PostgreSQL database, dropped after the test."""
    problem = _postgres_available()
    if problem:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {problem}")
    url, drop = _create_pg_database()
    try:
        yield url
    finally:
        drop()


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
        # The shared stack serves many tests in a row from one client: the
        # request-rate limit and the per-owner queue cap have tests of their own.
        EBB_RATE_LIMIT="off",
        EBB_MAX_QUEUED_PER_OWNER="1000",
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
               model: str = TEST_MODEL, send: bool = True, **columns: Any) -> uuid.UUID:
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
                created_at=utcnow(), **columns,
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
def stack(database_url, redis_url, queue_prefix, start_worker, tmp_path_factory) -> Iterator[Stack]:
    """One worker per database backend, shared by that backend's tests.

    Each instance gets its own queues and its worker is stopped when pytest
    tears the fixture down: pytest may re-create a parametrized session
    fixture (with a fresh database) when tests of both backends interleave,
    and a worker must never take a job whose row lives in another database.
    """
    backend = database_url.split(":")[0].split("+")[0]
    built = build_stack(start_worker, database_url=database_url, redis_url=redis_url,
                        data_dir=tmp_path_factory.mktemp("data"),
                        queue_prefix=f"{queue_prefix}.{backend}-{uuid.uuid4().hex[:6]}",
                        name=f"worker-{backend}")
    yield built
    built.worker.terminate()
    built.worker.stop()


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
    flute = REPO_ROOT / "tests" / "data" / "images" / "flute.jpg"
    if flute.is_file():
        return flute.read_bytes()
    import numpy as np
    from PIL import Image

    rs = np.random.RandomState(0)
    buf = io.BytesIO()
    Image.fromarray((rs.rand(120, 160, 3) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(width: int = 56, height: int = 40, seed: int = 0) -> bytes:
    """A PNG of uniform noise, ``height`` × ``width`` × 3, different for every ``seed``."""
    import numpy as np
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def spawn(start_worker) -> Iterator[Callable[..., Stack]]:
    """Start workers for one test (in parallel with ``wait=False``); all killed when it ends.

    Every job runs (``EBB_REUSE=0`` unless given): the fault and recovery tests
    submit identical jobs on purpose. Request it *after* the Redis / PostgreSQL
    fixtures so that the workers stop before the servers they use.
    """
    mine: list[Stack] = []

    def spawn(name: str, wait: bool = True, **kwargs: Any) -> Stack:
        kwargs.setdefault("EBB_REUSE", "0")
        stack = build_stack(start_worker, name=name, wait=False, **kwargs)
        mine.append(stack)
        if wait:
            stack.worker.wait_ready()
        return stack

    yield spawn
    for stack in mine:  # the test is over: no need to wait for a warm shutdown
        if stack.worker.proc is not None and stack.worker.proc.poll() is None:
            try:
                os.killpg(stack.worker.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for stack in mine:
        stack.worker.stop()


def node(stack: Stack) -> str:
    """The worker's Celery node name up to ``@`` (what ``jobs.worker_hostname`` starts with)."""
    args = stack.worker.args
    return args[args.index("--hostname") + 1].split("@")[0] + "@"


# --------------------------------------------------------------------------- private servers
#
# Used by the fault-injection tests (``test_faults.py``), which restart or kill
# the services themselves: they must never touch the shared Redis or
# PostgreSQL that other sessions use.


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` on a free port, data in ``workdir`` (AOF optional)."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False):
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0):
        import redis

        return redis.Redis.from_url(self.url(db), socket_connect_timeout=1, socket_timeout=5)

    def ping(self) -> bool:
        try:
            client = self.client()
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:  # noqa: BLE001
            return False

    def start(self, timeout: float = 20.0) -> "RedisServer":
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on PATH")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "everysec", "--protected-mode", "no", "--daemonize", "no",
                "--logfile", str(self.workdir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start on port {self.port}:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server abruptly (SIGKILL: a crash) or gracefully (SIGTERM)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)

    def restart(self, sig: int = signal.SIGKILL, down_s: float = 0.0) -> None:
        """Stop it, stay down ``down_s`` seconds, start it again on the same port and data."""
        self.kill(sig)
        time.sleep(down_s)
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.workdir / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@pytest.fixture
def start_redis_server(tmp_path) -> Iterator[Callable[..., RedisServer]]:
    """Factory: start a private ``redis-server``; all are killed at teardown."""
    servers: list[RedisServer] = []

    def start(name: str = "redis", appendonly: bool = False) -> RedisServer:
        server = RedisServer(tmp_path / name, appendonly=appendonly)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries (``initdb``, ``pg_ctl``), if installed."""
    import glob
    import shutil

    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    return Path(candidates[-1]) if candidates and (Path(candidates[-1]) / "pg_ctl").is_file() else None


class PostgresCluster:
    """A private PostgreSQL cluster (``initdb`` in a temporary folder, a free port).

    The server refuses to run as root: as root, every command runs as the
    ``postgres`` user through ``runuser``, in a folder that user owns. Its
    socket lives in that folder too, never in the shared ``/var/run``.
    """

    def __init__(self, bindir: Path):
        import tempfile

        self.bindir = bindir
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="ebb-pg-"))
        self.data = self.base / "data"
        self.logfile = self.base / "server.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.base, user.pw_uid, user.pw_gid)

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args[:2])} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}\n{self.log_tail()}")
        return result

    @property
    def _server_options(self) -> str:
        return (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")

    def init(self) -> "PostgresCluster":
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        return self

    def start(self) -> "PostgresCluster":
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60",
                  "-o", self._server_options, "start")
        return self

    def restart(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "-m", mode,
                  "-o", self._server_options, "restart")

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-m", mode, "stop")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError, PermissionError):
            return None

    def destroy(self) -> None:
        """Stop the server (immediate) if it runs, and delete every file of the cluster."""
        import shutil

        try:
            if (self.data / "postmaster.pid").exists():
                self.stop("immediate")
        except Exception:  # noqa: BLE001 - removing the folder matters more
            pid = self.postmaster_pid()
            if pid:
                try:
                    os.kill(pid, signal.SIGQUIT)
                except ProcessLookupError:
                    pass
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return self.url(name)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except (FileNotFoundError, PermissionError):
            return ""


@pytest.fixture
def private_postgres() -> Iterator[PostgresCluster]:
    """A started private PostgreSQL cluster; stopped (immediate) and deleted at teardown, even on failure."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    cluster = PostgresCluster(bindir)
    try:
        cluster.init().start()
        yield cluster
    finally:
        cluster.destroy()


class GunicornProcess:
    """``gunicorn -c python:web.gunicorn_conf web.wsgi:app`` (as the web image runs it)
    on ``127.0.0.1:<port>``, in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path, port: int | None = None,
                 workers: int = 2):
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.port = port or free_port()
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "GunicornProcess":
        self.cwd.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:web.gunicorn_conf", "web.wsgi:app",
             "--bind", f"127.0.0.1:{self.port}",
             "--workers", str(self.workers), "--timeout", "60", "--graceful-timeout", "5",
             "--no-control-socket"],
            env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Block until ``/healthz`` answers 200; return seconds waited."""
        import requests

        started = time.monotonic()
        while True:
            try:
                if requests.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"gunicorn not ready after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.2)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        """Signal the whole process group (master and workers) and wait for the master."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        self.proc.wait(timeout)
        if sig == signal.SIGKILL:
            return
        try:  # workers orphaned by a master that died first
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@pytest.fixture
def start_gunicorn(tmp_path) -> Iterator[Callable[..., GunicornProcess]]:
    """Factory: start ``gunicorn web.wsgi:app`` with ``env``; all are stopped at teardown."""
    started: list[GunicornProcess] = []

    def start(env: dict[str, str], port: int | None = None, name: str = "gunicorn") -> GunicornProcess:
        base = tmp_path / f"{name}-{len(started)}"
        base.mkdir(parents=True, exist_ok=True)
        server = GunicornProcess(env, base / "gunicorn.log", cwd=base, port=port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
