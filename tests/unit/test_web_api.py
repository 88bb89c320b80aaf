"""The JSON API (``/api/v1``) against a real SQLite file and a real Redis broker.

Redis database 13 on 127.0.0.1:6379; a submitted job is checked by reading the
Celery message from the Redis list of its queue (``<prefix>.<model>``, where
the prefix is unique to the test run; ``explain`` by default, checked too).
Only this run's keys are deleted. Skips when Redis is not running.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from web.testing import DEAD_REDIS_URL, TEST_MODELS, app_env, image_bytes, queue_messages
from web.testing import TestApps, openapi_to_jsonschema

REDIS_DB = 13
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
MODEL = TEST_MODELS[0]
#: Queues get a prefix unique to this run (``EBB_QUEUE_PREFIX``; the default is
#: ``explain``), so concurrent test runs never see each other's messages.
PREFIX = f"ebbtest-web{REDIS_DB}-{uuid.uuid4().hex[:8]}"
QUEUE = f"{PREFIX}.{MODEL}"
REPO_ROOT = Path(__file__).resolve().parents[2]


APPS = TestApps(REDIS_DB, PREFIX)
_redis, _dispose_engines = APPS.module_fixtures()


def make_app(tmp_path: Path, monkeypatch, **env):
    return APPS.make(tmp_path, monkeypatch, **env)

@pytest.fixture
def app(tmp_path, monkeypatch):
    return make_app(tmp_path, monkeypatch)


@pytest.fixture
def client(app):
    return app.test_client()


# --------------------------------------------------------------------------- helpers


def png(size=(64, 48)) -> bytes:
    return image_bytes("PNG", size)


def jpeg(size=(64, 48)) -> bytes:
    return image_bytes("JPEG", size)


def post_job(client, data: bytes | None = b"", filename="photo.png", **fields):
    form = {k: str(v) for k, v in fields.items()}
    if data is not None:
        form["image"] = (io.BytesIO(data if data != b"" else png()), filename)
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")


def rows(app):
    from sqlalchemy import select

    from shared.db.models import Job

    with app.extensions["ebb"].session_factory() as db:
        return list(db.scalars(select(Job)))


def upload_files(app) -> list[Path]:
    uploads = app.extensions["ebb"].settings.data_dir / "uploads"
    return sorted(p for p in uploads.iterdir() if p.is_file()) if uploads.is_dir() else []


def assert_nothing_stored(app):
    assert rows(app) == []
    assert upload_files(app) == []
    assert queue_messages(REDIS_URL, QUEUE) == []


def assert_error(response, status: int, field: str | None = None, code: str | None = None):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if field is not None:
        assert error.get("field") == field, error
    if code is not None:
        assert error["code"] == code, error
    return error


def set_job(app, job_id, **values):
    from sqlalchemy import update

    from shared.db.models import Job

    with app.extensions["ebb"].session_factory() as db:
        db.execute(update(Job).where(Job.id == uuid.UUID(str(job_id))).values(**values))
        db.commit()


# --------------------------------------------------------------------------- create


def test_create_job_queues_task_and_stores_everything(app, client):
    response = post_job(client, png((80, 60)), filename="cat.png", iterations=40, seed=7)
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    job_id = body["id"]
    uuid.UUID(job_id)
    assert body["status"] == "queued"
    assert body["links"]["self"] == f"/api/v1/jobs/{job_id}"
    assert body["links"]["page"] == f"/jobs/{job_id}"
    assert response.headers["Location"].endswith(f"/api/v1/jobs/{job_id}")
    assert body["progress"] == {"iteration": 0, "total": 40, "fraction": 0.0}
    assert body["queue_position"] == 1
    assert body["image"]["width"] == 80 and body["image"]["height"] == 60
    assert body["image"]["filename"] == "cat.png"
    assert body["config"]["iterations"] == 40 and body["config"]["seed"] == 7

    [job] = rows(app)
    assert str(job.id) == job_id
    assert job.status == "queued"
    assert job.model == MODEL
    assert job.progress_total == 40
    assert job.target_index is None and job.target_label is None
    from shared.attribution.config import PerturbationConfig

    assert job.config == PerturbationConfig(iterations=40, seed=7).to_dict()
    [upload] = upload_files(app)
    assert upload.name == job.image_sha256
    assert upload.read_bytes() == png((80, 60))

    [message] = queue_messages(REDIS_URL, QUEUE)
    assert message["task"] == "ebb.explain"
    assert message["args"] == [job_id]
    assert message["routing_key"] == QUEUE


def test_second_model_goes_to_its_own_queue(app, client):
    response = post_job(client, model="vgg19")
    assert response.status_code == 202
    [message] = queue_messages(REDIS_URL, f"{PREFIX}.vgg19")
    assert message["args"] == [response.get_json()["id"]]
    assert queue_messages(REDIS_URL, QUEUE) == []


def test_default_queue_is_explain_dot_model(tmp_path, monkeypatch):
    """Without EBB_QUEUE_PREFIX the task lands on the Redis list ``explain.<model>``."""
    import redis

    app = make_app(tmp_path, monkeypatch)
    monkeypatch.delenv("EBB_QUEUE_PREFIX")
    job_id = post_job(app.test_client()).get_json()["id"]
    mine = [m for m in queue_messages(REDIS_URL, f"explain.{MODEL}") if m["args"] == [job_id]]
    try:
        assert len(mine) == 1
        assert mine[0]["task"] == "ebb.explain"
        assert mine[0]["routing_key"] == f"explain.{MODEL}"
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for message in mine:
            client.lrem(f"explain.{MODEL}", 0, message["bytes"])
        client.close()


@pytest.mark.parametrize(
    "target, index, label",
    [("558", 558, "flute"), ("flute", 558, "flute"), ("  Flute ", 558, "flute"),
     ("0", 0, "tench"), ("999", 999, "toilet tissue")],
)
def test_target_by_index_or_label(app, client, target, index, label):
    from shared.models.labels import imagenet_labels

    response = post_job(client, target=target)
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    assert body["target"] == {"index": index, "label": imagenet_labels()[index]}
    assert imagenet_labels()[index] == label
    [job] = rows(app)
    assert (job.target_index, job.target_label) == (index, label)


def test_omitted_fields_take_defaults_and_unknown_fields_are_ignored(app, client):
    response = post_job(client, target="", model="",
                        color="blue", foo="bar", image_url="http://x")
    assert response.status_code == 202, response.get_data(as_text=True)
    config = response.get_json()["config"]
    assert config["iterations"] == 500
    assert config["input_size"] == 224
    assert config["precision"] == "fp32"
    assert "color" not in config and "foo" not in config


def test_precision_is_a_choice(app, client):
    response = post_job(client, precision="bf16")
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_json()["config"]["precision"] == "bf16"
    bad = post_job(client, precision="fp8")
    assert bad.status_code == 400
    assert bad.get_json()["error"]["field"] == "precision"


def test_all_settings_accepted(app, client):
    from web.jobs import CHOICES

    extra = {name: values[-1] for name, values in CHOICES.items() if name != "blur"}
    response = post_job(client, iterations=12, learning_rate="0.05", l1_coeff="0.02",
                        tv_coeff="0.1", tv_beta="2", noise_std="0", mask_size="16",
                        input_size="96", seed="123", blur="gaussian", **extra)
    assert response.status_code == 202, response.get_data(as_text=True)
    config = response.get_json()["config"]
    assert config == {**config, "iterations": 12, "learning_rate": 0.05, "l1_coeff": 0.02,
                      "tv_coeff": 0.1, "tv_beta": 2.0, "noise_std": 0.0, "mask_size": 16,
                      "input_size": 96, "seed": 123, "blur": "gaussian", **extra}


@pytest.mark.parametrize("size", [(1, 1), (1, 300), (3000, 2)])
def test_tiny_and_thin_images_work(app, client, size):
    response = post_job(client, png(size))
    assert response.status_code == 202, response.get_data(as_text=True)
    assert (response.get_json()["image"]["width"], response.get_json()["image"]["height"]) == size


def test_jpeg_with_png_name_is_accepted_by_content(app, client):
    response = post_job(client, jpeg(), filename="really-a-jpeg.png")
    assert response.status_code == 202


# --------------------------------------------------------------------------- bad input


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_IMAGES = {
    "empty": b"",
    "text": b"hello, this is just some text\n" * 20,
    "html": b"<!doctype html><html><body><script>alert(1)</script></body></html>",
    "pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
    "truncated_png": _truncated(image_bytes("PNG", (128, 128))),
    "truncated_jpeg": _truncated(image_bytes("JPEG", (128, 128))),
    "png_header_only": image_bytes("PNG")[:16],
    "random": bytes(range(256)) * 8,
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_images_rejected_and_nothing_stored(app, client, kind):
    data = BAD_IMAGES[kind]
    form = {"image": (io.BytesIO(data), "image.png"), "iterations": "10"}
    response = client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")
    error = assert_error(response, 400, field="image")
    assert error["code"] in ("invalid_image", "missing_field")
    assert_nothing_stored(app)


def test_missing_image_field(app, client):
    response = post_job(client, None, iterations=10)
    assert_error(response, 400, field="image", code="missing_field")
    assert_nothing_stored(app)


def test_image_sent_as_plain_form_field_is_not_a_file(app, client):
    response = client.post("/api/v1/jobs", data={"image": "not a file"})
    assert_error(response, 400, field="image")
    assert_nothing_stored(app)


def test_json_body_instead_of_multipart(app, client):
    response = client.post("/api/v1/jobs", json={"image": "x", "iterations": 5})
    assert_error(response, 400, field="image")
    assert_nothing_stored(app)


def test_unknown_model(app, client):
    response = post_job(client, model="resnet9000")
    assert_error(response, 400, field="model", code="unknown_model")
    assert_nothing_stored(app)


@pytest.mark.parametrize("target", ["1000", "-1", "99999999999999999999", "not a class",
                                    "flutee", "558.0"])
def test_bad_target(app, client, target):
    response = post_job(client, target=target)
    assert_error(response, 400, field="target", code="invalid_target")
    assert_nothing_stored(app)


@pytest.mark.parametrize(
    "field, value",
    [
        ("iterations", "0"), ("iterations", "-1"), ("iterations", "1000000000"),
        ("iterations", "abc"), ("iterations", "1.5"), ("iterations", "1e3"),
        ("iterations", "9" * 5000), ("iterations", "NaN"), ("iterations", "0x10"),
        ("mask_size", "3"), ("mask_size", "225"), ("mask_size", "ten"),
        ("input_size", "31"), ("input_size", "1025"), ("input_size", "nan"),
        ("seed", "-1"), ("seed", "1.5"), ("seed", str(2**64)),
        ("learning_rate", "nan"), ("learning_rate", "NaN"), ("learning_rate", "inf"),
        ("learning_rate", "-inf"), ("learning_rate", "Infinity"), ("learning_rate", "0"),
        ("learning_rate", "abc"), ("learning_rate", "1e400"),
        ("l1_coeff", "nan"), ("l1_coeff", "-0.1"), ("tv_coeff", "inf"), ("tv_coeff", "101"),
        ("tv_beta", "0.5"), ("tv_beta", "nan"), ("noise_std", "-1"), ("noise_std", "inf"),
        ("blur", "box"), ("blur", "MEAN"), ("blur", ""),
        ("iterations", ""), ("learning_rate", " "), ("seed", ""),
        *[(name, "bogus") for name in __import__("web.jobs").jobs.CHOICE_FIELDS],
    ],
)
def test_bad_settings_name_the_field(app, client, field, value):
    response = post_job(client, **{field: value})
    error = assert_error(response, 400, field=field, code="invalid_value")
    assert field in error["message"]
    assert_nothing_stored(app)


@pytest.mark.parametrize("field", ["iterations", "model", "target", "blur"])
def test_field_given_twice_is_rejected(app, client, field):
    from werkzeug.datastructures import MultiDict

    data = MultiDict([("image", (io.BytesIO(png()), "a.png")), (field, "5"), (field, "6")])
    response = client.post("/api/v1/jobs", data=data, content_type="multipart/form-data")
    error = assert_error(response, 400, field=field)
    assert "more than once" in error["message"]
    assert_nothing_stored(app)


def test_two_images_are_rejected(app, client):
    from werkzeug.datastructures import MultiDict

    data = MultiDict([("image", (io.BytesIO(png()), "a.png")),
                      ("image", (io.BytesIO(jpeg()), "b.jpg"))])
    response = client.post("/api/v1/jobs", data=data, content_type="multipart/form-data")
    assert_error(response, 400, field="image")
    assert_nothing_stored(app)


def test_mask_larger_than_input_names_mask_size(app, client):
    response = post_job(client, input_size="64", mask_size="100")
    error = assert_error(response, 400, field="mask_size")
    assert "input_size" in error["message"]
    assert_nothing_stored(app)


def test_first_error_reported_in_field_order(app, client):
    response = post_job(client, None, model="nope", iterations="abc")
    assert_error(response, 400, field="image")
    assert_nothing_stored(app)


def test_upload_too_large_is_413_json(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, EBB_MAX_UPLOAD_MB="0.05")
    client = app.test_client()
    big = os.urandom(80 * 1024)
    response = client.post("/api/v1/jobs", data={"image": (io.BytesIO(big), "big.png")},
                           content_type="multipart/form-data")
    error = assert_error(response, 413, code="payload_too_large")
    assert "0.05" in error["message"]
    assert_nothing_stored(app)


@pytest.mark.parametrize("body", [
    b"".join(b'--x\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i
             for i in range(1500)) + b"--x--\r\n",
    b'--x\r\nContent-Disposition: form-data; name="target"\r\n\r\n' + b"a" * 600_000
    + b"\r\n--x--\r\n",
])
def test_too_many_or_too_long_fields_is_413(app, client, body):
    response = client.post("/api/v1/jobs", data=body,
                           content_type="multipart/form-data; boundary=x")
    error = assert_error(response, 413, code="payload_too_large")
    assert "too many fields" in error["message"]
    assert_nothing_stored(app)


@pytest.mark.parametrize("body, content_type", [
    (b"garbage", "multipart/form-data"),
    (b'--x\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\nabc',
     "multipart/form-data; boundary=x"),
    (b"image=abc&iterations=5", "application/x-www-form-urlencoded"),
    (b"", "text/plain"),
])
def test_malformed_bodies_are_400(app, client, body, content_type):
    response = client.post("/api/v1/jobs", data=body, content_type=content_type)
    assert_error(response, 400, field="image")
    assert_nothing_stored(app)


# --------------------------------------------------------------------------- file names


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("../../etc/passwd.png", "passwd.png"),
        ("/abs/path/x.png", "x.png"),
        ("a\x00b.png", "ab.png"),
        ("tab\there\x1b[31m.png", "tabhere[31m.png"),
        ("bell\x07\x7f.png", "bell.png"),
        ("..", "image"),
        ("фото кота 猫.png", "фото кота 猫.png"),
        ("x" * 1000 + ".png", "x" * 100),
    ],
)
def test_hostile_file_names_cleaned_for_display_only(app, client, raw, expected):
    response = post_job(client, png(), filename=raw)
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    assert body["image"]["filename"] == expected
    [job] = rows(app)
    assert job.image_filename == expected
    # Storage is content-addressed: the name never reaches the file system.
    data_dir = app.extensions["ebb"].settings.data_dir
    [upload] = upload_files(app)
    assert upload.parent == data_dir / "uploads" and upload.name == job.image_sha256
    assert not (tmp_outside := data_dir.parent / "etc").exists(), tmp_outside


def _raw_multipart(disposition: bytes, data: bytes) -> tuple[bytes, str]:
    boundary = "----ebbtestboundary"
    body = (
        f"--{boundary}\r\n".encode()
        + b"Content-Disposition: form-data; name=\"image\"; " + disposition + b"\r\n"
        + b"Content-Type: application/octet-stream\r\n\r\n"
        + data + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    "disposition, expected",
    [
        (rb'filename="C:\\Users\\me\\..\\..\\evil.png"', "evil.png"),
        (rb'filename="..\\..\\windows\\system32\\evil.png"', "evil.png"),
        (b'filename="line%0Abreak.png"', "line%0Abreak.png"),
        ("filename=\"фото 猫.png\"".encode(), "фото 猫.png"),
        (b"filename*=UTF-8''%D1%84%D0%BE%D1%82%D0%BE.png", "фото.png"),
        (b'filename="../../../../tmp/pwned"', "pwned"),
    ],
)
def test_raw_multipart_file_names(app, client, disposition, expected):
    body, content_type = _raw_multipart(disposition, png())
    response = client.post("/api/v1/jobs", data=body, content_type=content_type)
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_json()["image"]["filename"] == expected
    assert not Path("/tmp/pwned").exists()


def test_clean_filename_unit():
    from web.jobs import clean_filename

    assert clean_filename(None) == "image"
    assert clean_filename("") == "image"
    assert clean_filename("   ") == "image"
    assert clean_filename("a/b/\u202eevil.png") == "evil.png"  # bidi override removed
    assert clean_filename("ok.png") == "ok.png"
    assert len(clean_filename("é" * 500)) == 100


# --------------------------------------------------------------------------- redis down


def test_redis_down_returns_503_and_leaves_no_row(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, REDIS_URL=DEAD_REDIS_URL)
    client = app.test_client()
    started = time.monotonic()
    response = post_job(client, png(), iterations=10)
    elapsed = time.monotonic() - started
    assert_error(response, 503, code="queue_unavailable")
    assert elapsed < 5, f"503 took {elapsed:.1f} s"
    assert rows(app) == []
    # The page form says the same thing, with a 503 and no row either.
    page = client.get("/")
    assert page.status_code == 200


# --------------------------------------------------------------------------- read


def test_get_job_contract(app, client):
    job_id = post_job(client, target="flute", iterations=20).get_json()["id"]
    response = client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    for key in ("id", "status", "model", "target", "progress", "scores", "top5", "config",
                "created_at", "started_at", "finished_at", "error", "artifacts",
                "queue_position", "current_score", "elapsed_s", "eta_s", "attempts", "worker",
                "timings", "image"):
        assert key in body, key
    assert set(body["target"]) == {"index", "label"}
    assert set(body["progress"]) == {"iteration", "total", "fraction"}
    assert set(body["scores"]) == {"before", "after"}
    assert set(body["top5"]) == {"before", "after"}
    assert set(body["image"]) == {"sha256", "width", "height", "filename"}
    assert set(body["artifacts"]) == {"mask_npy", "mask_png", "heatmap_png", "overlay_png",
                                      "perturbed_png", "result_json", "gradcam_npy",
                                      "gradcam_png", "areas_png", "saliency_npy", "saliency_png",
                                      "preview_png"}
    assert all(v is None for v in body["artifacts"].values())
    assert body["metrics"] is None and body["results"] == []
    assert body["targets"] is None and body["top_k"] == 1
    assert body["config"]["method"] == "meaningful_perturbation"
    assert body["config"]["areas"] == [0.05, 0.1, 0.2]
    created = datetime.fromisoformat(body["created_at"].replace("Z", "+00:00"))
    assert created.tzinfo is not None and created.utcoffset() == timedelta(0)
    assert body["started_at"] is None and body["elapsed_s"] is None


def test_running_job_progress_and_eta(app, client):
    job_id = post_job(client, iterations=100).get_json()["id"]
    started = datetime.now(timezone.utc) - timedelta(seconds=10)
    set_job(app, job_id, status="running", started_at=started, progress_iteration=25,
            current_score=0.42, worker_hostname="w1@host", attempts=1)
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert body["progress"] == {"iteration": 25, "total": 100, "fraction": 0.25}
    assert body["current_score"] == 0.42
    assert body["queue_position"] is None
    assert 9 <= body["elapsed_s"] <= 30
    assert body["eta_s"] == pytest.approx(body["elapsed_s"] * 3, rel=0.01)
    assert body["worker"] == "w1@host" and body["attempts"] == 1


def test_queue_position_counts_queued_jobs_of_same_model(app, client):
    ids = [post_job(client, iterations=5).get_json()["id"] for _ in range(3)]
    other = post_job(client, model="vgg19").get_json()
    assert other["queue_position"] == 1
    positions = [client.get(f"/api/v1/jobs/{i}").get_json()["queue_position"] for i in ids]
    assert positions == [1, 2, 3]
    set_job(app, ids[0], status="running")
    assert client.get(f"/api/v1/jobs/{ids[2]}").get_json()["queue_position"] == 2


@pytest.mark.parametrize("path", [
    "/api/v1/jobs/not-a-uuid",
    "/api/v1/jobs/123",
    "/api/v1/jobs/..%2F..%2Fetc%2Fpasswd",
    "/api/v1/jobs/not-a-uuid/cancel",
    "/api/v1/jobs/not-a-uuid/artifacts/mask_png",
    "/api/v1/nothing-here",
])
def test_non_uuid_ids_and_unknown_paths_are_json_404(client, path):
    method = client.post if path.endswith("/cancel") else client.get
    assert_error(method(path), 404, code="not_found")


def test_unknown_job_is_404(client):
    assert_error(client.get(f"/api/v1/jobs/{uuid.uuid4()}"), 404, code="not_found")
    assert_error(client.post(f"/api/v1/jobs/{uuid.uuid4()}/cancel"), 404, code="not_found")


def test_wrong_method_is_json_405(client):
    response = client.delete("/api/v1/jobs")
    assert_error(response, 405, code="method_not_allowed")
    assert "GET" in response.headers["Allow"] and "POST" in response.headers["Allow"]


# --------------------------------------------------------------------------- artifacts


def _finish_with_artifacts(app, job_id):
    storage = app.extensions["ebb"].storage
    folder = storage.job_dir(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "mask.npy": b"\x93NUMPY fake",
        "mask.png": png((8, 8)),
        "heatmap.png": png((8, 8)),
        "overlay.png": png((8, 8)),
        "perturbed.png": png((8, 8)),
        "result.json": json.dumps({"ok": True}).encode(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    now = datetime.now(timezone.utc)
    set_job(app, job_id, status="succeeded", started_at=now - timedelta(seconds=3),
            finished_at=now, progress_iteration=20, score_before=0.9, score_after=0.05,
            current_score=0.05, target_index=558, target_label="flute",
            top5={"before": [{"index": 558, "label": "flute", "prob": 0.9}],
                  "after": [{"index": 1, "label": "goldfish", "prob": 0.3}]},
            timings={"total_s": 3.0})
    return files


def test_artifacts_served_once_they_exist(app, client):
    job_id = post_job(client, iterations=20).get_json()["id"]
    assert_error(client.get(f"/api/v1/jobs/{job_id}/artifacts/mask_png"), 404)
    files = _finish_with_artifacts(app, job_id)
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert body["status"] == "succeeded"
    assert body["scores"] == {"before": 0.9, "after": 0.05}
    assert body["top5"]["before"][0]["label"] == "flute"
    assert body["eta_s"] == 0.0
    extras = {"gradcam_npy", "gradcam_png", "areas_png", "saliency_npy", "saliency_png", "preview_png"}  # not written by this job (preview: running only)
    for key, url in body["artifacts"].items():
        assert url == (None if key in extras else f"/api/v1/jobs/{job_id}/artifacts/{key}")
    for key in extras:
        assert_error(client.get(f"/api/v1/jobs/{job_id}/artifacts/{key}"), 404)
    expected_types = {"mask_npy": "application/octet-stream", "mask_png": "image/png",
                      "heatmap_png": "image/png", "overlay_png": "image/png",
                      "perturbed_png": "image/png", "result_json": "application/json"}
    names = {"mask_npy": "mask.npy", "mask_png": "mask.png", "heatmap_png": "heatmap.png",
             "overlay_png": "overlay.png", "perturbed_png": "perturbed.png",
             "result_json": "result.json"}
    for key, mimetype in expected_types.items():
        for name in (key, names[key]):
            response = client.get(f"/api/v1/jobs/{job_id}/artifacts/{name}")
            assert response.status_code == 200, name
            assert response.mimetype == mimetype
            assert response.data == files[names[key]]
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    download = client.get(f"/api/v1/jobs/{job_id}/artifacts/mask_npy?download=1")
    assert "attachment" in download.headers["Content-Disposition"]


@pytest.mark.parametrize("name", [
    "mask", "mask.PNG", "ebb.sqlite3", "..", "...", "%2e%2e", "..%2F..%2Febb.sqlite3",
    "%2e%2e%2f%2e%2e%2febb.sqlite3", "mask.png%00.txt", "result.json.bak", "thumbnail",
])
def test_bad_artifact_names_are_404(app, client, name):
    job_id = post_job(client, iterations=20).get_json()["id"]
    _finish_with_artifacts(app, job_id)
    response = client.get(f"/api/v1/jobs/{job_id}/artifacts/{name}")
    assert response.status_code == 404
    assert response.is_json


def test_traversal_in_path_is_404(app, client):
    job_id = post_job(client, iterations=20).get_json()["id"]
    _finish_with_artifacts(app, job_id)
    for path in (f"/api/v1/jobs/{job_id}/artifacts/../../../ebb.sqlite3",
                 f"/api/v1/jobs/{job_id}/artifacts/sub/mask.png",
                 f"/api/v1/jobs/{job_id}/artifacts/"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert b"SQLite" not in response.data


# --------------------------------------------------------------------------- method, areas, targets


def _job_schema(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    return openapi_to_jsonschema(doc["components"]["schemas"]["Job"])


@pytest.mark.parametrize("method", ["meaningful_perturbation", "extremal"])
def test_method_is_a_choice(app, client, method):
    response = post_job(client, method=method)
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_json()["config"]["method"] == method
    [job] = rows(app)
    assert job.config["method"] == method


@pytest.mark.parametrize("raw, expected", [
    ("0.05,0.1,0.2", [0.05, 0.1, 0.2]),
    (" 0.3 , 0.6 ", [0.3, 0.6]),
    ("0.5", [0.5]),
    ("0.2,0.05", [0.2, 0.05]),
    ("0.01,0.02,0.03,0.04,0.05", [0.01, 0.02, 0.03, 0.04, 0.05]),
    ("5e-2", [0.05]),
    ("", [0.05, 0.1, 0.2]),
    ("  ", [0.05, 0.1, 0.2]),
])
def test_areas_accepted(app, client, raw, expected):
    response = post_job(client, method="extremal", areas=raw)
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_json()["config"]["areas"] == expected
    [job] = rows(app)
    assert job.config["areas"] == expected
    from shared.attribution.config import PerturbationConfig

    assert PerturbationConfig.from_dict(job.config).areas == tuple(expected)


@pytest.mark.parametrize("raw", [
    "0", "1", "1.5", "-0.1", "0.1,,0.2", ",0.1", "0.1,", "abc", "0.1,abc", "0.1,0.1",
    "0.1;0.2", "0.1 0.2", "nan", "0.1,inf", "0.01,0.02,0.03,0.04,0.05,0.06",
    "0.1," * 400 + "0.1", "1e400", "[0.1, 0.2]",
])
def test_bad_areas(app, client, raw):
    response = post_job(client, method="extremal", areas=raw)
    error = assert_error(response, 400, field="areas", code="invalid_value")
    assert "areas" in error["message"]
    assert_nothing_stored(app)


@pytest.mark.parametrize("raw, stored", [("1", None), ("2", 2), ("5", 5), (" 3 ", 3)])
def test_top_k_accepted(app, client, raw, stored):
    response = post_job(client, top_k=raw)
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    assert body["top_k"] == (stored or 1)
    assert body["targets"] is None and body["target"] == {"index": None, "label": None}
    assert body["progress"]["total"] == 500 * (stored or 1)  # every target's iterations
    [job] = rows(app)
    assert job.top_k == stored and job.targets is None


@pytest.mark.parametrize("raw", ["0", "6", "-1", "abc", "1.5", "", "2e0", "99999999999999"])
def test_bad_top_k(app, client, raw):
    error = assert_error(post_job(client, top_k=raw), 400, field="top_k", code="invalid_value")
    assert "top_k" in error["message"]
    assert_nothing_stored(app)


@pytest.mark.parametrize("raw, indices", [
    ("flute, 683", [558, 683]),
    ("558", [558]),
    (" Flute ,oboe, 0 ", [558, 683, 0]),
    ("1,2,3,4,5", [1, 2, 3, 4, 5]),
])
def test_targets_accepted(app, client, raw, indices):
    from shared.models.labels import imagenet_labels

    labels = imagenet_labels()
    response = post_job(client, targets=raw)
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    assert body["targets"] == indices
    assert body["target"] == {"index": indices[0], "label": labels[indices[0]]}
    assert body["top_k"] == 1
    assert body["progress"]["total"] == 500 * len(indices)
    [job] = rows(app)
    assert job.targets == indices
    assert (job.target_index, job.target_label) == (indices[0], labels[indices[0]])
    assert job.top_k is None


def test_blank_targets_mean_not_given(app, client):
    response = post_job(client, targets="  ", target="flute")
    assert response.status_code == 202, response.get_data(as_text=True)
    [job] = rows(app)
    assert job.targets is None and job.target_index == 558


@pytest.mark.parametrize("raw, words", [
    ("1000", "out of range"),
    ("flute,flute", "distinct"),
    ("558, Flute", "distinct"),
    ("flute,,oboe", "empty"),
    ("flute,", "empty"),
    ("1,2,3,4,5,6", "1 to 5"),
    ("flute, no such class", "no such class"),
    ("-1", "targets"),
    ("558.0", "targets"),
    ("x" * 2000, "too long"),
])
def test_bad_targets(app, client, raw, words):
    error = assert_error(post_job(client, targets=raw), 400, field="targets",
                         code="invalid_value")
    assert words in error["message"], error
    assert_nothing_stored(app)


@pytest.mark.parametrize("fields, field", [
    ({"targets": "flute,oboe", "target": "flute"}, "targets"),
    ({"targets": "558", "target": "1"}, "targets"),
    ({"targets": "flute,oboe", "top_k": "2"}, "targets"),
    ({"target": "flute", "top_k": "3"}, "top_k"),
])
def test_conflicting_target_fields(app, client, fields, field):
    error = assert_error(post_job(client, **fields), 400, field=field, code="invalid_value")
    assert field in error["message"]
    assert_nothing_stored(app)


def test_targets_with_top_k_one_is_fine(app, client):
    response = post_job(client, targets="flute,oboe", top_k="1", target="")
    assert response.status_code == 202, response.get_data(as_text=True)
    [job] = rows(app)
    assert job.targets == [558, 683] and job.top_k is None


@pytest.mark.parametrize("field, value", [
    ("targets", "flute"), ("top_k", "2"), ("areas", "0.1"), ("method", "extremal")])
def test_new_fields_given_twice_are_rejected(app, client, field, value):
    from werkzeug.datastructures import MultiDict

    data = MultiDict([("image", (io.BytesIO(png()), "a.png")), (field, value), (field, value)])
    response = client.post("/api/v1/jobs", data=data, content_type="multipart/form-data")
    error = assert_error(response, 400, field=field)
    assert "more than once" in error["message"]
    assert_nothing_stored(app)


# --------------------------------------------------------------------------- results


def _finish_with_results(app, job_id, *, method="meaningful_perturbation",
                         targets=((558, "flute"), (683, "oboe")), gradcam=True):
    """A succeeded job with ``Job.results`` and the files of every target."""
    from web.testing import sample_result, write_result_files

    storage = app.extensions["ebb"].storage
    folder = storage.job_dir(job_id)
    files = [write_result_files(folder, k, extremal=method == "extremal", gradcam=gradcam)
             for k in range(len(targets))]
    results = [sample_result(index, label, method=method, before=0.9 - 0.3 * k,
                             after=0.02 + 0.01 * k)
               for k, (index, label) in enumerate(targets)]
    if not gradcam:
        for result in results:
            result["gradcam"] = None
    now = datetime.now(timezone.utc)
    set_job(app, job_id, status="succeeded", started_at=now - timedelta(seconds=3),
            finished_at=now, progress_iteration=20, score_before=0.9, score_after=0.02,
            target_index=targets[0][0], target_label=targets[0][1],
            top5=results[0]["top5"], results=results, timings={"total_s": 3.0})
    return results, files


def test_results_metrics_and_artifacts(app, client):
    job_id = post_job(client, targets="flute,oboe", iterations=20).get_json()["id"]
    results, files = _finish_with_results(app, job_id)
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert body["targets"] == [558, 683] and body["top_k"] == 1

    # metrics: the primary target's, with the Grad-CAM baseline's
    metrics = body["metrics"]
    assert set(metrics) == {"deletion_auc", "insertion_auc", "curves", "seconds", "gradcam"}
    assert metrics["deletion_auc"] == results[0]["metrics"]["deletion_auc"]
    assert metrics["insertion_auc"] == results[0]["metrics"]["insertion_auc"]
    assert metrics["seconds"] == 0.4
    assert metrics["curves"] == results[0]["metrics"]["curves"]
    assert len(metrics["curves"]["fraction"]) == 29
    assert metrics["gradcam"] == results[0]["gradcam"]
    assert metrics["deletion_auc"] < metrics["gradcam"]["deletion_auc"]

    # results: one per target, with its own artifacts
    assert len(body["results"]) == 2
    for k, (result, raw) in enumerate(zip(body["results"], results)):
        assert set(result) == {"target", "method", "scores", "top5", "metrics", "gradcam",
                               "areas", "warnings", "artifacts"}
        assert result["target"] == raw["target"]
        assert result["method"] == "meaningful_perturbation"
        assert result["scores"] == raw["scores"]
        assert result["top5"] == raw["top5"]
        assert result["metrics"] == raw["metrics"] and result["gradcam"] == raw["gradcam"]
        assert result["areas"] is None
        assert set(result["artifacts"]) == set(body["artifacts"]) - {"preview_png"}
        for key, url in result["artifacts"].items():
            if key == "areas_png":
                assert url is None
                continue
            assert url == f"/api/v1/jobs/{job_id}/results/{k}/artifacts/{key}"
            response = client.get(url)
            assert response.status_code == 200, url
            from web.jobs import ARTIFACTS

            assert response.data == files[k][ARTIFACTS[key]]
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    # The top level: the first target's files, extras included.
    assert body["artifacts"]["gradcam_png"] == f"/api/v1/jobs/{job_id}/artifacts/gradcam_png"
    assert client.get(body["artifacts"]["gradcam_png"]).data == files[0]["gradcam.png"]
    assert body["artifacts"]["areas_png"] is None
    # By file name too, and as a download.
    by_name = client.get(f"/api/v1/jobs/{job_id}/results/1/artifacts/gradcam.png?download=1")
    assert by_name.status_code == 200 and by_name.mimetype == "image/png"
    assert by_name.data == files[1]["gradcam.png"]
    assert "attachment" in by_name.headers["Content-Disposition"]
    assert "result1-gradcam.png" in by_name.headers["Content-Disposition"]
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(body, _job_schema(client))


def test_extremal_results_have_areas(app, client):
    job_id = post_job(client, method="extremal", areas="0.05,0.1,0.2").get_json()["id"]
    results, files = _finish_with_results(app, job_id, method="extremal",
                                          targets=((558, "flute"),))
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    [result] = body["results"]
    assert result["method"] == "extremal"
    assert [a["area"] for a in result["areas"]] == [0.05, 0.1, 0.2]
    assert result["areas"] == results[0]["areas"]
    url = result["artifacts"]["areas_png"]
    assert url == f"/api/v1/jobs/{job_id}/results/0/artifacts/areas_png"
    assert client.get(url).data == files[0]["areas.png"]
    assert body["artifacts"]["areas_png"] == f"/api/v1/jobs/{job_id}/artifacts/areas_png"


def test_result_artifact_route_errors(app, client):
    job_id = post_job(client, iterations=20).get_json()["id"]
    # Not finished yet: no result files, k=0 is the (empty) top folder.
    assert_error(client.get(f"/api/v1/jobs/{job_id}/results/0/artifacts/mask_png"), 404)
    assert_error(client.get(f"/api/v1/jobs/{job_id}/results/1/artifacts/mask_png"), 404,
                 field="k")
    _finish_with_results(app, job_id)
    base = f"/api/v1/jobs/{job_id}/results"
    assert client.get(f"{base}/0/artifacts/mask_png").status_code == 200
    assert client.get(f"{base}/1/artifacts/mask_png").status_code == 200
    for k in ("2", "5", "99999999999999999999999"):
        assert_error(client.get(f"{base}/{k}/artifacts/mask_png"), 404, field="k",
                     code="not_found")
    for k in ("-1", "x", "1.0", "%2e%2e", ""):
        response = client.get(f"{base}/{k}/artifacts/mask_png")
        assert response.status_code == 404 and response.is_json, k
    for name in ("mask", "ebb.sqlite3", "..", "%2e%2e", "thumbnail", "result.json.bak"):
        assert_error(client.get(f"{base}/1/artifacts/{name}"), 404, code="not_found")
    assert_error(client.get(f"{base}/1/artifacts/areas_png"), 404)  # not written
    for path in (f"{base}/1/artifacts/../../../ebb.sqlite3", f"{base}/1/../0/artifacts/mask.png",
                 f"{base}/1/artifacts/sub/mask.png"):
        response = client.get(path)
        assert response.status_code == 404 or b"SQLite" not in response.data, path
        assert b"SQLite" not in response.data
    assert_error(client.get(f"/api/v1/jobs/{uuid.uuid4()}/results/0/artifacts/mask_png"), 404)
    assert client.post(f"{base}/0/artifacts/mask_png").status_code == 405


def test_result_artifacts_hidden_until_succeeded(app, client):
    job_id = post_job(client, iterations=20).get_json()["id"]
    _finish_with_results(app, job_id)
    set_job(app, job_id, status="running")
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert len(body["results"]) == 2
    assert all(url is None for r in body["results"] for url in r["artifacts"].values())
    assert all(url is None for url in body["artifacts"].values())


def test_job_without_gradcam(app, client):
    job_id = post_job(client, iterations=20).get_json()["id"]
    _finish_with_results(app, job_id, targets=((558, "flute"),), gradcam=False)
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert body["metrics"]["gradcam"] is None
    assert body["metrics"]["deletion_auc"] is not None
    assert body["results"][0]["artifacts"]["gradcam_png"] is None


@pytest.mark.parametrize("stored", [
    "not a list",
    {"a": 1},
    [None, 3, "x"],
    [{"target": "flute", "scores": [1], "metrics": "x", "gradcam": 5, "areas": {"a": 1},
      "top5": [1, 2], "method": 7}],
    [{"target": {"index": True, "label": 5},
      "scores": {"before": float("nan"), "after": float("inf")},
      "metrics": {"deletion_auc": float("-inf"), "insertion_auc": "0.5", "seconds": None,
                  "curves": {"fraction": [0, 0.5, float("nan"), 1], "deletion": [1, "x", None],
                             "insertion": "no"}},
      "gradcam": {"deletion_auc": 0.3, "insertion_auc": 0.6,
                  "curves": {"fraction": [0, 1], "deletion": [1, float("nan")],
                             "insertion": [0, 1]}},
      "areas": [{"area": float("nan"), "area_achieved": "x"}, "junk", None],
      "top5": {"before": [{"index": "1", "label": ["x"], "prob": float("nan")}, 5],
               "after": "x"}}],
])
def test_malformed_results_are_cleaned(app, client, stored):
    jsonschema = pytest.importorskip("jsonschema")
    job_id = post_job(client, iterations=20).get_json()["id"]
    _finish_with_results(app, job_id, targets=((558, "flute"),))
    set_job(app, job_id, results=stored, targets=["x", 5, True, None], top_k=-2)
    response = client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert "NaN" not in text and "Infinity" not in text
    body = json.loads(text)
    jsonschema.validate(body, _job_schema(client))
    assert body["targets"] == [5] and body["top_k"] == 1
    if not isinstance(stored, list):
        assert body["results"] == [] and body["metrics"] is None
        return
    assert len(body["results"]) == len(stored)
    first = body["results"][0]
    if isinstance(stored[0], dict) and isinstance(stored[0].get("scores"), dict):
        assert first["target"] == {"index": None, "label": None}
        assert first["scores"] == {"before": None, "after": None}
        assert first["metrics"]["deletion_auc"] is None
        assert first["metrics"]["insertion_auc"] == 0.5
        assert first["metrics"]["curves"] is None  # insertion is not a list
        assert first["gradcam"]["curves"] == {"fraction": [0, 1], "deletion": [1, None],
                                              "insertion": [0, 1]}
        assert first["areas"] == [{"area": None, "area_achieved": None, "score_after": None}]
        assert first["top5"] == {"before": [{"index": None, "label": None, "prob": None}],
                                 "after": None}
        assert body["metrics"]["gradcam"]["deletion_auc"] == 0.3
    # k=0 stays the top folder; the rest exist as results but have no files.
    base = f"/api/v1/jobs/{job_id}/results"
    assert client.get(f"{base}/0/artifacts/mask_png").status_code == 200
    if len(stored) > 1:
        assert_error(client.get(f"{base}/1/artifacts/mask_png"), 404)
    # The page renders too.
    page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 200


# --------------------------------------------------------------------------- cancel


def test_cancel_queued_job(app, client):
    job_id = post_job(client, iterations=20).get_json()["id"]
    response = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "cancelled"
    assert body["finished_at"] is not None
    [job] = rows(app)
    assert job.status == "cancelled"
    again = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert_error(again, 409, code="conflict")


def test_cancel_running_job_requests_stop(app, client):
    job_id = post_job(client, iterations=20).get_json()["id"]
    set_job(app, job_id, status="running", started_at=datetime.now(timezone.utc))
    body = client.post(f"/api/v1/jobs/{job_id}/cancel").get_json()
    assert body["status"] == "running"
    assert body["cancel_requested"] is True
    [job] = rows(app)
    assert job.cancel_requested is True and job.status == "running"


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_cancel_finished_job_is_409(app, client, status):
    job_id = post_job(client, iterations=20).get_json()["id"]
    set_job(app, job_id, status=status)
    assert_error(client.post(f"/api/v1/jobs/{job_id}/cancel"), 409, code="conflict")
    [job] = rows(app)
    assert job.status == status


# --------------------------------------------------------------------------- list


def test_list_pagination_newest_first(app, client):
    ids = [post_job(client, iterations=5).get_json()["id"] for _ in range(5)]
    # Make created_at distinct and known, including a tie broken by id.
    base = datetime(2024, 1, 1, tzinfo=timezone.utc)
    stamps = [base, base + timedelta(seconds=1), base + timedelta(seconds=2),
              base + timedelta(seconds=2), base + timedelta(seconds=3)]
    for job_id, stamp in zip(ids, stamps):
        set_job(app, job_id, created_at=stamp)
    expected = [i for _, i in sorted(zip(stamps, ids), key=lambda p: (p[0], p[1]), reverse=True)]

    seen, cursor, pages = [], None, 0
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        response = client.get(f"/api/v1/jobs{query}")
        assert response.status_code == 200
        body = response.get_json()
        assert len(body["jobs"]) <= 2
        seen += [j["id"] for j in body["jobs"]]
        cursor = body["next_cursor"]
        pages += 1
        if not cursor:
            break
    assert pages == 3
    assert seen == expected

    everything = client.get("/api/v1/jobs").get_json()
    assert [j["id"] for j in everything["jobs"]] == expected
    assert everything["next_cursor"] is None


def test_list_filter_by_status(app, client):
    ids = [post_job(client, iterations=5).get_json()["id"] for _ in range(3)]
    set_job(app, ids[1], status="failed", error="boom")
    failed = client.get("/api/v1/jobs?status=failed").get_json()["jobs"]
    assert [j["id"] for j in failed] == [ids[1]]
    assert failed[0]["error"] == "boom"
    queued = client.get("/api/v1/jobs?status=queued").get_json()["jobs"]
    assert {j["id"] for j in queued} == {ids[0], ids[2]}


@pytest.mark.parametrize("query, field", [
    ("status=bogus", "status"), ("limit=0", "limit"), ("limit=-1", "limit"),
    ("limit=101", "limit"), ("limit=abc", "limit"), ("limit=1.5", "limit"),
    ("limit=%C2%B2", "limit"), ("cursor=abc", "cursor"), ("cursor=%00%01", "cursor"),
    ("cursor=" + "A" * 300, "cursor"), ("cursor=WyJ4IiwieSJd", "cursor"),
    ("status=", "status"), ("limit=", "limit"), ("cursor=", "cursor"),
    ("cursor=a.b", "cursor"), ("limit=1&limit=2", "limit"), ("status=queued&status=failed", "status"),
])
def test_list_bad_parameters(client, query, field):
    assert_error(client.get(f"/api/v1/jobs?{query}"), 400, field=field)


# --------------------------------------------------------------------------- other endpoints


def test_models(client):
    response = client.get("/api/v1/models")
    assert response.status_code == 200
    body = response.get_json()
    assert body["default"] == MODEL
    assert [m["name"] for m in body["models"]] == list(TEST_MODELS)
    for model in body["models"]:
        assert len(model["labels"]) == 1000
        assert model["labels"][558] == "flute"
        assert model["input_size"] == 224
        assert model["queue"] == f"{PREFIX}.{model['name']}"


def test_openapi_document(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    doc = json.loads(response.get_data(as_text=True))
    assert doc["openapi"].startswith("3.")
    assert doc["servers"] == [{"url": "/api/v1"}]
    assert "Unknown form fields are ignored" in doc["info"]["description"]
    paths = doc["paths"]
    for path in ("/jobs", "/jobs/{job_id}", "/jobs/{job_id}/cancel",
                 "/jobs/{job_id}/artifacts/{name}", "/jobs/{job_id}/results/{k}/artifacts/{name}",
                 "/models", "/openapi.json"):
        assert path in paths, path
    fields = paths["/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"][
        "properties"]
    assert fields["method"]["enum"] == ["meaningful_perturbation", "extremal"]
    assert fields["top_k"]["minimum"] == 1 and fields["top_k"]["maximum"] == 5
    assert fields["areas"]["type"] == "string" and fields["targets"]["type"] == "string"
    result_artifact = paths["/jobs/{job_id}/results/{k}/artifacts/{name}"]["get"]
    assert {"200", "404"} <= set(result_artifact["responses"])
    assert result_artifact["operationId"] == "getResultArtifact"
    assert set(paths["/jobs"]) == {"get", "post"}
    assert {"202", "400", "413", "503"} <= set(paths["/jobs"]["post"]["responses"])
    assert {"200", "400"} <= set(paths["/jobs"]["get"]["responses"])
    assert {"200", "404"} <= set(paths["/jobs/{job_id}"]["get"]["responses"])
    assert {"200", "404", "409"} <= set(paths["/jobs/{job_id}/cancel"]["post"]["responses"])

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref:
                target = doc
                for part in ref.lstrip("#/").split("/"):
                    target = target[part]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)  # every $ref resolves
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(doc)
    job_schema = doc["components"]["schemas"]["Job"]
    assert set(job_schema["required"]) >= {"id", "status", "artifacts", "queue_position",
                                           "metrics", "results", "targets", "top_k"}
    assert set(job_schema["properties"]["artifacts"]["required"]) >= {
        "gradcam_npy", "gradcam_png", "areas_png"}


def test_job_json_matches_openapi_schema(app, client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = _job_schema(client)
    job_id = post_job(client, iterations=20).get_json()["id"]
    jsonschema.validate(client.get(f"/api/v1/jobs/{job_id}").get_json(), schema)
    _finish_with_artifacts(app, job_id)
    jsonschema.validate(client.get(f"/api/v1/jobs/{job_id}").get_json(), schema)
    for method in ("meaningful_perturbation", "extremal"):
        job_id = post_job(client, targets="flute,oboe", method=method).get_json()["id"]
        _finish_with_results(app, job_id, method=method)
        body = client.get(f"/api/v1/jobs/{job_id}").get_json()
        assert len(body["results"]) == 2
        jsonschema.validate(body, schema)
    listed = client.get("/api/v1/jobs").get_json()["jobs"]
    for body in listed:
        jsonschema.validate(body, schema)


def test_healthz_and_readyz(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "redis": "ok", "storage": "ok"}


def test_readyz_reports_redis_down(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, REDIS_URL=DEAD_REDIS_URL)
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["failed"] == ["redis"]
    assert body["checks"]["database"] == "ok"


def test_readyz_reports_database_down(tmp_path, monkeypatch):
    from web import create_app

    for key, value in app_env(tmp_path, REDIS_DB).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5999/nope"
                                       "?connect_timeout=1")
    app = create_app({"TESTING": True, "EBB_MIGRATE": False})
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["failed"] == ["database"]
    assert app.test_client().get("/healthz").status_code == 200


def test_unexpected_error_is_json_500_without_traceback(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch)

    def boom():
        raise RuntimeError("secret internals /etc/passwd")

    app.add_url_rule("/api/v1/_boom", "boom", boom)
    app.add_url_rule("/_boom", "boom_html", boom)
    response = app.test_client().get("/api/v1/_boom")
    error = assert_error(response, 500, code="internal_error")
    assert "secret" not in response.get_data(as_text=True)
    html = app.test_client().get("/_boom")
    assert html.status_code == 500 and html.mimetype == "text/html"
    assert "secret" not in html.get_data(as_text=True)
    assert "Traceback" not in html.get_data(as_text=True)
    assert error["message"]


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/models", "/healthz", "/",
                                  "/api/v1/jobs/nope", "/nope"])
def test_security_headers(client, path):
    response = client.get(path)
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"


def test_api_needs_no_csrf_token(app, client):
    assert app.config.get("WTF_CSRF_ENABLED", True) is True
    assert post_job(client).status_code == 202


# --------------------------------------------------------------------------- no torch


def test_web_never_imports_torch_or_cv2(tmp_path):
    """Importing ``web``, creating the app and serving every kind of request
    (including a real job submission) leaves torch and OpenCV unimported."""
    script = textwrap.dedent(
        f"""
        import io, sys
        from web import create_app
        from web.testing import image_bytes
        app = create_app({{"TESTING": True}})
        c = app.test_client()
        for path in ("/", "/jobs", "/healthz", "/readyz", "/api/v1/models",
                     "/api/v1/openapi.json", "/api/v1/jobs"):
            assert c.get(path).status_code == 200, path
        r = c.post("/api/v1/jobs", data={{"image": (io.BytesIO(image_bytes()), "a.png"),
                                         "target": "flute"}})
        assert r.status_code == 202, r.data
        job = r.get_json()["id"]
        for path in (f"/jobs/{{job}}", f"/jobs/{{job}}/thumbnail", f"/jobs/{{job}}/image",
                     f"/api/v1/jobs/{{job}}"):
            assert c.get(path).status_code == 200, path
        c.post("/api/v1/jobs", data={{"image": (io.BytesIO(b"junk"), "a.png")}})
        bad = sorted(m for m in sys.modules
                     if m.split(".")[0] in ("torch", "cv2", "torchvision", "timm"))
        assert not bad, bad
        print("OK")
        """
    )
    env = {**os.environ, **app_env(tmp_path / "data", REDIS_DB), "EBB_QUEUE_PREFIX": PREFIX}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


# --------------------------------------------------------------------------- wsgi


def test_wsgi_app_never_debug(tmp_path):
    script = ("import web.wsgi as w; a = w.app; "
              "assert a.debug is False and a.config['DEBUG'] is False; print('OK')")
    env = {**os.environ, **app_env(tmp_path / "data", REDIS_DB), "FLASK_DEBUG": "1",
           "EBB_QUEUE_PREFIX": PREFIX}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_gunicorn_serves_the_app(tmp_path):
    import socket
    import urllib.request

    gunicorn = Path(sys.executable).with_name("gunicorn")
    if not gunicorn.exists():
        pytest.skip("gunicorn not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **app_env(tmp_path / "data", REDIS_DB), "EBB_QUEUE_PREFIX": PREFIX}
    proc = subprocess.Popen([str(gunicorn), "-w", "1", "-b", f"127.0.0.1:{port}", "web.wsgi:app"],
                            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    body = json.loads(r.read())
                    assert r.status == 200 and body["status"] == "ready"
                    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stdout.read().decode(errors="replace") if
                                         proc.poll() is not None else "gunicorn did not start")
                time.sleep(0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b'id="job-form"' in r.read()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_live_state_and_warnings_in_the_job_json(app, client):
    jsonschema = pytest.importorskip("jsonschema")
    job_id = post_job(client, iterations=60, top_k=2).get_json()["id"]
    live = [{"index": 558, "label": "flute", "iteration": 30, "total": 60, "score": 0.25,
             "score_iteration": 28, "score_before": 0.97},
            {"index": 683, "label": "oboe", "iteration": 29, "total": 60, "score": None,
             "score_iteration": None, "score_before": 0.01}]
    set_job(app, job_id, status="running", live=live, progress_iteration=59, progress_total=120,
            target_index=558, target_label="flute", score_before=0.97, current_score=0.25)
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    jsonschema.validate(body, _job_schema(client))
    assert body["target"] == {"index": 558, "label": "flute"} and body["scores"]["before"] == 0.97
    assert body["targets"] == [558, 683]  # top-k: known once the worker ranked them
    assert body["live"][0] == {"target": {"index": 558, "label": "flute"},
                               "progress": {"iteration": 30, "total": 60, "fraction": 0.5},
                               "score": 0.25, "score_iteration": 28, "score_before": 0.97}
    assert body["live"][1]["score"] is None and body["warnings"] == []

    _finish_with_results(app, job_id, targets=((558, "flute"), (683, "oboe")))
    stored = [dict(r) for r in next(j for j in rows(app) if str(j.id) == job_id).results]
    stored[1]["warnings"] = [{"code": "low_confidence", "message": "The model gives oboe only 0.010."},
                             {"code": 5, "message": "junk"}]
    stored[0]["warnings"] = [{"code": "score_not_halved", "message": "Not halved."}]
    set_job(app, job_id, results=stored)
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    jsonschema.validate(body, _job_schema(client))
    assert body["warnings"] == [{"code": "score_not_halved", "message": "Not halved."}]
    assert body["results"][1]["warnings"] == [{"code": "low_confidence",
                                               "message": "The model gives oboe only 0.010."}]


def test_preview_link_while_running(app, client):
    jsonschema = pytest.importorskip("jsonschema")
    job_id = post_job(client, iterations=20).get_json()["id"]
    storage = app.extensions["ebb"].storage
    set_job(app, job_id, status="running")
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["artifacts"]["preview_png"] is None
    assert_error(client.get(f"/api/v1/jobs/{job_id}/artifacts/preview_png"), 404)
    from shared.storage import atomic_write

    atomic_write(storage.preview_path(job_id), b"\x89PNG preview")
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    jsonschema.validate(body, _job_schema(client))
    assert body["artifacts"]["preview_png"] == f"/api/v1/jobs/{job_id}/artifacts/preview_png"
    response = client.get(body["artifacts"]["preview_png"])
    assert response.status_code == 200 and response.data == b"\x89PNG preview"
    assert response.mimetype == "image/png" and response.headers["Cache-Control"] == "no-cache"
    assert_error(client.get(f"/api/v1/jobs/{job_id}/results/1/artifacts/preview_png"), 404)
    set_job(app, job_id, status="succeeded")
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["artifacts"]["preview_png"] is None
