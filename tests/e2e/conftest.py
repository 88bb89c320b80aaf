"""Browser tests: the real web app (werkzeug, in a thread), a real Celery worker
subprocess (``python -m shared.cli worker``, efficientnet_lite0 on the CPU),
real Redis and SQLite, driven by Playwright with the system Chromium.

Skips when Playwright, Chromium or Redis is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from web.testing import delete_keys

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES = REPO_ROOT / "tests" / "data" / "images"
DOCS = REPO_ROOT / "docs"
CHROMIUM = os.environ.get("EBB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]
MODEL = "efficientnet_lite0"
REDIS_DB = int(os.environ.get("EBB_E2E_REDIS_DB", "9"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
WORKER_READY_TIMEOUT_S = float(os.environ.get("EBB_TEST_WORKER_READY_TIMEOUT", "240"))


@dataclass
class E2EStack:
    base_url: str
    data_dir: Path
    worker_log: Path
    queue_prefix: str

    def worker_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.worker_log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@pytest.fixture(scope="module")
def e2e_stack(tmp_path_factory) -> Iterator[E2EStack]:
    from web.testing import redis_available

    problem = redis_available(REDIS_URL)
    if problem:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {problem}")

    base = tmp_path_factory.mktemp("e2e")  # module scope: env is restored after
    data_dir = base / "data"
    prefix = f"ebbe2e-{uuid.uuid4().hex[:8]}"
    env = {
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{data_dir / 'ebb.sqlite3'}",
        "REDIS_URL": REDIS_URL,
        "EBB_MODEL": MODEL,
        "EBB_MODELS": MODEL,
        "EBB_QUEUE_PREFIX": prefix,
        "EBB_SECRET_KEY": "e2e-secret",
    }
    worker_env = {
        **os.environ, **env,
        "EBB_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": "", "EBB_MAX_BATCH": "2",
        "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
    }
    log_path = base / "worker.log"
    log = open(log_path, "wb")
    (base / "cwd").mkdir()
    worker = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "worker", "--hostname", f"e2e-{prefix}@%h"],
        env=worker_env, cwd=base / "cwd", stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    server = thread = None
    try:
        from werkzeug.serving import make_server

        from web import create_app

        app = create_app()
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, name="e2e-web", daemon=True)
        thread.start()
        stack = E2EStack(f"http://127.0.0.1:{server.port}", data_dir, log_path, prefix)

        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while " ready." not in log_path.read_text(errors="replace"):
            if worker.poll() is not None:
                pytest.fail(f"worker exited with {worker.returncode}:\n{stack.worker_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker not ready after {WORKER_READY_TIMEOUT_S:.0f} s:\n"
                            f"{stack.worker_tail()}")
            time.sleep(0.3)
        yield stack
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
        log.close()
        patch.undo()
        delete_keys(REDIS_URL, prefix)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not found at {CHROMIUM}")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                             headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860},
                                  device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(30_000)
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.console_messages = messages  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="session")
def flute_image() -> Path:
    path = IMAGES / "flute.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go: ``docs/`` (shown by the README) with
    ``EBB_UPDATE_SCREENSHOTS=1``, else the test's temporary folder."""
    folder = DOCS if os.environ.get("EBB_UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(exist_ok=True)
    return folder
