"""End to end in a real browser: upload, watch the live progress, see the result.

Also saves ``docs/screenshot-form.png``, ``docs/screenshot-running.png`` and
``docs/screenshot-result.png``.
"""

from __future__ import annotations

import re
import time

import pytest

from .conftest import DOCS

pytestmark = pytest.mark.e2e

ITERATIONS = 40
JOB_TIMEOUT_S = 240


def _csp_problems(page) -> list[str]:
    return [m for m in page.console_messages
            if "Content Security Policy" in m or "Refused to" in m or m.startswith("pageerror")]


def test_upload_watch_progress_and_see_results(e2e_stack, page, flute_image):
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
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "screenshot-form.png"), full_page=True)
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
            page.screenshot(path=str(DOCS / "screenshot-running.png"), full_page=True)
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
    assert page.locator(".downloads a").count() == 7
    page.screenshot(path=str(DOCS / "screenshot-result.png"), full_page=True)

    # The job list shows it with a thumbnail that renders.
    page.goto(e2e_stack.base_url + "/jobs")
    thumb = page.locator(f'a[href="/jobs/{job_id}"] img.thumb')
    thumb.wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
    )
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
