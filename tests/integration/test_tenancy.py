"""Two owners and an admin on the real stack (real worker; SQLite and PostgreSQL).

The web app (Flask test client) uses named tokens ``lab-a``, ``lab-b`` (from
``EBB_API_TOKENS``), ``ops`` (admin) and ``lab-c`` (made with
``ebb tokens create``, stored hashed in the database); a real worker runs the
jobs. Each owner sees and touches only their own jobs through every route;
another owner's job answers exactly as a missing one (GET, cancel and DELETE);
the admin sees and deletes all.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
from typing import Iterator

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(600)]

FAST_FORM = {"iterations": "12", "input_size": "96", "mask_size": "8"}
TOK_A = "tenancy-lab-a-" + uuid.uuid4().hex
TOK_B = "tenancy-lab-b-" + uuid.uuid4().hex
TOK_OPS = "tenancy-ops-" + uuid.uuid4().hex


@pytest.fixture
def client(stack, monkeypatch):
    from web import create_app

    monkeypatch.setenv("EBB_QUEUE_PREFIX", stack.env["EBB_QUEUE_PREFIX"])
    env = {**stack.env, "EBB_API_TOKENS": f"lab-a:{TOK_A},lab-b:{TOK_B},ops:{TOK_OPS}:admin",
           "EBB_RATE_LIMIT": "1000/minute"}
    app = create_app({"TESTING": True, "EBB_ENV": env})
    return app.test_client()


@pytest.fixture
def token_c(stack, client) -> Iterator[str]:
    """A database token for ``lab-c``, made by the real CLI (``ebb tokens create``);
    removed afterwards: a database token turns authentication on, and the
    stack's database is shared with other test modules that run open."""
    out = subprocess.run([sys.executable, "-m", "shared.cli", "tokens", "create", "lab-c",
                          "--url", stack.database_url], capture_output=True, text=True,
                         timeout=120, env=stack.env)
    assert out.returncode == 0, out.stderr
    yield out.stdout.strip()
    from sqlalchemy import delete

    from shared.db.models import ApiToken
    from shared.db.session import session_scope

    with session_scope(stack.database_url) as session:
        session.execute(delete(ApiToken).where(ApiToken.name == "lab-c"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(client, token: str, image: bytes, **form: str) -> dict:
    data = {**FAST_FORM, **form, "image": (io.BytesIO(image), "flute.png")}
    response = client.post("/api/v1/jobs", data=data, content_type="multipart/form-data",
                           headers=bearer(token))
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


def poll(client, token: str, job_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        response = client.get(f"/api/v1/jobs/{job_id}", headers=bearer(token))
        assert response.status_code == 200, response.get_data(as_text=True)
        body = response.get_json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished after {timeout} s (last: {body})")


def same_as_missing(client, path: str, job_id: str, token: str, method: str = "get") -> None:
    """``path`` for ``job_id`` answers ``token`` exactly as for a job that does not exist."""
    missing = str(uuid.uuid4())
    call = getattr(client, method)
    other = call(path.format(id=job_id), headers=bearer(token))
    absent = call(path.format(id=missing), headers=bearer(token))
    assert other.status_code == absent.status_code == 404, (path, other.status_code)
    assert other.headers.get("Content-Type") == absent.headers.get("Content-Type"), path
    assert other.get_data(as_text=True).replace(job_id, "ID") == \
        absent.get_data(as_text=True).replace(missing, "ID"), path


def test_two_owners_and_an_admin_through_every_route(client, token_c, image_bytes):
    a = submit(client, TOK_A, image_bytes)
    b = submit(client, TOK_B, image_bytes)  # the same upload: shared on disk, not in access
    c = submit(client, token_c, image_bytes)
    assert (a["owner"], b["owner"], c["owner"]) == ("lab-a", "lab-b", "lab-c")
    done_a, done_b, done_c = (poll(client, t, j["id"]) for t, j in
                              ((TOK_A, a), (TOK_B, b), (token_c, c)))
    for done in (done_a, done_b, done_c):
        assert done["status"] == "succeeded", done["error"]

    def listed(token: str) -> set[str]:
        response = client.get("/api/v1/jobs?limit=100", headers=bearer(token))
        assert response.status_code == 200
        return {job["id"] for job in response.get_json()["jobs"]}

    assert listed(TOK_A) == {a["id"]}
    assert listed(TOK_B) == {b["id"]}
    assert listed(token_c) == {c["id"]}
    assert listed(TOK_OPS) >= {a["id"], b["id"], c["id"]}

    artifact = next(url for url in done_a["artifacts"].values() if url)
    routes = ["/api/v1/jobs/{id}", "/jobs/{id}", "/jobs/{id}/image", "/jobs/{id}/thumbnail",
              artifact.replace(a["id"], "{id}"),
              "/api/v1/jobs/{id}/results/0/artifacts/overlay_png"]
    for route in routes:
        for token in (TOK_A, TOK_OPS):  # the owner and the admin
            response = client.get(route.format(id=a["id"]), headers=bearer(token))
            assert response.status_code == 200, (route, token[:12])
            assert response.headers["Cache-Control"] == "private, no-store", route
        for token in (TOK_B, token_c):  # the others: as if it did not exist
            same_as_missing(client, route, a["id"], token)

    for token, mine, theirs in ((TOK_B, b, a), (TOK_A, a, b)):
        page = client.get("/jobs", headers=bearer(token)).get_data(as_text=True)
        assert mine["id"] in page and theirs["id"] not in page

    # cancel: another owner's finished job is a 404 like a missing one; the
    # owner and the admin get the honest 409 (already succeeded)
    same_as_missing(client, "/api/v1/jobs/{id}/cancel", a["id"], TOK_B, method="post")
    assert client.post(f"/api/v1/jobs/{a['id']}/cancel", headers=bearer(TOK_A)).status_code == 409
    assert client.post(f"/api/v1/jobs/{a['id']}/cancel", headers=bearer(TOK_OPS)).status_code == 409

    # delete: the same 404 for another owner (the job and its files stay); the
    # owner and the admin may delete
    same_as_missing(client, "/api/v1/jobs/{id}", a["id"], TOK_B, method="delete")
    same_as_missing(client, "/api/v1/jobs/{id}", a["id"], token_c, method="delete")
    assert client.get(artifact, headers=bearer(TOK_A)).status_code == 200
    assert client.delete(f"/api/v1/jobs/{a['id']}", headers=bearer(TOK_A)).status_code == 204
    assert client.delete(f"/api/v1/jobs/{c['id']}", headers=bearer(TOK_OPS)).status_code == 204
    assert listed(TOK_A) == set() and listed(token_c) == set()
    # b shared a's upload: it is still served in full to its owner
    assert client.get(f"/jobs/{b['id']}/image", headers=bearer(TOK_B)).status_code == 200
    assert poll(client, TOK_B, b["id"])["status"] == "succeeded"


def test_cancel_of_another_owners_running_job_is_refused(client, image_bytes):
    job = submit(client, TOK_A, image_bytes, iterations="1500")
    refused = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=bearer(TOK_B))
    assert refused.status_code == 404
    assert json.loads(refused.get_data())["error"]["code"] == "not_found"
    # the admin may cancel it
    response = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=bearer(TOK_OPS))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert poll(client, TOK_A, job["id"])["status"] == "cancelled"
