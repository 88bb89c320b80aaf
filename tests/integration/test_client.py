"""The Python client and the client commands against the real stack.

One SQLite database, one real ``ebb worker`` (``efficientnet_lite0`` on the
CPU) and one real ``gunicorn web.wsgi:app`` for the module: :class:`ExplainClient`
submits, polls, cancels and downloads over HTTP; ``ebb submit --wait`` runs
as a subprocess on three images; ``ebb web`` is started as a subprocess and
serves the API.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.conftest import (
    FAST_CONFIG,
    REPO_ROOT,
    TEST_MODEL,
    GunicornProcess,
    Stack,
    build_stack,
    free_port,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(600)]

#: The files a succeeded meaningful-perturbation job has (Grad-CAM on, not extremal).
JOB_FILES = {"mask.npy", "mask.png", "heatmap.png", "overlay.png", "perturbed.png", "result.json",
             "gradcam.npy", "gradcam.png", "saliency.npy", "saliency.png"}


def web_env(stack: Stack, **extra: str) -> dict[str, str]:
    """The environment of a web process in front of ``stack``."""
    env = {
        **os.environ,
        "DATA_DIR": str(stack.data_dir),
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": stack.redis_url,
        "EBB_MODEL": TEST_MODEL,
        "EBB_MODELS": TEST_MODEL,
        "EBB_QUEUE_PREFIX": stack.queue_prefix,
        "EBB_SECRET_KEY": "test-secret-key",
        "EBB_API_TOKENS": "",
        "EBB_RATE_LIMIT": "1000/minute",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def service(redis_url, queue_prefix, start_worker, tmp_path_factory) -> Iterator[tuple[Stack, str]]:
    """A worker and gunicorn on a fresh SQLite database; yields (stack, base URL)."""
    from shared.db.migrations import upgrade_database

    base = tmp_path_factory.mktemp("client-service")
    url = f"sqlite:///{base / 'ebb.sqlite3'}"
    upgrade_database(url)
    stack = build_stack(start_worker, database_url=url, redis_url=redis_url, data_dir=base / "data",
                        queue_prefix=f"{queue_prefix}.client-{uuid.uuid4().hex[:6]}", name="worker-client",
                        wait=False)
    server = GunicornProcess(web_env(stack), base / "gunicorn.log", cwd=base / "gunicorn", workers=2)
    server.start()
    try:
        server.wait_ready()
        stack.worker.wait_ready()
        yield stack, server.base_url
    finally:
        server.stop()
        stack.worker.terminate()
        stack.worker.stop()


@pytest.fixture
def client(service):
    from shared.client import ExplainClient

    with ExplainClient(service[1], token="") as c:
        yield c


@pytest.fixture(scope="module")
def three_images(tmp_path_factory) -> list[Path]:
    """Three small, different images, wherever the example images are."""
    from PIL import Image

    from web.testing import image_bytes

    folder = tmp_path_factory.mktemp("images")
    examples = REPO_ROOT / "tests" / "data" / "images"
    paths = []
    for name in ("flute.jpg", "both.png"):
        if (examples / name).is_file():
            shutil.copy(examples / name, folder / name)
        else:
            (folder / name).write_bytes(image_bytes("PNG", (160, 120), (30, 90, 200)))
        paths.append(folder / name)
    synthetic = folder / "synthetic.png"
    Image.open(io.BytesIO(image_bytes("PNG", (128, 96)))).save(synthetic)
    paths.append(synthetic)
    return paths


def assert_valid_artifact(path: Path) -> None:
    """``path`` is a non-empty, well-formed PNG, ``.npy`` or JSON file."""
    data = path.read_bytes()
    assert data, f"{path} is empty"
    if path.suffix == ".png":
        from PIL import Image

        assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
        with Image.open(path) as image:
            image.verify()
    elif path.suffix == ".npy":
        import numpy as np

        array = np.load(path, allow_pickle=False)
        assert array.ndim == 2 and array.size > 0 and np.isfinite(array).all(), path
    elif path.suffix == ".json":
        assert isinstance(json.loads(data), dict), path
    else:
        raise AssertionError(f"unexpected artifact {path}")


def run_ebb(*args: str, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m shared.cli ARGS`` (``ebb``) as a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("EBB_URL", "EBB_TOKEN")}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


FAST_FLAGS = ["--model", TEST_MODEL, "--iterations", "5", "--input-size", str(FAST_CONFIG["input_size"]),
              "--mask-size", str(FAST_CONFIG["mask_size"])]


# --------------------------------------------------------------------------- ExplainClient


def test_client_submit_wait_download_every_artifact(client, three_images, tmp_path):
    job = client.submit(three_images[0], model=TEST_MODEL, top_k=2, **FAST_CONFIG)
    assert job["status"] == "queued" and job["top_k"] == 2
    assert client.get(job["id"])["id"] == job["id"]

    seen: list[list[dict]] = []
    final = client.wait(job["id"], poll=0.2, timeout=240, on_progress=seen.append)
    assert final["status"] == "succeeded", final["error"]
    assert seen and seen[-1] == [final]
    assert len(final["results"]) == 2

    files = client.download(final["id"], tmp_path / "out")
    relative = {str(p.relative_to(tmp_path / "out")) for p in files}
    assert relative == JOB_FILES | {f"results/1/{name}" for name in JOB_FILES}
    for path in files:
        assert_valid_artifact(path)
    # the primary target's files are the server's own
    import requests

    served = requests.get(client.absolute(final["artifacts"]["overlay_png"]), timeout=30).content
    assert (tmp_path / "out" / "overlay.png").read_bytes() == served
    assert not list((tmp_path / "out").rglob(".*.part"))


def test_client_errors_are_the_servers_words(client, service, three_images):
    import requests

    from shared.client import ExplainClientError

    with open(three_images[0], "rb") as handle:
        raw = requests.post(f"{service[1]}/api/v1/jobs", data={"iterations": "lots"},
                            files={"image": ("flute.jpg", handle)}, timeout=30)
    assert raw.status_code == 400
    with pytest.raises(ExplainClientError) as error:
        client.submit(three_images[0], iterations="lots")
    assert (error.value.status, error.value.code, error.value.message, error.value.field) == (
        400, raw.json()["error"]["code"], raw.json()["error"]["message"], "iterations")

    with pytest.raises(ExplainClientError) as error:
        client.submit(three_images[0], model="no-such-model")
    assert (error.value.status, error.value.code, error.value.field) == (400, "unknown_model", "model")

    missing = str(uuid.uuid4())
    with pytest.raises(ExplainClientError) as error:
        client.get(missing)
    assert (error.value.status, error.value.code) == (404, "not_found")
    assert error.value.message == requests.get(f"{service[1]}/api/v1/jobs/{missing}", timeout=30).json()["error"]["message"]


def test_client_cancel(client, tmp_path):
    from shared.client import ExplainClientError

    # Long enough never to finish before the cancel lands (queued or running).
    image = REPO_ROOT / "tests" / "data" / "images" / "flute.jpg"
    if not image.is_file():
        pytest.skip("flute.jpg not available")
    job = client.submit(image, model=TEST_MODEL, iterations=2000, input_size=96, mask_size=8)
    cancelled = client.cancel(job["id"])
    assert cancelled["status"] in ("cancelled", "running", "queued") and cancelled["cancel_requested"]
    final = client.wait(job["id"], poll=0.2, timeout=120)
    assert final["status"] == "cancelled"
    assert client.download(final["id"], tmp_path / "none") == []  # a cancelled job has no artifacts
    with pytest.raises(ExplainClientError) as error:
        client.cancel(job["id"])
    assert (error.value.status, error.value.code) == (409, "conflict")
    assert "already cancelled" in error.value.message


def test_client_wait_timeout(client, three_images):
    from shared.client import WaitTimeout

    job = client.submit(three_images[0], model=TEST_MODEL, iterations=2000, input_size=96, mask_size=8)
    try:
        with pytest.raises(WaitTimeout) as error:
            client.wait([job["id"]], poll=0.1, timeout=0.3)
        assert [j["id"] for j in error.value.jobs] == [job["id"]]
    finally:
        client.cancel(job["id"])
        client.wait(job["id"], poll=0.2, timeout=120)


# --------------------------------------------------------------------------- ebb submit


def test_ebb_submit_three_images_waits_and_downloads_everything(service, three_images, tmp_path):
    result = run_ebb("submit", *map(str, three_images), "--url", service[1], *FAST_FLAGS,
                     "--wait", "--out", "results", "--poll", "0.2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "results"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.stem for p in three_images)
    for image in three_images:
        folder = out / image.stem
        assert {p.name for p in folder.iterdir()} == JOB_FILES, folder
        for path in folder.iterdir():
            assert_valid_artifact(path)
        assert json.loads((folder / "result.json").read_text())["artifacts"]
        assert f"{image.name}: succeeded" in result.stdout
        assert f"{len(JOB_FILES)} file(s) in results/{image.stem}" in result.stdout
    assert "3 job(s)" in result.stderr  # the single progress bar
    assert "Traceback" not in result.stderr


def test_ebb_submit_without_wait_prints_one_line_per_job(service, three_images, tmp_path):
    from shared.client import ExplainClient

    result = run_ebb("submit", str(three_images[0]), *FAST_FLAGS, cwd=tmp_path, EBB_URL=service[1])
    assert result.returncode == 0, result.stderr
    image, job_id, page = result.stdout.strip().split("\t")
    assert image == str(three_images[0]) and page == f"{service[1]}/jobs/{job_id}"
    assert ExplainClient(service[1]).wait(job_id, poll=0.2, timeout=240)["status"] == "succeeded"


def test_ebb_submit_shows_the_server_error(service, three_images, tmp_path):
    import requests

    with open(three_images[0], "rb") as handle:
        expected = requests.post(f"{service[1]}/api/v1/jobs", data={"learning_rate": "fast"},
                                 files={"image": ("x.jpg", handle)}, timeout=30).json()["error"]
    result = run_ebb("submit", *map(str, three_images), "--url", service[1], "--learning-rate", "fast",
                     "--wait", cwd=tmp_path)
    assert result.returncode == 2
    assert f"ebb submit: error: {expected['message']} (field: learning_rate)" in result.stderr
    assert "0 of 3 image(s) submitted" in result.stderr
    assert not (tmp_path / "ebb-out").exists()

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"this is not an image")
    result = run_ebb("submit", str(not_an_image), str(three_images[0]), "--url", service[1], *FAST_FLAGS,
                     cwd=tmp_path)
    assert result.returncode == 2  # one refused, the other still submitted
    assert f"ebb submit: error: {not_an_image}: " in result.stderr and "(field: image)" in result.stderr
    assert result.stdout.startswith(str(three_images[0]))


# --------------------------------------------------------------------------- ebb workers


def test_workers(client, service, tmp_path):
    fleet = wait_for(client.workers, timeout=30, what="the worker's first heartbeat")
    assert any(w["model"] == TEST_MODEL for w in fleet), fleet
    result = run_ebb("workers", "--url", service[1], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["HOSTNAME", "MODEL", "DEVICE"]
    assert any("worker-client-" in row and TEST_MODEL in row for row in rows), result.stdout


# --------------------------------------------------------------------------- ebb web


def test_ebb_web_serves_the_api(service, tmp_path):
    import requests

    stack, _ = service
    port = free_port()
    log = open(tmp_path / "web.log", "wb")
    env = web_env(stack, DATABASE_URL=f"sqlite:///{tmp_path / 'web.sqlite3'}", DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "web", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, (tmp_path / "web.log").read_text(errors="replace")
        try:
            return requests.get(f"{base}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(healthy, timeout=90, interval=0.2, what="ebb web to answer /healthz")
        # the process became gunicorn (exec), with the config module and the options given
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"gunicorn" in cmdline and b"python:web.gunicorn_conf" in cmdline
        assert f"127.0.0.1:{port}".encode() in cmdline
        models = requests.get(f"{base}/api/v1/models", timeout=10)
        assert models.status_code == 200 and models.json()["default"] == TEST_MODEL
        missing = requests.get(f"{base}/api/v1/jobs/{uuid.uuid4()}", timeout=10)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
    assert proc.returncode == 0, (tmp_path / "web.log").read_text(errors="replace")


def test_ebb_submit_waits_out_the_rate_limit(service, three_images, tmp_path):
    """With 2 submissions per 3 seconds, the third image waits for ``Retry-After`` and is sent."""
    stack, _ = service
    limited = GunicornProcess(web_env(stack, EBB_RATE_LIMIT="2/3second",
                                      EBB_RATE_LIMIT_PREFIX=f"{stack.queue_prefix}-rl-{uuid.uuid4().hex[:6]}"),
                              tmp_path / "gunicorn.log", cwd=tmp_path / "gunicorn", workers=1)
    limited.start()
    try:
        limited.wait_ready()
        result = run_ebb("submit", *map(str, three_images), "--url", limited.base_url, *FAST_FLAGS, cwd=tmp_path)
    finally:
        limited.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(result.stdout.strip().splitlines()) == 3
    assert "retrying in" in result.stderr


def test_client_wait_rides_out_a_web_restart(service, three_images, tmp_path):
    """``wait`` keeps polling while the web is down (connection refused) and returns once it is back."""
    import threading

    from shared.client import ExplainClient

    stack, _ = service
    web = GunicornProcess(web_env(stack), tmp_path / "gunicorn.log", cwd=tmp_path / "gunicorn", workers=1)
    web.start()
    restarted = None
    try:
        web.wait_ready()
        client = ExplainClient(web.base_url)
        job = client.submit(three_images[0], model=TEST_MODEL, iterations=300, input_size=96, mask_size=8)
        outcome: dict = {}
        polls: list[int] = []
        waiter = threading.Thread(target=lambda: outcome.update(
            job=client.wait(job["id"], poll=0.2, timeout=240, max_errors=1000,
                            on_progress=lambda jobs: polls.append(1))))
        waiter.start()
        wait_for(lambda: polls, timeout=30, what="a first poll")
        web.stop()
        time.sleep(1.0)  # polls fail with "connection refused" meanwhile
        assert waiter.is_alive() and not outcome
        restarted = GunicornProcess(web_env(stack), tmp_path / "gunicorn2.log", cwd=tmp_path / "gunicorn2",
                                    port=web.port, workers=1).start()
        waiter.join(240)
        assert outcome["job"]["status"] == "succeeded", outcome
    finally:
        web.stop()
        if restarted is not None:
            restarted.stop()
