"""Quotas on work (issue 15) on the real stack: the Flask app in front of real
Redis, a real worker and SQLite / PostgreSQL.

* ``EBB_MAX_QUEUED_PER_OWNER``: the submission past the cap is a 429
  ``too_many_jobs`` with ``Retry-After``; a finished job frees a place.
* ``EBB_WORK_BUDGET``: jobs are accepted up to exactly the budget, the next
  is a 429 ``work_budget_exceeded`` whose ``Retry-After`` and message say
  when it refills; rejected (4xx) requests spend nothing.
* ``GET /api/v1/usage`` and the job JSON show the usage and the limits.

Other tests share the database (every job there belongs to ``default`` in
single-user mode), so each test reads the usage first and sets its limits
relative to it.
"""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image

from web.testing import delete_keys

from .conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAST = {"iterations": "12", "input_size": "96", "mask_size": "8"}


def _png(seed: int) -> bytes:
    pixels = (np.random.RandomState(seed).rand(40, 56, 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _client(stack, monkeypatch, prefix: str | None = None, **env):
    from web import create_app

    prefix = prefix or stack.env["EBB_QUEUE_PREFIX"]
    monkeypatch.setenv("EBB_QUEUE_PREFIX", prefix)
    return create_app({"TESTING": True, "EBB_ENV": {**stack.env, "EBB_QUEUE_PREFIX": prefix, **env}}).test_client()


def _post(client, image: bytes | None = None, **form: str):
    data = {**FAST, **form, "image": (io.BytesIO(image or _png(0)), "x.png")}
    return client.post("/api/v1/jobs", data=data, content_type="multipart/form-data")


def _bad_requests(client) -> None:
    """Three kinds of rejected input: none may count against a quota."""
    assert _post(client, iterations="many").status_code == 400
    assert _post(client, b"not an image").status_code == 400
    assert _post(client, model="no-such-model").status_code == 400


def test_queued_cap_refuses_exactly_past_the_limit(stack, monkeypatch):
    parked = f"{stack.queue_prefix}-parked-{uuid.uuid4().hex[:6]}"  # no worker: jobs stay queued
    probe = _client(stack, monkeypatch, parked)
    base = probe.get("/api/v1/usage").get_json()["active_jobs"]
    client = _client(stack, monkeypatch, parked, EBB_MAX_QUEUED_PER_OWNER=str(base + 3))
    accepted = []
    try:
        for seed in range(3):
            _bad_requests(client)
            response = _post(client, _png(seed))
            assert response.status_code == 202, response.get_json()
            accepted.append(response.get_json()["id"])
        refused = _post(client, _png(9))
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        error = refused.get_json()["error"]
        assert error["code"] == "too_many_jobs"
        assert f"EBB_MAX_QUEUED_PER_OWNER={base + 3}" in error["message"]
        _bad_requests(client)  # bad input is still a 400, not a 429
        usage = client.get("/api/v1/usage").get_json()
        assert (usage["owner"], usage["active_jobs"], usage["max_active_jobs"]) == ("default", base + 3, base + 3)
        job = client.get(f"/api/v1/jobs/{accepted[0]}").get_json()
        assert job["usage"]["active_jobs"] == base + 3
        # a cancelled job frees its place
        assert client.post(f"/api/v1/jobs/{accepted[0]}/cancel").status_code == 200
        again = _post(client, _png(10))
        assert again.status_code == 202
        accepted.append(again.get_json()["id"])
    finally:
        for job_id in accepted:
            client.delete(f"/api/v1/jobs/{job_id}")
        delete_keys(stack.redis_url, parked)


def test_work_budget_429_at_exactly_the_budget_and_bad_requests_spend_nothing(stack, monkeypatch):
    base = _client(stack, monkeypatch).get("/api/v1/usage").get_json()["work_last_hour"]
    budget = base + 5 * 12  # five FAST jobs
    client = _client(stack, monkeypatch, EBB_WORK_BUDGET=str(budget))
    ids = []
    for seed in range(5):
        _bad_requests(client)
        response = _post(client, _png(20 + seed))
        assert response.status_code == 202, response.get_json()
        ids.append(response.get_json()["id"])
    _bad_requests(client)
    refused = _post(client, _png(30))
    assert refused.status_code == 429
    error = refused.get_json()["error"]
    assert error["code"] == "work_budget_exceeded"
    wait = int(refused.headers["Retry-After"])
    assert 1 <= wait <= 3600 and error["retry_after_s"] == wait
    assert error["refills_at"] in error["message"] and f"{budget} mask-iterations" in error["message"]
    # the real worker runs the accepted jobs; the budget stays spent
    for job_id in ids:
        done = wait_for(lambda: (j := client.get(f"/api/v1/jobs/{job_id}").get_json())["status"]
                        in ("succeeded", "failed", "cancelled") and j, 180, 0.2, what=f"job {job_id}")
        assert done["status"] == "succeeded"
    usage = client.get("/api/v1/usage").get_json()
    assert (usage["work_last_hour"], usage["work_budget"], usage["work_left"]) == (budget, budget, 0)
    assert done["usage"] == usage
    assert _post(client, _png(31)).status_code == 429
    # a larger budget admits the next job: the refusals before were not recorded
    roomier = _client(stack, monkeypatch, EBB_WORK_BUDGET=str(budget + 12))
    last = _post(roomier, _png(32))
    assert last.status_code == 202
    ids.append(last.get_json()["id"])
    wait_for(lambda: client.get(f"/api/v1/jobs/{ids[-1]}").get_json()["status"] == "succeeded", 180, 0.2,
             what="the last job")
    for job_id in ids:
        assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
