"""docker-compose.yml and the Dockerfiles, checked by construction (no Docker engine here).

Every command they run is also run by a test: `ebb models fetch` here,
`ebb worker` and `gunicorn -c python:web.gunicorn_conf web.wsgi:app` in tests/integration.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _cmd(dockerfile: str) -> list[str]:
    text = (ROOT / dockerfile).read_text()
    match = re.findall(r'^CMD (\[.*\])', text, flags=re.M)
    assert match, f"{dockerfile} has no exec-form CMD"
    return yaml.safe_load(match[-1])


def test_compose_services():
    c = _compose("docker-compose.yml")
    services = c["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--requirepass" in redis
    assert any("/var/lib/postgresql/data" in v for v in services["postgres"]["volumes"])
    assert services["web"]["build"]["dockerfile"] == "Dockerfile.web"
    assert services["web"]["command"] == ["gunicorn", "-c", "python:web.gunicorn_conf", "web.wsgi:app"]
    workers = {k: v for k, v in services.items() if k.startswith("worker")}
    assert len(workers) >= 2
    device_ids = set()
    for name, w in workers.items():
        assert w["build"]["dockerfile"] == "Dockerfile.worker"
        assert w["command"] == ["ebb", "worker"]
        devices = w["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert len(devices[0]["device_ids"]) == 1, f"{name} must own exactly one GPU"
        device_ids.add(devices[0]["device_ids"][0])
        assert "volumes" not in w, f"{name} must not share a disk with the web"
        assert "redis://:" in w["environment"]["REDIS_URL"], "Redis password must be in the URL"
        assert w["environment"]["STORAGE_URL"].startswith("s3://")
        assert w["depends_on"]["store"]["condition"] == "service_healthy"
    assert len(device_ids) == len(workers), "each worker service reserves its own GPU"
    assert services["web"]["volumes"] == ["web-data:/data"]  # private thumbnail cache


def test_compose_object_store():
    c = _compose("docker-compose.yml")
    store = c["services"]["store"]
    assert store["image"].startswith("chrislusf/seaweedfs:")
    assert store["command"][:3] == ["server", "-dir=/data", "-s3"] and "-s3.port=8333" in store["command"]
    assert store["environment"]["AWS_ACCESS_KEY_ID"] == c["services"]["web"]["environment"]["AWS_ACCESS_KEY_ID"]
    assert "healthz" in " ".join(store["healthcheck"]["test"])
    env = c["services"]["web"]["environment"]
    assert env["STORAGE_URL"].startswith("s3://") and env["S3_ENDPOINT_URL"] == "http://store:8333"
    assert "AWS_SECRET_ACCESS_KEY" in env
    # the compose values parse as this service's settings
    from shared import settings as settings_mod

    resolved = {k: re.sub(r"\$\{[A-Z_0-9]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}
    settings = settings_mod.load(resolved)
    assert settings.storage == "s3://ebb/" and settings.s3_endpoint_url == "http://store:8333"


def test_web_container_gets_the_threaded_json_worker_and_its_settings():
    """The web service and image run gunicorn with web/gunicorn_conf.py, which
    selects the JsonThreadWorker from the EBB_WEB_* settings; the compose file
    passes those settings through with the documented defaults."""
    web = _compose("docker-compose.yml")["services"]["web"]
    conf = (ROOT / "web" / "gunicorn_conf.py").read_text()
    assert 'worker_class = "web.gunicorn_worker.JsonThreadWorker"' in conf
    assert "threads = _settings.web_threads" in conf and "timeout = " in conf
    assert "-c" in web["command"] and "python:web.gunicorn_conf" in web["command"]
    env = web["environment"]
    assert env["EBB_WEB_THREADS"] == "${EBB_WEB_THREADS:-16}"
    assert env["EBB_WEB_TIMEOUT"] == "${EBB_WEB_TIMEOUT:-30}"
    assert env["EBB_WEB_BODY_TIMEOUT"] == "${EBB_WEB_BODY_TIMEOUT:-30}"
    assert env["EBB_MIN_FREE_MB"] == "${EBB_MIN_FREE_MB:-100}"
    worker = _compose("docker-compose.yml")["services"]["worker-gpu0"]
    assert worker["environment"]["EBB_MIN_FREE_MB"] == "${EBB_MIN_FREE_MB:-100}"
    from shared.settings import load

    defaults = load({})
    assert (defaults.web_threads, defaults.web_timeout, defaults.web_body_timeout,
            defaults.min_free_mb) == (16, 30, 30, 100)
    from shared.cli import web_argv
    from shared.commands.web import gunicorn_argv

    for argv in (gunicorn_argv(), web_argv("127.0.0.1", 8000)):  # ebb web, ebb run
        assert argv[1:5] == ["-m", "gunicorn", "-c", "python:web.gunicorn_conf"]
        assert argv[-1] == "web.wsgi:app"


def test_worker_only_compose_points_at_the_main_machine():
    c = _compose("docker-compose.worker.yml")
    assert set(c["services"]) >= {"worker-gpu0"}
    for w in c["services"].values():
        env = w["environment"]
        assert "EBB_MAIN_HOST" in env["DATABASE_URL"] and "EBB_MAIN_HOST" in env["REDIS_URL"]
        assert w["command"] == ["ebb", "worker"]
        # only Redis, PostgreSQL and the store: no shared disk
        assert env["STORAGE_URL"].startswith("s3://") and "EBB_MAIN_HOST" in env["S3_ENDPOINT_URL"]
        assert "S3_ACCESS_KEY" in env["AWS_ACCESS_KEY_ID"] and "S3_SECRET_KEY" in env["AWS_SECRET_ACCESS_KEY"]
        assert "volumes" not in w
    assert "volumes" not in c
    assert "nfs" not in (ROOT / "docker-compose.worker.yml").read_text().lower().replace("no nfs", "")


def test_web_image_has_no_torch():
    text = (ROOT / "Dockerfile.web").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and not any("requirements-worker" in l or "torch" in l for l in installs)
    assert "torch" not in (ROOT / "requirements-web.txt").read_text()
    assert _cmd("Dockerfile.web") == ["gunicorn", "-c", "python:web.gunicorn_conf", "web.wsgi:app"]


def test_worker_image_bakes_weights_and_runs_worker():
    text = (ROOT / "Dockerfile.worker").read_text()
    assert 'RUN ebb models fetch "${EBB_MODEL}"' in text
    assert "TORCH_HOME=/opt/torch" in text
    assert _cmd("Dockerfile.worker") == ["ebb", "worker"]


@pytest.mark.realmodel
def test_models_fetch_command_runs(tmp_path):
    """The build step `ebb models fetch` works (offline model here)."""
    out = subprocess.run(
        [sys.executable, "-m", "shared.cli", "models", "fetch", "efficientnet_lite0"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "efficientnet_lite0: weights ready" in out.stdout


def test_models_fetch_unknown_model_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "shared.cli", "models", "fetch", "no_such_model"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "no_such_model" in out.stderr
