"""Start the real service for a benchmark: the web app, one worker, real Redis and a database.

Shared by ``benchmarks/throughput.py`` and ``benchmarks/overhead.py``. A
:class:`Service` is

* the Flask app under gunicorn (``gunicorn web.wsgi:app``, one process, a few
  threads) on a free port, rate limiting off;
* one ``ebb worker`` (``python -m shared.cli worker``) on the CPU with a given
  ``EBB_MAX_BATCH`` (= its concurrency) and torch thread count;
* the real Redis on ``127.0.0.1:6379`` (database :data:`REDIS_DB`) with a unique
  queue prefix ``EBB_QUEUE_PREFIX`` per service, whose keys are deleted at stop;
* a fresh SQLite file (default) or a fresh PostgreSQL database
  (``ebb_bench_<random>``, dropped at stop) and a temporary ``DATA_DIR``.

Jobs go through the public API (``POST /api/v1/jobs``, multipart), as a client
would send them; results are read back from the API (``GET /api/v1/jobs/<id>``)
and from the artifacts on disk.

Not a test fixture: every process started here is stopped by :meth:`Service.stop`
(SIGTERM to its process group, then SIGKILL), also on Ctrl-C when used as a
context manager; the temporary folder goes too unless ``EBB_BENCH_KEEP=1``.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
REDIS_DB = int(os.environ.get("EBB_BENCH_REDIS_DB", "12"))
REDIS_URL = os.environ.get("EBB_BENCH_REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}")
PG_ADMIN_URL = os.environ.get("EBB_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
#: Where the random-weight VGG19 state dict is cached between runs (~550 MB).
CACHE_DIR = Path(os.environ.get("EBB_BENCH_CACHE", Path(tempfile.gettempdir()) / "ebb-bench"))
READY_TIMEOUT_S = 300.0

if str(ROOT) not in sys.path:  # run as ``python benchmarks/x.py`` from anywhere
    sys.path.insert(0, str(ROOT))

from web.testing import delete_keys  # noqa: E402


# --------------------------------------------------------------------------- inputs


def example_images() -> list[tuple[str, bytes]]:
    """``(file name, bytes)`` of the example images (``flute.jpg``, ``both.png``),
    or two synthetic PNGs when they are missing."""
    found = [(p.name, p.read_bytes()) for p in (IMAGES / "flute.jpg", IMAGES / "both.png") if p.is_file()]
    if found:
        return found
    import numpy as np
    from PIL import Image

    out = []
    for seed in (0, 1):
        buf = io.BytesIO()
        rs = np.random.RandomState(seed)
        Image.fromarray((rs.rand(240, 320, 3) * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append((f"synthetic{seed}.png", buf.getvalue()))
    return out


def random_vgg19_weights() -> Path:
    """A ``torch.save`` of ``torchvision.models.vgg19(weights=None).state_dict()``
    (seed 0), for ``EBB_WEIGHTS_FILE``; written once into :data:`CACHE_DIR`."""
    path = CACHE_DIR / "vgg19-random-seed0.pth"
    if path.is_file():
        return path
    import torch
    import torchvision

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = torchvision.models.vgg19(weights=None).state_dict()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def weights_file_for(model: str) -> str | None:
    """``EBB_WEIGHTS_FILE`` for ``model``: random weights for ``vgg19``, else none."""
    return str(random_vgg19_weights()) if model == "vgg19" else None


def load_local_model(model: str):
    """The same model the worker loads (same weights file), in this process, on the CPU."""
    from shared.models.registry import load_model

    return load_model(model, device="cpu", weights_file=weights_file_for(model))


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_time(text: str | None) -> float | None:
    """An API ISO-8601 timestamp as Unix seconds (naive = UTC)."""
    if not text:
        return None
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def redis_available(url: str = REDIS_URL) -> str | None:
    """``None`` if Redis answers at ``url``, else the error."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        return None
    except Exception as error:  # noqa: BLE001
        return str(error)


def create_database(kind: str, base: Path) -> tuple[str, Any]:
    """A fresh database URL and a function that drops it (``kind``: sqlite | postgresql)."""
    if kind == "sqlite":
        return f"sqlite:///{base / 'ebb.sqlite3'}", lambda: None
    if kind != "postgresql":
        raise ValueError(f"database must be sqlite or postgresql, got {kind!r}")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"ebb_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False), drop


def _stop_process(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """SIGTERM ``proc``'s process group (it was started in its own session), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- the service


@dataclass
class Service:
    """One web app + one worker for ``model`` on their own queues, database and data dir.

    Args:
        model: the worker's ``EBB_MODEL`` (``vgg19`` gets random weights).
        max_batch: the worker's ``EBB_MAX_BATCH`` (its batch cap and concurrency).
        threads: torch threads of the worker (``OMP_NUM_THREADS``).
        database: ``sqlite`` or ``postgresql``.
        name: a label for logs and the queue prefix.
        extra_env: more worker environment.
    """

    model: str
    max_batch: int = 4
    threads: int = 2
    database: str = "sqlite"
    name: str = "bench"
    extra_env: dict[str, str] = field(default_factory=dict)
    redis_url: str = REDIS_URL
    keep: bool = bool(os.environ.get("EBB_BENCH_KEEP"))  # keep the temporary folder (logs, data)

    def __post_init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"ebb-{self.name}-"))
        self.prefix = f"ebbbench-{self.name}-{uuid.uuid4().hex[:8]}"
        self.data_dir = self.base / "data"
        self.data_dir.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = ""
        self._drop_db = lambda: None
        self.web: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self._logs: list[Any] = []
        import requests

        self.http = requests.Session()

    # ------------------------------------------------------------- lifecycle

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATA_DIR=str(self.data_dir),
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            EBB_MODEL=self.model,
            EBB_MODELS=self.model,
            EBB_QUEUE_PREFIX=self.prefix,
            EBB_RATE_LIMIT="off",
            EBB_REUSE="0",  # benchmarks measure running jobs; reuse.py turns it back on
            EBB_MAX_QUEUED_PER_OWNER="1000000",  # one client queues every job at once
            EBB_SECRET_KEY="bench-secret",
            EBB_DEVICE="cpu",
            CUDA_VISIBLE_DEVICES="",
            EBB_MAX_BATCH=str(self.max_batch),
            OMP_NUM_THREADS=str(self.threads),
            MKL_NUM_THREADS=str(self.threads),
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        env.pop("EBB_API_TOKENS", None)
        weights = weights_file_for(self.model)
        if weights:
            env["EBB_WEIGHTS_FILE"] = weights
        env.update(self.extra_env)
        return env

    def start(self) -> "Service":
        problem = redis_available(self.redis_url)
        if problem:
            raise RuntimeError(f"Redis not reachable at {self.redis_url}: {problem}")
        self.database_url, self._drop_db = create_database(self.database, self.base)
        from shared.db.migrations import upgrade_database

        upgrade_database(self.database_url)
        env = self.env()
        worker_log = open(self.base / "worker.log", "wb")
        web_log = open(self.base / "web.log", "wb")
        self._logs += [worker_log, web_log]
        (self.base / "cwd").mkdir(exist_ok=True)
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "worker", "--hostname", f"{self.prefix}@%h"],
            env=env, cwd=self.base / "cwd", stdout=worker_log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        web_env = {**env, "OMP_NUM_THREADS": "1"}
        self.web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--workers", "1", "--threads", "8",
             "--bind", f"127.0.0.1:{self.port}", "--log-level", "warning", "web.wsgi:app"],
            env=web_env, cwd=ROOT, stdout=web_log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def log(self, which: str = "worker", lines: int = 40) -> str:
        try:
            text = (self.base / f"{which}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> "Service":
        """Block until the worker logs ``ready.`` and the API answers."""
        deadline = time.monotonic() + timeout
        worker_ready = web_ready = False
        while not (worker_ready and web_ready):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not ready after {timeout:.0f} s\n{self.log()}\n{self.log('web')}")
            for proc, what in ((self.worker, "worker"), (self.web, "web")):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{self.name}: {what} exited with {proc.returncode}:\n{self.log(what)}")
            worker_ready = worker_ready or " ready." in self.log(lines=10_000)
            if not web_ready:
                try:
                    web_ready = self.http.get(f"{self.url}/api/v1/models", timeout=2).status_code == 200
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        for proc in (self.web, self.worker):  # signal both first, then wait
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        _stop_process(self.web)
        _stop_process(self.worker)
        self.web = self.worker = None
        for f in self._logs:
            f.close()
        self._logs = []
        try:
            delete_keys(self.redis_url, self.prefix)
        except Exception:  # noqa: BLE001 - best effort
            pass
        try:
            from shared.db.session import dispose_engines

            dispose_engines()
            self._drop_db()
        except Exception:  # noqa: BLE001 - best effort
            pass
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "Service":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------- jobs

    def submit(self, image: tuple[str, bytes], **fields: Any) -> tuple[str, float]:
        """POST one job; returns ``(job id, Unix time just before the request was sent)``."""
        name, data = image
        form = {k: str(v) for k, v in fields.items() if v is not None}
        sent = time.time()
        response = self.http.post(f"{self.url}/api/v1/jobs", data=form,
                                  files={"image": (name, data)}, timeout=30)
        if response.status_code != 202:
            raise RuntimeError(f"POST /api/v1/jobs -> {response.status_code}: {response.text[:500]}")
        return response.json()["id"], sent

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"{self.url}/api/v1/jobs/{job_id}", timeout=30)
        response.raise_for_status()
        return response.json()

    def wait(self, job_ids: Iterable[str], timeout: float = 1800.0, interval: float = 0.25) -> dict[str, dict]:
        """Poll until every job is terminal; returns ``{id: job}``; raises if one did not succeed."""
        pending = list(job_ids)
        done: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {len(pending)} job(s) not done after {timeout:.0f} s\n{self.log()}")
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"{self.name}: worker exited with {self.worker.returncode}:\n{self.log()}")
            still = []
            for job_id in pending:
                job = self.job(job_id)
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    if job["status"] != "succeeded":
                        raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}\n{self.log()}")
                    done[job_id] = job
                else:
                    still.append(job_id)
            pending = still
            if pending:
                time.sleep(interval)
        return done

    def mask(self, job_id: str):
        """The job's low-resolution mask (``mask.npy`` artifact), as saved by the worker."""
        import numpy as np

        return np.load(self.data_dir / "jobs" / str(job_id) / "mask.npy")


def in_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run on a fresh thread, as the worker's batch engine runs jobs.

    Why: torch's OpenMP pool, driven from the *main* thread, spin-waits at
    every parallel region; on an oversubscribed machine (more busy threads
    than cores) that made a bare ``explain()`` 10-20x slower than the same
    call on a side thread (measured on the shared 2-core box). Timing every
    variant on a side thread compares like with like, and like the worker.
    """
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller
            box["error"] = error

    thread = threading.Thread(target=target, name="bench-compute")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
