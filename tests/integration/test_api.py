"""The JSON API (Flask test client) in front of a real worker, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(600)]

FAST_FORM = {"iterations": "12", "input_size": "96", "mask_size": "8"}


@pytest.fixture
def client(stack, monkeypatch):
    try:
        from web import create_app
    except ImportError as error:  # pragma: no cover - web not installed
        pytest.skip(f"web app unavailable: {error}")
    # queue_for() reads the prefix from the environment: use the stack's queues.
    monkeypatch.setenv("EBB_QUEUE_PREFIX", stack.env["EBB_QUEUE_PREFIX"])
    app = create_app({"TESTING": True, "EBB_ENV": stack.env})
    return app.test_client()


def _post(client, image: bytes, filename: str = "flute.jpg", **form: str):
    data = {**FAST_FORM, **form, "image": (io.BytesIO(image), filename)}
    return client.post("/api/v1/jobs", data=data, content_type="multipart/form-data")


def _poll(client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/api/v1/jobs/{job_id}")
        assert response.status_code == 200
        body = response.get_json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished after {timeout} s (last: {body})")


def test_submit_poll_and_download_every_artifact(client, flute_jpg):
    response = _post(client, flute_jpg.read_bytes())
    assert response.status_code == 202, response.get_json()
    created = response.get_json()
    assert created["status"] == "queued"
    assert response.headers["Location"].endswith(created["id"])

    body = _poll(client, created["id"])
    assert body["status"] == "succeeded", body["error"]
    assert body["progress"]["iteration"] == body["progress"]["total"] == 12
    assert body["target"]["index"] is not None and body["target"]["label"]
    assert body["scores"]["before"] is not None and body["scores"]["after"] is not None
    assert len(body["top5"]["before"]) == 5

    from shared.imaging.render import ARTIFACT_NAMES

    assert set(body["artifacts"]) >= set(ARTIFACT_NAMES)
    for key, url in body["artifacts"].items():
        if key in ("areas_png", "preview_png"):  # extremal jobs only; running jobs only
            assert url is None
            continue
        assert url, f"artifact {key} has no URL"
        download = client.get(url)
        assert download.status_code == 200, key
        assert len(download.data) > 0, key
        if key.endswith("_png"):
            assert download.data.startswith(b"\x89PNG"), key


def test_target_by_label(client, flute_jpg):
    response = _post(client, flute_jpg.read_bytes(), target="flute")
    assert response.status_code == 202, response.get_json()
    body = _poll(client, response.get_json()["id"])
    assert body["status"] == "succeeded", body["error"]
    assert body["target"]["label"].lower().startswith("flute")


@pytest.mark.parametrize(
    ("form", "field"),
    [({"model": "no_such_model"}, "model"), ({"target": "definitely not a class"}, "target"),
     ({"target": "5000"}, "target")],
)
def test_bad_model_or_target_is_400(client, flute_jpg, form, field):
    response = _post(client, flute_jpg.read_bytes(), **form)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error.get("field") == field, error
    assert error["message"]


def test_corrupt_upload_is_400_and_nothing_queued(client):
    response = _post(client, b"not an image", filename="x.png")
    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == "image"
