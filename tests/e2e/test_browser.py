"""End to end in a real browser: upload, watch the live progress, see the result.

Also takes the screenshots ``screenshot-form.png``, ``screenshot-running.png``
and ``screenshot-result.png``: into ``docs/`` (the README shows them) when
``EBB_UPDATE_SCREENSHOTS=1``, else into the test's temporary folder, so a
test run leaves the checkout clean.
"""

from __future__ import annotations

import re
import time

import pytest


pytestmark = pytest.mark.e2e

ITERATIONS = 40
JOB_TIMEOUT_S = 240


def _csp_problems(page) -> list[str]:
    return [m for m in page.console_messages
            if "Content Security Policy" in m or "Refused to" in m or m.startswith("pageerror")]


def test_upload_watch_progress_and_see_results(e2e_stack, page, flute_image, shots):
    page.goto(e2e_stack.base_url + "/")
    assert page.title().startswith("New explanation")
    page.set_input_files("#image", str(flute_image))
    page.wait_for_function(
        "() => { const p = document.getElementById('preview');"
        " return p && !p.hidden && p.naturalWidth > 0; }"
    )
    page.fill("#iterations", str(ITERATIONS))
    page.fill("#target", "")
    page.locator("details.advanced summary").click()  # show the advanced settings too
    page.screenshot(path=str(shots / "screenshot-form.png"), full_page=True)
    page.locator("details.advanced summary").click()

    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
    job_url = page.url
    job_id = job_url.rsplit("/", 1)[1]

    # Watch the progress bar (the page reloads itself when the status changes).
    values: list[int] = []
    running_shot = False
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        try:
            state = page.evaluate(
                "() => { const r = document.getElementById('job');"
                " const p = document.getElementById('progress');"
                " return {status: r && r.dataset.status, value: p ? p.value : null}; }"
            )
        except Exception:  # noqa: BLE001 - navigating (reload) right now
            time.sleep(0.05)
            continue
        status = state["status"]
        if state["value"] is not None and (not values or values[-1] != state["value"]):
            values.append(int(state["value"]))
        value = state["value"] or 0
        # One shot as soon as it runs, replaced by a better one a quarter of the way in.
        if status == "running" and 0 < value < ITERATIONS and (
                not running_shot or (running_shot == "early" and value >= ITERATIONS // 4)):
            page.screenshot(path=str(shots / "screenshot-running.png"), full_page=True)
            running_shot = "early" if value < ITERATIONS // 4 else "good"
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert status == "succeeded", (
        f"job {job_id} ended as {status}; values {values}\n{e2e_stack.worker_tail()}")
    assert any(b > a for a, b in zip(values, values[1:])), f"progress never moved: {values}"

    # The finished page: five pictures that really render.
    page.wait_for_selector("#results img.result-img")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img.result-img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    keys = page.eval_on_selector_all(
        "#results img.result-img", "els => els.map(e => [e.dataset.key, e.naturalWidth])")
    assert [k for k, _ in keys] == ["original", "overlay_png", "heatmap_png", "mask_png",
                                    "perturbed_png"]
    assert all(width > 0 for _, width in keys)
    before = page.inner_text("#score-before")
    after = page.inner_text("#score-after")
    assert float(before) > float(after), (before, after)
    assert page.locator(".chart .bar-row").count() >= 2
    # Six result files, the saliency at the original size (npy, png), the
    # Grad-CAM map and overlay, and job.json.
    assert page.locator(".downloads a").count() == 11

    # The faithfulness card: Grad-CAM next to the mask, both curves drawn.
    _assert_result_card(page, 0, gradcam=True)
    assert "More faithful" in page.inner_text('[data-result="0"] .verdict')
    _assert_api_matches_schema(page, e2e_stack.base_url, job_id, results=1)
    page.screenshot(path=str(shots / "screenshot-result.png"), full_page=True)

    # The job list shows it with a thumbnail that renders.
    page.goto(e2e_stack.base_url + "/jobs")
    thumb = page.locator(f'a[href="/jobs/{job_id}"] img.thumb')
    thumb.wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert _csp_problems(page) == []


def _assert_api_matches_schema(page, base_url: str, job_id: str, *, results: int) -> dict:
    """The worker's real ``results`` come out of the API as the OpenAPI
    document says: ``metrics`` with Grad-CAM's, one entry per target."""
    doc = page.request.get(base_url + "/api/v1/openapi.json").json()
    body = page.request.get(f"{base_url}/api/v1/jobs/{job_id}").json()
    assert len(body["results"]) == results, body["results"]
    metrics = body["metrics"]
    assert metrics is not None and metrics["gradcam"] is not None
    for scores in (metrics, metrics["gradcam"]):
        assert 0 <= scores["deletion_auc"] <= 1 and 0 <= scores["insertion_auc"] <= 1
        assert len(scores["curves"]["fraction"]) == len(scores["curves"]["deletion"]) > 10
    jsonschema = pytest.importorskip("jsonschema")
    from web.testing import openapi_to_jsonschema

    jsonschema.validate(body, openapi_to_jsonschema(doc["components"]["schemas"]["Job"]))
    return body


def _assert_result_card(page, k: int, *, gradcam: bool) -> list[str]:
    """Result card ``k`` shows the mask's overlay (and Grad-CAM's) as images
    that really render, its AUCs, and the deletion/insertion chart drawn by
    results.js from the API, with path data. Returns the curves' classes."""
    card = f'[data-result="{k}"]'
    page.wait_for_selector(f"{card} svg.curves path.curve")
    images = f"{card} img.result-overlay" + (f", {card} img.result-gradcam" if gradcam else "")
    page.wait_for_function(
        "sel => { const els = [...document.querySelectorAll(sel)];"
        " return els.length > 0 && els.every(i => i.complete && i.naturalWidth > 0); }",
        arg=images)
    assert page.locator(images).count() == (2 if gradcam else 1)
    # results.js replaces the server-rendered chart once the API answered.
    page.wait_for_selector(f'{card} svg.curves[data-rendered="js"]')
    chart = page.locator(f"{card} svg.curves")
    assert chart.count() == 1
    assert "Deletion and insertion curves" in chart.locator("title").first.text_content()
    paths = page.eval_on_selector_all(
        f"{card} svg.curves path.curve",
        "els => els.map(e => [e.getAttribute('class'), e.getAttribute('d'),"
        " e.getTotalLength()])")
    expected = {"curve deletion mask", "curve insertion mask"}
    if gradcam:
        expected |= {"curve deletion gradcam", "curve insertion gradcam"}
    assert {c for c, _, _ in paths} == expected, paths
    for cls, d, length in paths:
        assert d.startswith("M") and d.count("L") >= 10, (cls, d)
        assert length > 50, (cls, length)
    aucs = page.eval_on_selector_all(f"{card} td.auc", "els => els.map(e => e.textContent)")
    numbers = [float(t.split()[0]) for t in aucs if t.split() and t.split()[0] != "–"]
    assert len(numbers) == (4 if gradcam else 2), aucs
    assert all(0 <= n <= 1 for n in numbers), aucs
    # A hover read-out over the chart.
    chart.scroll_into_view_if_needed()
    box = chart.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    page.wait_for_function(
        "sel => { const r = document.querySelector(sel);"
        " return r && r.getAttribute('visibility') === 'visible'; }",
        arg=f"{card} svg.curves .readout")
    page.mouse.move(0, 0)
    page.wait_for_function(
        "sel => document.querySelector(sel).getAttribute('visibility') === 'hidden'",
        arg=f"{card} svg.curves .readout")
    return sorted(c for c, _, _ in paths)


def test_several_targets_extremal_side_by_side(e2e_stack, page, flute_image):
    """Two classes of one image with the extremal method: two cards, each with
    its Grad-CAM comparison, the per-area strip and its curves."""
    page.goto(e2e_stack.base_url + "/")
    page.set_input_files("#image", str(flute_image))
    page.fill("#target", "")
    page.fill("#targets", "flute, oboe")
    page.select_option("#method", "extremal")
    page.fill("#areas", "0.1, 0.3")
    page.fill("#iterations", "12")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        try:
            status = page.evaluate("() => document.getElementById('job').dataset.status")
        except Exception:  # noqa: BLE001 - reloading
            time.sleep(0.1)
            continue
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    assert status == "succeeded", (
        f"job {job_id} ended as {status}\n{e2e_stack.worker_tail()}")
    page.wait_for_selector("#result-cards")
    assert page.locator("#result-cards article.result-card").count() == 2
    labels = page.eval_on_selector_all("#result-cards .result-label",
                                       "els => els.map(e => e.textContent)")
    assert labels == ["flute", "oboe"]
    for k in (0, 1):
        _assert_result_card(page, k, gradcam=True)
        card = f'[data-result="{k}"]'
        strip = page.locator(f"{card} img.result-areas")
        assert strip.count() == 1
        page.wait_for_function(
            "sel => { const i = document.querySelector(sel);"
            " return i && i.complete && i.naturalWidth > 0; }", arg=f"{card} img.result-areas")
        rows = page.eval_on_selector_all(f"{card} tr.area-row",
                                         "els => els.map(e => e.textContent)")
        assert len(rows) == 2 and "10.0%" in rows[0] and "30.0%" in rows[1], rows
        assert "Extremal" in page.inner_text(f"{card} .result-method")
    body = _assert_api_matches_schema(page, e2e_stack.base_url, job_id, results=2)
    assert body["targets"] == [558, 683]
    assert [r["target"]["index"] for r in body["results"]] == [558, 683]
    assert all(r["method"] == "extremal" and len(r["areas"]) == 2 for r in body["results"])
    # The two cards sit side by side (a grid), not stacked.
    first = page.locator('[data-result="0"]').bounding_box()
    second = page.locator('[data-result="1"]').bounding_box()
    assert abs(first["y"] - second["y"]) < 2 and second["x"] > first["x"] + first["width"] - 1
    assert _csp_problems(page) == []


def test_bad_upload_shows_readable_error(e2e_stack, page, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("This is a text file pretending to be a PNG.\n" * 10)
    page.goto(e2e_stack.base_url + "/")
    page.set_input_files("#image", str(fake))
    page.fill("#iterations", "10")
    page.click("#submit")
    error = page.locator(".field-error").first
    error.wait_for()
    text = error.inner_text()
    assert "image" in text.lower() or "not" in text.lower(), text
    assert "Traceback" not in page.content()
    assert page.locator("#form-errors").is_visible()
    assert page.url.rstrip("/") == e2e_stack.base_url  # still on the form
    assert _csp_problems(page) == []


def test_bad_number_shows_error_next_to_field(e2e_stack, page, flute_image):
    page.goto(e2e_stack.base_url + "/")
    page.set_input_files("#image", str(flute_image))
    # Bypass the browser's own min/max check to see the server's message.
    page.evaluate("() => document.getElementById('job-form').noValidate = true")
    page.fill("#iterations", "0")
    page.click("#submit")
    page.locator(".field.has-error #iterations").wait_for()
    assert "iterations must be between" in page.inner_text(".field.has-error .field-error")


_PREVIEW_SIGNATURE = """() => {
  const img = document.getElementById('live-preview');
  if (!img || !img.complete || !img.naturalWidth || !img.src.includes('preview_png')) return null;
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let s = 0;
  for (let i = 0; i < d.length; i += 7) s = (s * 31 + d[i]) % 1000000007;
  return {sig: s, iteration: Number(img.dataset.iteration || 0)};
}"""


def _wait_status(page, job_id, e2e_stack, on_poll=None) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = None
    from playwright.sync_api import Error as PlaywrightError

    while time.monotonic() < deadline:
        try:
            status = page.evaluate("() => document.getElementById('job').dataset.status")
            if on_poll is not None and status == "running":
                on_poll()
        except PlaywrightError:  # reloading right now
            time.sleep(0.1)
            continue
        if status in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {status}\n{e2e_stack.worker_tail()}")


def test_live_mask_changes_and_weak_result_warns(e2e_stack, page, flute_image, shots, tmp_path):
    """While the job runs the page shows the current mask over the image and it
    changes; a 1×1 image's result carries its warnings."""
    page.goto(e2e_stack.base_url + "/")
    page.set_input_files("#image", str(flute_image))
    page.fill("#target", "")
    page.fill("#iterations", "200")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    seen: dict[int, int] = {}
    shot = {"taken": False}

    def look():
        got = page.evaluate(_PREVIEW_SIGNATURE)
        if got is None:
            return
        seen.setdefault(got["sig"], got["iteration"])
        if len(seen) >= 2 and not shot["taken"]:
            assert "no noise" in page.inner_text(".stats").lower()
            page.screenshot(path=str(shots / "screenshot-live-mask.png"), full_page=True)
            shot["taken"] = True

    status = _wait_status(page, job_id, e2e_stack, look)
    assert status == "succeeded", e2e_stack.worker_tail()
    assert len(seen) >= 2, f"the live mask never changed: {seen}"
    assert not page.request.get(f"{e2e_stack.base_url}/api/v1/jobs/{job_id}").json()["artifacts"]["preview_png"]

    from PIL import Image

    black = tmp_path / "black.png"
    Image.new("RGB", (1, 1)).save(black)
    page.goto(e2e_stack.base_url + "/")
    page.set_input_files("#image", str(black))
    page.fill("#target", "")
    page.fill("#iterations", "20")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
    weak_id = page.url.rsplit("/", 1)[1]
    assert _wait_status(page, weak_id, e2e_stack) == "succeeded", e2e_stack.worker_tail()
    page.wait_for_selector("#warnings li.warning")
    codes = page.eval_on_selector_all("#warnings li.warning", "els => els.map(e => e.dataset.code)")
    assert "small_input" in codes and "mask_unchanged" in codes, codes
    assert page.locator("#colour-scale").is_visible()
    page.screenshot(path=str(shots / "screenshot-warnings.png"), full_page=True)
    body = _assert_api_matches_schema(page, e2e_stack.base_url, weak_id, results=1)
    assert [w["code"] for w in body["warnings"]] == codes
    assert _csp_problems(page) == []


def test_workers_page_shows_the_live_worker_and_refreshes_itself(e2e_stack, page, shots):
    page.goto(e2e_stack.base_url + "/workers")
    assert page.title().startswith("Workers")
    # The e2e worker's heartbeat is there (published every few seconds from its start).
    row = page.locator(f'tr[data-hostname^="e2e-{e2e_stack.queue_prefix}@"]')
    row.wait_for(timeout=15_000)
    assert "efficientnet_lite0" in row.inner_text() and "cpu" in row.inner_text()
    assert page.locator('#fleet-models tr[data-model="efficientnet_lite0"]').inner_text().split()[1] == "1"
    # The page reloads itself: a marker set now is gone after the refresh.
    page.evaluate("() => { window.__ebbMarker = 1; }")
    page.wait_for_function("() => window.__ebbMarker === undefined", timeout=15_000)
    assert page.locator(f'tr[data-hostname^="e2e-{e2e_stack.queue_prefix}@"]').count() == 1
    page.screenshot(path=str(shots / "screenshot-workers.png"), full_page=True)
    assert not _csp_problems(page), page.console_messages


def test_delete_button_asks_first_then_deletes_the_job(e2e_stack, page, flute_image):
    page.goto(e2e_stack.base_url + "/")
    page.set_input_files("#image", str(flute_image))
    page.fill("#iterations", "3")
    page.click("#submit")
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    assert _wait_status(page, job_id, e2e_stack) == "succeeded"
    page.reload()

    questions: list[str] = []

    def answer(dialog, accept: bool) -> None:
        questions.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.once("dialog", lambda dialog: answer(dialog, accept=False))
    page.click("#delete")
    page.wait_for_timeout(300)
    assert questions and questions[0].startswith("Delete this job")
    assert page.url.endswith(job_id)  # dismissed: nothing sent
    assert page.request.get(f"{e2e_stack.base_url}/api/v1/jobs/{job_id}").status == 200

    page.once("dialog", lambda dialog: answer(dialog, accept=True))
    page.click("#delete")
    page.wait_for_url(re.compile(r".*/jobs$"))
    assert "deleted" in page.content()
    assert page.request.get(f"{e2e_stack.base_url}/api/v1/jobs/{job_id}").status == 404
    assert _csp_problems(page) == []
