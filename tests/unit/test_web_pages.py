"""HTML pages: upload form (CSRF, validation messages), live job page, job list.

Real SQLite file in ``tmp_path`` and real Redis (database 12; queues with a
prefix unique to the run, deleted afterwards).
"""

from __future__ import annotations

import io
import re
import uuid
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

from web.testing import DEAD_REDIS_URL, TEST_MODELS, image_bytes, queue_messages
from web.testing import TestApps

REDIS_DB = 12
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
MODEL = TEST_MODELS[0]
#: Queues get a prefix unique to this run (``EBB_QUEUE_PREFIX``; the default is
#: ``explain``), so concurrent test runs never see each other's messages.
PREFIX = f"ebbtest-web{REDIS_DB}-{uuid.uuid4().hex[:8]}"
QUEUE = f"{PREFIX}.{MODEL}"


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


class Page(HTMLParser):
    """Collects tags and attributes of an HTML page."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def find(self, tag: str, **attrs) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def csrf_token(client, path="/") -> str:
    html = client.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html) or re.search(
        r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def submit_form(client, data: bytes | None = None, filename="photo.png", token=True, **fields):
    form = {"model": MODEL, "target": "", "iterations": "40", **fields}
    if token:
        form["csrf_token"] = csrf_token(client)
    if data is not None:
        form["image"] = (io.BytesIO(data), filename)
    return client.post("/", data=form, content_type="multipart/form-data")


def rows(app):
    from sqlalchemy import select

    from shared.db.models import Job

    with app.extensions["ebb"].session_factory() as db:
        return list(db.scalars(select(Job)))


def uploads(app) -> list[Path]:
    folder = app.extensions["ebb"].settings.data_dir / "uploads"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def assert_nothing_stored(app):
    assert rows(app) == []
    assert uploads(app) == []
    assert queue_messages(REDIS_URL, QUEUE) == []


def set_job(app, job_id, **values):
    from sqlalchemy import update

    from shared.db.models import Job

    with app.extensions["ebb"].session_factory() as db:
        db.execute(update(Job).where(Job.id == uuid.UUID(str(job_id))).values(**values))
        db.commit()


def new_job(client) -> str:
    response = client.post("/api/v1/jobs", data={"image": (io.BytesIO(image_bytes()), "cat.png"),
                                                  "iterations": "40"})
    assert response.status_code == 202
    return response.get_json()["id"]


# --------------------------------------------------------------------------- form


def test_form_page(client):
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    page = Page(html)
    [form] = page.find("form", id="job-form")
    assert form["method"] == "post" and form["enctype"] == "multipart/form-data"
    [file_input] = page.find("input", name="image")
    assert file_input["type"] == "file" and file_input["accept"] == "image/*"
    assert page.find("label", id="dropzone")
    assert page.find("img", id="preview")
    [select] = page.find("select", name="model")
    assert [o for o in page.find("option") if o.get("value") in TEST_MODELS]
    [target] = page.find("input", name="target")
    assert target["list"] == "labels"
    assert "Top-1" in target["placeholder"]
    assert page.find("datalist", id="labels")
    assert html.count("<option value=") >= 1000 + len(TEST_MODELS)
    assert page.find("input", name="iterations")
    assert "<details" in html and "Advanced settings" in html
    for name in ("learning_rate", "l1_coeff", "tv_coeff", "tv_beta", "noise_std",
                 "mask_size", "seed"):
        assert page.find("input", name=name), name
    assert page.find("select", name="blur")
    assert page.find("input", name="csrf_token")
    # No inline script, no external asset.
    scripts = page.find("script")
    assert scripts and all(s.get("src", "").startswith("/static/") for s in scripts)
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert "style=" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)


def test_static_assets_are_served(client):
    for path in ("/static/css/app.css", "/static/js/upload.js", "/static/js/job.js",
                 "/static/js/results.js", "/static/favicon.svg"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.data


def test_submit_redirects_to_job_page(app, client):
    response = submit_form(client, image_bytes("JPEG"), target="flute", iterations="40",
                           seed="3", blur="median")
    assert response.status_code == 303
    [job] = rows(app)
    assert response.headers["Location"].endswith(f"/jobs/{job.id}")
    assert job.target_label == "flute" and job.config["seed"] == 3
    assert job.config["blur"] == "median" and job.progress_total == 40
    [message] = queue_messages(REDIS_URL, QUEUE)
    assert message["task"] == "ebb.explain" and message["args"] == [str(job.id)]
    page = client.get(response.headers["Location"])
    assert page.status_code == 200
    assert "photo.png" in page.get_data(as_text=True)


def test_form_blank_settings_take_defaults(app, client):
    response = submit_form(client, image_bytes(), iterations="", learning_rate="", seed=" ",
                           blur="")
    assert response.status_code == 303
    [job] = rows(app)
    assert job.config["iterations"] == 500 and job.config["blur"] == "mean"


def test_missing_csrf_token_is_400_and_stores_nothing(app, client):
    response = submit_form(client, image_bytes(), token=False)
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert "security token" in html
    assert 'id="job-form"' in html  # the form is shown again
    assert_nothing_stored(app)


def test_wrong_csrf_token_is_400(app, client):
    client.get("/")
    response = client.post("/", data={"csrf_token": "nope", "iterations": "5",
                                      "image": (io.BytesIO(image_bytes()), "a.png")})
    assert response.status_code == 400
    assert_nothing_stored(app)


@pytest.mark.parametrize("data, filename, message", [
    (b"just text, not an image", "notes.png", "not an image"),
    (b"%PDF-1.4 fake pdf", "doc.png", "PDF"),
    (b"", "empty.png", ""),
    (image_bytes("PNG", (64, 64))[:60], "cut.png", ""),
])
def test_bad_upload_shows_readable_error(app, client, data, filename, message):
    response = submit_form(client, data, filename=filename)
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert "Please correct the highlighted fields." in html
    assert 'class="field-error"' in html
    if message:
        assert message.lower() in html.lower()
    assert "Traceback" not in html
    assert_nothing_stored(app)


def test_no_file_chosen(app, client):
    # A browser sends an empty part with an empty file name.
    response = submit_form(client, b"", filename="")
    assert response.status_code == 400
    assert "an image file is required" in response.get_data(as_text=True)
    assert_nothing_stored(app)


@pytest.mark.parametrize("field, value", [
    ("iterations", "abc"), ("iterations", "0"), ("iterations", "1000000000"),
    ("learning_rate", "nan"), ("noise_std", "inf"), ("target", "1000"),
    ("target", "no such label"), ("model", "unknown"), ("blur", "box"),
])
def test_bad_settings_show_message_next_to_field(app, client, field, value):
    response = submit_form(client, image_bytes(), **{field: value})
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    # The field is marked invalid and keeps the user's value (HTML-escaped).
    assert re.search(rf'<div class="field has-error[^"]*">\s*<label for="{field}"', html), field
    assert 'aria-invalid="true"' in html
    assert_nothing_stored(app)
    if field in ("learning_rate", "noise_std", "blur"):
        assert re.search(r"<details class=\"advanced\" open>", html)


def test_form_413(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, EBB_MAX_UPLOAD_MB="0.05")
    client = app.test_client()
    token = csrf_token(client)
    response = client.post("/", data={"csrf_token": token,
                                      "image": (io.BytesIO(b"\x89PNG" + b"0" * 90_000), "x.png")})
    assert response.status_code == 413
    html = response.get_data(as_text=True)
    assert "too large" in html and 'id="job-form"' in html
    assert rows(app) == [] and uploads(app) == []


def test_form_queue_down_is_503_with_message(tmp_path, monkeypatch):
    app = make_app(tmp_path, monkeypatch, REDIS_URL=DEAD_REDIS_URL)
    client = app.test_client()
    response = submit_form(client, image_bytes())
    assert response.status_code == 503
    assert "queue is unavailable" in response.get_data(as_text=True)
    assert rows(app) == []


# --------------------------------------------------------------------------- job page


def test_queued_job_page(app, client):
    first = new_job(client)
    second = new_job(client)
    html = client.get(f"/jobs/{second}").get_data(as_text=True)
    page = Page(html)
    assert page.find("span", id="status-badge")
    assert re.search(r'id="queue-position">2<', html)
    [bar] = page.find("progress", id="progress")
    assert bar["max"] == "40" and bar["value"] == "0"
    [root] = page.find("div", id="job")
    assert root["data-api"] == f"/api/v1/jobs/{second}"
    assert root["data-status"] == "queued"
    assert page.find("button", id="cancel")
    assert page.find("script", src="/static/js/job.js")
    assert first != second


def test_running_job_page(app, client):
    job_id = new_job(client)
    set_job(app, job_id, status="running", progress_iteration=10, current_score=0.5,
            started_at=datetime.now(timezone.utc) - timedelta(seconds=5))
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    page = Page(html)
    [bar] = page.find("progress", id="progress")
    assert bar["value"] == "10" and bar["max"] == "40"
    assert re.search(r'id="current-score">0\.500<', html)
    assert re.search(r'id="eta">\d', html)  # an ETA is shown
    assert "queue-position" not in html
    assert '<h2 id="live-title">Optimising the mask…</h2>' in html


def test_running_job_past_its_last_iteration_says_it_is_scoring(app, client):
    job_id = new_job(client)
    set_job(app, job_id, status="running", progress_iteration=40,
            started_at=datetime.now(timezone.utc) - timedelta(seconds=5))
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert '<h2 id="live-title">Scoring faithfulness: deletion, insertion and the Grad-CAM baseline…</h2>' in html


def _succeed(app, job_id):
    folder = app.extensions["ebb"].storage.job_dir(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("mask.png", "heatmap.png", "overlay.png", "perturbed.png"):
        (folder / name).write_bytes(image_bytes("PNG", (16, 16)))
    (folder / "mask.npy").write_bytes(b"\x93NUMPY")
    (folder / "result.json").write_text("{}")
    now = datetime.now(timezone.utc)
    set_job(
        app, job_id, status="succeeded", progress_iteration=40, score_before=0.93,
        score_after=0.012, current_score=0.012, target_index=558, target_label="flute",
        started_at=now - timedelta(seconds=12), finished_at=now,
        top5={"before": [{"index": 558, "label": "flute", "prob": 0.93},
                         {"index": 683, "label": "oboe", "prob": 0.04}],
              "after": [{"index": 683, "label": "oboe", "prob": 0.2},
                        {"index": 558, "label": "flute", "prob": 0.012}]},
        timings={"total_s": 12.0, "iterations_run": 40},
        worker_hostname="worker@box",
    )


def test_succeeded_job_page(app, client):
    job_id = new_job(client)
    _succeed(app, job_id)
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    page = Page(html)
    images = page.find("img", **{"class": "result-img"})
    assert [i["data-key"] for i in images] == ["original", "overlay_png", "heatmap_png",
                                               "mask_png", "perturbed_png"]
    for img in images:
        assert client.get(img["src"]).status_code == 200, img["src"]
    assert re.search(r'id="score-before">0\.930<', html)
    assert re.search(r'id="score-after">0\.012<', html)
    assert html.count('class="bar-row') == 4
    assert "is-target" in html
    assert "Parameters" in html and "Learning rate" in html
    assert "Durations" in html and "worker@box" in html
    downloads = [a["href"] for a in page.find("a") if "download" in a]
    assert len(downloads) == 6
    for href in downloads:
        assert client.get(href).status_code == 200
    assert not page.find("script", src="/static/js/job.js")  # nothing left to poll
    assert not page.find("button", id="cancel")


def test_failed_job_page_shows_error(app, client):
    job_id = new_job(client)
    set_job(app, job_id, status="failed", error="CUDA out of memory <script>x</script>",
            finished_at=datetime.now(timezone.utc))
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "The job failed" in html
    assert "CUDA out of memory &lt;script&gt;" in html


def test_cancel_from_page(app, client):
    job_id = new_job(client)
    token = csrf_token(client, f"/jobs/{job_id}")
    response = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert response.status_code == 303
    [job] = rows(app)
    assert job.status == "cancelled"
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "The job was cancelled." in html and "Cancelled" in html
    again = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert again.status_code == 303
    assert "already cancelled" in client.get(f"/jobs/{job_id}").get_data(as_text=True)


def test_cancel_without_csrf_is_400(app, client):
    job_id = new_job(client)
    client.get(f"/jobs/{job_id}")
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 400
    [job] = rows(app)
    assert job.status == "queued"


@pytest.mark.parametrize("path", ["/jobs/nope", "/jobs/123/thumbnail",
                                  f"/jobs/{uuid.uuid4()}", f"/jobs/{uuid.uuid4()}/image"])
def test_unknown_jobs_are_html_404(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.mimetype == "text/html"
    assert "Not found" in response.get_data(as_text=True)


def test_original_and_thumbnail(app, client):
    job_id = new_job(client)
    original = client.get(f"/jobs/{job_id}/image")
    assert original.status_code == 200 and original.mimetype == "image/png"
    assert original.data == image_bytes()
    thumb = client.get(f"/jobs/{job_id}/thumbnail")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"
    assert thumb.data[:2] == b"\xff\xd8"


# --------------------------------------------------------------------------- list


def test_jobs_list_and_pagination(app, client):
    from shared.db.models import Job

    sha = app.extensions["ebb"].storage.save_upload(image_bytes())
    base = datetime(2024, 5, 1, tzinfo=timezone.utc)
    with app.extensions["ebb"].session_factory() as db:
        for i in range(25):
            db.add(Job(model=MODEL, status="succeeded" if i % 2 else "queued", config={},
                       image_sha256=sha, image_width=64, image_height=48,
                       image_filename=f"img-{i:02d}.png", created_at=base + timedelta(minutes=i),
                       score_before=0.9, score_after=0.1))
        db.commit()
    first = client.get("/jobs").get_data(as_text=True)
    names = re.findall(r'class="job-name" title="(img-\d+\.png)"', first)
    assert names == [f"img-{i:02d}.png" for i in range(24, 4, -1)]
    assert "Page 1 of 2" in first and 'rel="next"' in first
    second = client.get("/jobs?page=2").get_data(as_text=True)
    assert re.findall(r'class="job-name" title="(img-\d+\.png)"', second) == [
        f"img-{i:02d}.png" for i in range(4, -1, -1)]
    assert 'rel="prev"' in second
    # Out-of-range or junk page numbers are clamped, never an error.
    assert client.get("/jobs?page=99").status_code == 200
    assert client.get("/jobs?page=abc").status_code == 200
    thumbs = Page(first).find("img", **{"class": "thumb"})
    assert len(thumbs) == 20
    assert client.get(thumbs[0]["src"]).status_code == 200


def test_empty_jobs_list(client):
    html = client.get("/jobs").get_data(as_text=True)
    assert "No jobs yet" in html


@pytest.mark.parametrize("path", ["/", "/jobs", "/nope"])
def test_html_security_headers(client, path):
    response = client.get(path)
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"


def test_method_not_allowed_html(client):
    response = client.delete("/")
    assert response.status_code == 405
    assert response.mimetype == "text/html"


# --------------------------------------------------------------------------- method, targets


def test_form_has_method_areas_top_k_and_targets(client):
    html = client.get("/").get_data(as_text=True)
    page = Page(html)
    [method] = page.find("select", name="method")
    values = [o["value"] for o in page.find("option") if o.get("value") in (
        "meaningful_perturbation", "extremal")]
    assert values == ["meaningful_perturbation", "extremal"]
    assert re.search(r'<option selected value="meaningful_perturbation">|'
                     r'<option value="meaningful_perturbation" selected>', html)
    [areas] = page.find("input", name="areas")
    assert areas["value"] == "0.05, 0.1, 0.2"
    [top_k] = page.find("input", name="top_k")
    assert top_k["type"] == "number" and top_k["min"] == "1" and top_k["max"] == "5"
    assert top_k["value"] == "1"
    [targets] = page.find("input", name="targets")
    assert "flute" in targets["placeholder"]
    for text in ("Extremal", "most probable classes", "comma-separated", "fractions"):
        assert text in html, text
    assert "style=" not in html


def test_form_submits_several_targets_and_extremal(app, client):
    response = submit_form(client, image_bytes(), targets="flute, oboe", top_k="1",
                           method="extremal", areas="0.1, 0.3")
    assert response.status_code == 303, response.get_data(as_text=True)[:2000]
    [job] = rows(app)
    assert job.targets == [558, 683] and job.top_k is None
    assert (job.target_index, job.target_label) == (558, "flute")
    assert job.config["method"] == "extremal" and job.config["areas"] == [0.1, 0.3]
    html = client.get(response.headers["Location"]).get_data(as_text=True)
    assert re.search(r'id="targets">flute <span class="muted">\(#558\)</span>, oboe', html)
    assert re.search(r'id="method">Extremal perturbations<', html)


def test_form_top_k_and_blank_new_fields(app, client):
    response = submit_form(client, image_bytes(), top_k="3", targets="", areas="")
    assert response.status_code == 303
    [job] = rows(app)
    assert job.top_k == 3 and job.targets is None
    assert job.config["areas"] == [0.05, 0.1, 0.2]
    assert job.config["method"] == "meaningful_perturbation"
    html = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "top-3 classes of the model" in html


def test_form_blank_top_k_is_one(app, client):
    response = submit_form(client, image_bytes(), top_k=" ", target="flute")
    assert response.status_code == 303
    [job] = rows(app)
    assert job.top_k is None and job.target_index == 558


@pytest.mark.parametrize("fields, field", [
    ({"targets": "flute, flute"}, "targets"),
    ({"targets": "flute, nope"}, "targets"),
    ({"targets": "flute", "target": "oboe"}, "targets"),
    ({"targets": "flute,oboe", "top_k": "2"}, "targets"),
    ({"top_k": "9"}, "top_k"),
    ({"top_k": "two"}, "top_k"),
    ({"top_k": "2", "target": "flute"}, "top_k"),
    ({"areas": "0.1,,0.2"}, "areas"),
    ({"areas": "1.5"}, "areas"),
    ({"areas": "0.1,0.1"}, "areas"),
    ({"method": "gradcam"}, "method"),
])
def test_bad_new_fields_show_message_next_to_field(app, client, fields, field):
    response = submit_form(client, image_bytes(), **fields)
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    match = re.search(rf'<div class="field has-error[^"]*">\s*<label for="{field}"(.*?)</div>',
                      html, re.S)
    assert match, field
    assert 'class="field-error"' in match.group(1)
    assert field in match.group(1)  # the message names the field
    assert_nothing_stored(app)


# --------------------------------------------------------------------------- result cards


def _succeed_with_results(app, job_id, *, method="meaningful_perturbation",
                          targets=((558, "flute"), (683, "oboe")), gradcam=True):
    from web.testing import sample_result, write_result_files

    _succeed(app, job_id)
    folder = app.extensions["ebb"].storage.job_dir(job_id)
    for k in range(len(targets)):
        write_result_files(folder, k, extremal=method == "extremal", gradcam=gradcam)
    results = [sample_result(index, label, method=method, before=0.93 - 0.4 * k)
               for k, (index, label) in enumerate(targets)]
    if not gradcam:
        for result in results:
            result["gradcam"] = None
    set_job(app, job_id, results=results, targets=[t[0] for t in targets])
    return results


class Svg(HTMLParser):
    """Paths (class, d) and titles of each ``svg.curves`` of a page."""

    def __init__(self, html: str):
        super().__init__()
        self.charts: list[dict] = []
        self._in_title = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg" and "curves" in (attrs.get("class") or "").split():
            self.charts.append({"attrs": attrs, "paths": [], "titles": []})
        elif self.charts and tag == "path":
            self.charts[-1]["paths"].append(attrs)
        elif self.charts and tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title and self.charts:
            self.charts[-1]["titles"].append(data)


def test_result_cards_side_by_side(app, client):
    job_id = new_job(client)
    results = _succeed_with_results(app, job_id)
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    page = Page(html)
    assert page.find("div", id="result-cards", **{"class": "result-grid"})
    cards = [a for t, a in page.tags if t == "article" and "data-result" in a]
    assert [c["data-result"] for c in cards] == ["0", "1"]
    assert "2 explanations side by side" in html
    assert re.search(r'class="result-label">flute</span> <span class="muted result-index">#558<',
                     html)
    assert re.search(r'class="result-label">oboe</span> <span class="muted result-index">#683<',
                     html)
    assert re.search(r'id="targets">flute <span class="muted">\(#558\)</span>, oboe', html)
    assert re.search(r'class="score-before">0\.930</span>.*?class="score-after">0\.020<', html,
                     re.S)
    # Perturbation overlay next to the Grad-CAM overlay, per target, all served.
    for k in (0, 1):
        [overlay] = page.find("img", **{"class": "result-overlay",
                                        "src": f"/api/v1/jobs/{job_id}/results/{k}/artifacts/overlay_png"})
        [gradcam] = page.find("img", **{"class": "result-gradcam",
                                        "src": f"/api/v1/jobs/{job_id}/results/{k}/artifacts/gradcam_png"})
        for img in (overlay, gradcam):
            response = client.get(img["src"])
            assert response.status_code == 200 and response.mimetype == "image/png"
            assert img["alt"]
    assert not page.find("img", **{"class": "result-areas"})  # not extremal
    # AUCs of both maps, the better one marked, and a verdict.
    expected = f'{results[0]["metrics"]["deletion_auc"]:.3f}'
    assert re.search(rf'class="auc deletion-mask better">{expected} ', html)
    assert re.search(r'class="auc insertion-mask better">', html)
    assert "lower is better" in html and "higher is better" in html
    assert html.count("More faithful: the perturbation mask") == 2
    # The charts: one SVG per result, four curves each (Grad-CAM dashed via CSS).
    from web import charts as geometry

    charts = Svg(html).charts
    assert [c["attrs"]["id"] for c in charts] == ["curves-0", "curves-1"]
    for chart, label in zip(charts, ("flute", "oboe")):
        assert chart["attrs"]["role"] == "img"
        assert chart["attrs"]["aria-labelledby"]
        assert f"Deletion and insertion curves for {label}" in chart["titles"]
        classes = sorted(p["class"] for p in chart["paths"])
        assert classes == ["curve deletion gradcam", "curve deletion mask",
                           "curve insertion gradcam", "curve insertion mask"]
        for path in chart["paths"]:
            points = re.findall(r"[ML]([\d.]+),([\d.]+)", path["d"])
            assert len(points) == 29 and path["d"].startswith("M")
            xs = [float(x) for x, _ in points]
            assert xs == sorted(xs)
            assert xs[0] == geometry.LEFT and xs[-1] == geometry.WIDTH - geometry.RIGHT
    assert html.count('class="curve-legend"') == 2
    css = client.get("/static/css/app.css").get_data(as_text=True)
    assert ".curve.gradcam { stroke-dasharray" in css
    # JS redraws them from the API; no inline script or style anywhere.
    assert page.find("script", src="/static/js/results.js")
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert "style=" not in html
    # Downloads list every target's files.
    downloads = [a["href"] for a in page.find("a") if "download" in a]
    assert f"/api/v1/jobs/{job_id}/results/1/artifacts/gradcam_png?download=1" in downloads
    assert f"/api/v1/jobs/{job_id}/artifacts/gradcam_png?download=1" in downloads


def test_extremal_card_shows_areas(app, client):
    job_id = new_job(client)
    results = _succeed_with_results(app, job_id, method="extremal", targets=((558, "flute"),))
    set_job(app, job_id, config={"method": "extremal", "areas": [0.05, 0.1, 0.2]})
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    page = Page(html)
    [strip] = page.find("img", **{"class": "result-areas"})
    assert strip["src"] == f"/api/v1/jobs/{job_id}/results/0/artifacts/areas_png"
    assert client.get(strip["src"]).status_code == 200
    rows_html = re.findall(r'<tr class="area-row"><td>([^<]+)</td><td>([^<]+)</td>'
                           r'<td>([^<]+)</td></tr>', html)
    assert [r[0] for r in rows_html] == ["5.0%", "10.0%", "20.0%"]
    assert rows_html[0][1] == "5.1%"
    assert rows_html[0][2] == f'{results[0]["areas"][0]["score_after"]:.3f}'
    assert "Explanation and its faithfulness" in html
    assert re.search(r'class="chip result-method">Extremal perturbations<', html)
    assert re.search(r'id="method">Extremal perturbations<', html)


def test_card_without_gradcam_or_curves(app, client):
    job_id = new_job(client)
    _succeed_with_results(app, job_id, targets=((558, "flute"),), gradcam=False)
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "No Grad-CAM" in html
    [chart] = Svg(html).charts
    assert sorted(p["class"] for p in chart["paths"]) == ["curve deletion mask",
                                                          "curve insertion mask"]
    assert 'class="auc deletion-gradcam">–<' in html
    set_job(app, job_id, results=[{"target": {"index": 558, "label": "flute"}}])
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert Svg(html).charts == []
    assert 'data-result="0"' in html and "No deletion/insertion curves" in html


def test_succeeded_job_without_results_has_no_cards(app, client):
    job_id = new_job(client)
    _succeed(app, job_id)
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert 'id="faithfulness"' not in html and "data-result" not in html
    assert not Page(html).find("script", src="/static/js/results.js")


def test_running_job_with_results_shows_no_cards_yet(app, client):
    job_id = new_job(client)
    _succeed_with_results(app, job_id)
    set_job(app, job_id, status="running")
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "data-result" not in html


def test_results_js_is_served(client):
    response = client.get("/static/js/results.js")
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    # The same geometry as web/charts.py.
    from web import charts

    assert (f"var WIDTH = {charts.WIDTH}, HEIGHT = {charts.HEIGHT}, LEFT = {charts.LEFT}, "
            f"RIGHT = {charts.RIGHT}, TOP = {charts.TOP}, BOTTOM = {charts.BOTTOM};") in text
    assert "curves" in text and "data-rendered" in text


# --------------------------------------------------------------------------- chart helpers


def test_chart_geometry():
    from web import charts

    assert charts.y_max([0.93, 0.2]) == 1.0
    assert charts.y_max([0.03, None, float("nan")]) == 0.05
    assert charts.y_max([]) == 0.01
    assert charts.y_max([1.7]) == 2.0
    d = charts.path_data([0, 0.5, 1], [1.0, 0.5, 0.0], 1.0)
    assert d == (f"M{charts.LEFT:.1f},{charts.TOP:.1f} "
                 f"L{charts.LEFT + charts.PLOT_W / 2:.1f},{charts.TOP + charts.PLOT_H / 2:.1f} "
                 f"L{charts.LEFT + charts.PLOT_W:.1f},{charts.TOP + charts.PLOT_H:.1f}")
    # A missing point breaks the line; out-of-range values are clamped.
    broken = charts.path_data([0, 0.5, 1, 1.5], [0.2, None, 0.4, 9], 1.0)
    assert broken.count("M") == 2 and "L" in broken
    assert charts.curves_chart({"metrics": None, "gradcam": None}) is None
    chart = charts.curves_chart({"metrics": {"curves": {"fraction": [0, 1], "deletion": [0.1, 0],
                                                        "insertion": [0, 0.1]}}})
    assert [s["name"] for s in chart["series"]] == ["Deletion, Perturbation mask",
                                                   "Insertion, Perturbation mask"]
    assert chart["y_max"] == 0.1
    assert [t["label"] for t in chart["y_ticks"]] == ["0", "0.05", "0.1"]
    assert [t["label"] for t in chart["x_ticks"]] == ["0%", "25%", "50%", "75%", "100%"]


@pytest.mark.parametrize("mask, gradcam, deletion, insertion, words", [
    ((0.1, 0.8), (0.3, 0.6), "mask", "mask", "More faithful: the perturbation mask"),
    ((0.3, 0.6), (0.1, 0.8), "gradcam", "gradcam", "More faithful: Grad-CAM"),
    ((0.1, 0.5), (0.3, 0.8), "mask", "gradcam", "Mixed"),
    ((0.1, None), (0.3, 0.8), "mask", None, "perturbation mask by deletion"),
    ((0.2, 0.5), (0.2, 0.5), "tie", "tie", "same"),
    ((None, None), None, None, None, None),
])
def test_faithfulness_verdict(mask, gradcam, deletion, insertion, words):
    from web import charts

    def metrics(pair):
        return None if pair is None else {"deletion_auc": pair[0], "insertion_auc": pair[1]}

    verdict = charts.verdict({"metrics": metrics(mask), "gradcam": metrics(gradcam)})
    assert verdict["deletion"] == deletion and verdict["insertion"] == insertion
    if words is None:
        assert verdict["summary"] is None
    else:
        assert words in verdict["summary"]


def test_jobs_list_shows_several_targets(app, client):
    first = new_job(client)
    second = new_job(client)
    set_job(app, first, targets=[558, 683, 1], target_index=558, target_label="flute")
    set_job(app, second, top_k=3)
    html = client.get("/jobs").get_data(as_text=True)
    assert re.search(r'<span>flute <span class="muted">\+2</span></span>', html)
    assert "<span>top-3</span>" in html


def test_running_page_shows_live_preview_and_per_target_scores(app, client):
    job_id = new_job(client)
    live = [{"index": 558, "label": "flute", "iteration": 12, "total": 40, "score": 0.31,
             "score_iteration": 11, "score_before": 0.97},
            {"index": 683, "label": "oboe", "iteration": 11, "total": 40, "score": 0.004,
             "score_iteration": 10, "score_before": 0.02}]
    set_job(app, job_id, status="running", progress_iteration=23, progress_total=80, live=live,
            current_score=0.31, score_before=0.97, target_index=558, target_label="flute",
            started_at=datetime.now(timezone.utc) - timedelta(seconds=5))
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    [img] = Page(html).find("img", id="live-preview")
    assert img["src"].endswith("/thumbnail")  # no preview written yet
    app.extensions["ebb"].storage.preview_path(job_id).parent.mkdir(parents=True, exist_ok=True)
    app.extensions["ebb"].storage.preview_path(job_id).write_bytes(image_bytes("PNG", (16, 16)))
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    [img] = Page(html).find("img", id="live-preview")
    assert img["src"] == f"/api/v1/jobs/{job_id}/artifacts/preview_png"
    assert client.get(img["src"]).status_code == 200
    assert "no noise" in html and re.search(r'id="current-score">0\.310<', html)
    assert re.search(r'id="live-score-before">0\.970<', html)
    rows = re.findall(r'<tr class="live-target"><td>(\w+)</td><td>(\d+) / (\d+)</td><td>([\d.e+-]+)</td>', html)
    assert rows == [("flute", "12", "40", "0.310"), ("oboe", "11", "40", "0.004")]


def test_weak_result_shows_warnings_and_colour_scale(app, client):
    job_id = new_job(client)
    _succeed(app, job_id)
    result = {"target": {"index": 558, "label": "flute"}, "method": "meaningful_perturbation",
              "scores": {"before": 0.93, "after": 0.9}, "top5": {"before": None, "after": None},
              "metrics": None, "gradcam": None, "areas": None,
              "warnings": [{"code": "score_not_halved", "message": "Only 0.930 to 0.900."},
                           {"code": "mask_unchanged", "message": "The mask barely moved; lower noise_std."}]}
    set_job(app, job_id, results=[result])
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    section = html[html.index('id="warnings"'):html.index("</section>", html.index('id="warnings"'))]
    assert 'data-code="score_not_halved"' in section and "lower noise_std" in section
    assert 'id="colour-scale"' in html and "most salient" in html
    assert "model input size" in html and "original size" in html


def test_form_suggests_what_to_try_on_a_weak_result(client):
    html = client.get("/").get_data(as_text=True)
    tips = html[html.index('id="weak-tips"'):html.index("</p>", html.index('id="weak-tips"'))]
    assert "noise std" in tips and "iterations" in tips and "preservation" in tips
    assert "bit-for-bit" in html  # the seed's guarantee


def test_form_over_the_admission_limits_shows_the_field_and_stores_nothing(app, client):
    response = submit_form(client, image_bytes(), iterations="10000", top_k="5", input_size="1024",
                           mask_size="224", method="extremal", areas="0.05,0.1,0.2,0.3,0.4")
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert "Please correct the highlighted fields." in html
    assert "EBB_MAX_JOB_MEMORY" in html and "lower input_size" in html
    assert_nothing_stored(app)
