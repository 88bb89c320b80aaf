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

import pytest

from web.testing import delete_keys

from .conftest import noise_png, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAST = {"iterations": "12", "input_size": "96", "mask_size": "8"}


def _client(stack, monkeypatch, prefix: str | None = None, **env):
    from web import create_app

    prefix = prefix or stack.env["EBB_QUEUE_PREFIX"]
    monkeypatch.setenv("EBB_QUEUE_PREFIX", prefix)
    return create_app({"TESTING": True, "EBB_ENV": {**stack.env, "EBB_QUEUE_PREFIX": prefix, **env}}).test_client()


def _post(client, image: bytes | None = None, **form: str):
    data = {**FAST, **form, "image": (io.BytesIO(image or noise_png(seed=0)), "x.png")}
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
            response = _post(client, noise_png(seed=seed))
            assert response.status_code == 202, response.get_json()
            accepted.append(response.get_json()["id"])
        refused = _post(client, noise_png(seed=9))
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
        again = _post(client, noise_png(seed=10))
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
        response = _post(client, noise_png(seed=20 + seed))
        assert response.status_code == 202, response.get_json()
        ids.append(response.get_json()["id"])
    _bad_requests(client)
    refused = _post(client, noise_png(seed=30))
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
    assert _post(client, noise_png(seed=31)).status_code == 429
    # a larger budget admits the next job: the refusals before were not recorded
    roomier = _client(stack, monkeypatch, EBB_WORK_BUDGET=str(budget + 12))
    last = _post(roomier, noise_png(seed=32))
    assert last.status_code == 202
    ids.append(last.get_json()["id"])
    wait_for(lambda: client.get(f"/api/v1/jobs/{ids[-1]}").get_json()["status"] == "succeeded", 180, 0.2,
             what="the last job")
    for job_id in ids:
        assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204


def test_quotas_are_per_owner_and_delete_is_for_the_owner_or_an_admin(stack, monkeypatch):
    """Two owners and an admin (``EBB_API_TOKENS``): each owner has their own
    queued cap and work budget; another owner's DELETE is a 404 as for a
    missing job; the admin may delete anyone's job."""
    tag = uuid.uuid4().hex[:6]
    tok_a, tok_b, tok_ops = (f"quota-{n}-{uuid.uuid4().hex}" for n in ("a", "b", "ops"))
    lab_a, lab_b = f"qa-{tag}", f"qb-{tag}"
    parked = f"{stack.queue_prefix}-parked-{tag}"  # no worker: jobs stay queued
    client = _client(stack, monkeypatch, parked, EBB_API_TOKENS=f"{lab_a}:{tok_a},{lab_b}:{tok_b},ops-{tag}:{tok_ops}:admin",
                     EBB_MAX_QUEUED_PER_OWNER="2", EBB_WORK_BUDGET="24")

    def as_(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def post(token: str, seed: int):
        data = {**FAST, "image": (io.BytesIO(noise_png(seed=seed)), "x.png")}
        return client.post("/api/v1/jobs", data=data, content_type="multipart/form-data", headers=as_(token))

    try:
        a1, a2 = (post(tok_a, 40 + i) for i in range(2))
        assert a1.status_code == a2.status_code == 202
        a1, a2 = a1.get_json()["id"], a2.get_json()["id"]
        refused = post(tok_a, 42)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.get_json()["error"]["code"] == "too_many_jobs"
        assert repr(lab_a) in refused.get_json()["error"]["message"]
        # lab-b has its own quotas
        b1 = post(tok_b, 43)
        assert b1.status_code == 202
        b1 = b1.get_json()["id"]
        usage_a = client.get("/api/v1/usage", headers=as_(tok_a)).get_json()
        usage_b = client.get("/api/v1/usage", headers=as_(tok_b)).get_json()
        assert (usage_a["owner"], usage_a["active_jobs"], usage_a["work_last_hour"]) == (lab_a, 2, 24)
        assert (usage_b["owner"], usage_b["active_jobs"], usage_b["work_last_hour"]) == (lab_b, 1, 12)
        assert client.get(f"/api/v1/jobs/{b1}", headers=as_(tok_b)).get_json()["usage"] == usage_b

        # another owner's DELETE answers as for a missing job, and deletes nothing
        other = client.delete(f"/api/v1/jobs/{a1}", headers=as_(tok_b))
        missing = client.delete(f"/api/v1/jobs/{uuid.uuid4()}", headers=as_(tok_b))
        assert other.status_code == missing.status_code == 404
        assert client.get(f"/api/v1/jobs/{a1}", headers=as_(tok_a)).status_code == 200
        # the owner deletes a1: a place frees up, the hour's work stays spent
        assert client.delete(f"/api/v1/jobs/{a1}", headers=as_(tok_a)).status_code == 204
        spent = post(tok_a, 44)
        assert spent.status_code == 429 and spent.get_json()["error"]["code"] == "work_budget_exceeded"
        assert post(tok_b, 45).status_code == 202  # lab-b: 24 of its 24
        # the admin deletes anyone's job
        assert client.delete(f"/api/v1/jobs/{a2}", headers=as_(tok_ops)).status_code == 204
        assert client.delete(f"/api/v1/jobs/{b1}", headers=as_(tok_ops)).status_code == 204
        assert client.get(f"/api/v1/jobs/{b1}", headers=as_(tok_b)).status_code == 404
    finally:
        for job in client.get("/api/v1/jobs?limit=100", headers=as_(tok_ops)).get_json()["jobs"]:
            if job["usage"]["owner"] in (lab_a, lab_b):
                client.delete(f"/api/v1/jobs/{job['id']}", headers=as_(tok_ops))
        delete_keys(stack.redis_url, parked)
