"""API tokens and the login page (``EBB_API_TOKENS``), against real Redis and SQLite.

Redis database 5 on 127.0.0.1:6379; queues and rate-limit counters use a
prefix unique to this run, and only keys containing it are deleted.
Every test here fails if the protection it names is removed.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import uuid
from pathlib import Path

import pytest

from web.testing import image_bytes, queue_messages
from web.testing import TestApps

REDIS_DB = 5
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PREFIX = f"ebbtest-auth{REDIS_DB}-{uuid.uuid4().hex[:8]}"
MODEL = "efficientnet_lite0"
QUEUE = f"{PREFIX}.{MODEL}"
TOKEN_A = "tok-alpha-0123456789"
TOKEN_B = "tok-beta-9876543210"


APPS = TestApps(REDIS_DB, PREFIX)
_redis, _dispose_engines = APPS.module_fixtures()


def make_app(tmp_path: Path, monkeypatch, **env):
    return APPS.make(tmp_path, monkeypatch, clear=("EBB_API_TOKENS",), **env)

@pytest.fixture
def app(tmp_path, monkeypatch):
    return make_app(tmp_path, monkeypatch, EBB_API_TOKENS=f" {TOKEN_A} , {TOKEN_B} ")


@pytest.fixture
def client(app):
    return app.test_client()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post_job(client, headers=None):
    data = {"image": (io.BytesIO(image_bytes()), "a.png"), "iterations": "5"}
    return client.post("/api/v1/jobs", data=data, content_type="multipart/form-data",
                       headers=headers or {})


def job_rows(app):
    from sqlalchemy import func, select

    from shared.db.models import Job

    with app.extensions["ebb"].session_factory() as db:
        return int(db.scalar(select(func.count()).select_from(Job)))


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html) or re.search(
        r'value="([^"]+)"[^>]*name="csrf_token"', html)
    assert match, html[:2000]
    return match.group(1)


def login(client, token=TOKEN_A, next_=None):
    page = client.get("/login" + (f"?next={next_}" if next_ else ""))
    assert page.status_code == 200
    data = {"csrf_token": csrf_from(page.get_data(as_text=True)), "token": token}
    if next_ is not None:
        data["next"] = next_
    return client.post("/login", data=data)


def assert_401(response, invalid_token: bool = False):
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "unauthorized"
    assert body["error"]["message"]
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer")
    assert ('error="invalid_token"' in challenge) is invalid_token


# --------------------------------------------------------------------------- start-up


def test_open_service_warns_at_startup(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        make_app(tmp_path, monkeypatch)
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and "EBB_API_TOKENS is not set" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]
    assert "open" in warnings[0].getMessage()


def test_no_warning_when_tokens_are_set(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        make_app(tmp_path, monkeypatch, EBB_API_TOKENS=TOKEN_A)
    assert not [r for r in caplog.records if "EBB_API_TOKENS is not set" in r.getMessage()]


def test_open_service_needs_no_credentials(tmp_path, monkeypatch):
    client = make_app(tmp_path, monkeypatch).test_client()
    assert client.get("/api/v1/jobs").status_code == 200
    assert client.get("/").status_code == 200
    assert post_job(client).status_code == 202
    # a made-up token on an open service is simply ignored
    assert client.get("/api/v1/jobs", headers=bearer("whatever")).status_code == 200


# --------------------------------------------------------------------------- API


@pytest.mark.parametrize("method,path", [
    ("get", "/api/v1/jobs"),
    ("get", "/api/v1/models"),
    ("get", f"/api/v1/jobs/{uuid.uuid4()}"),
    ("post", f"/api/v1/jobs/{uuid.uuid4()}/cancel"),
    ("get", f"/api/v1/jobs/{uuid.uuid4()}/artifacts/overlay_png"),
    ("get", "/api/v1/no-such-thing"),
])
def test_api_without_credentials_is_401(client, method, path):
    assert_401(getattr(client, method)(path))


def test_api_with_wrong_or_malformed_token_is_401(client):
    for header in (f"Bearer {TOKEN_A}x", f"Bearer {TOKEN_A[:-1]}", "Bearer ", "Bearer",
                   f"Bearer {TOKEN_A},{TOKEN_B}", "Bearer tök-ünïcode"):
        # each from its own address: five failures from one address lock it out
        assert_401(client.get("/api/v1/jobs", headers={"Authorization": header},
                              environ_base={"REMOTE_ADDR": f"10.9.0.{len(header)}"}),
                   invalid_token=True)
    # another scheme is no bearer token at all
    assert_401(client.get("/api/v1/jobs", headers={"Authorization": f"Basic {TOKEN_A}"}))


def test_api_accepts_every_configured_token(client):
    for token in (TOKEN_A, TOKEN_B):
        response = client.get("/api/v1/jobs", headers=bearer(token))
        assert response.status_code == 200, response.get_data(as_text=True)
    assert client.get("/api/v1/jobs",
                      headers={"Authorization": f"bearer {TOKEN_A}"}).status_code == 200


def test_unauthenticated_submission_stores_and_queues_nothing(app, client):
    assert_401(post_job(client))
    assert_401(post_job(client, headers=bearer("nope")), invalid_token=True)
    assert job_rows(app) == 0
    assert queue_messages(REDIS_URL, QUEUE) == []
    response = post_job(client, headers=bearer(TOKEN_B))
    assert response.status_code == 202, response.get_data(as_text=True)
    assert job_rows(app) == 1
    job_id = response.get_json()["id"]
    # reading it back needs credentials too
    assert_401(client.get(f"/api/v1/jobs/{job_id}"))
    assert_401(client.get(f"/api/v1/jobs/{job_id}/artifacts/mask_png"))
    assert client.get(f"/api/v1/jobs/{job_id}", headers=bearer(TOKEN_A)).status_code == 200


def test_tokens_are_compared_in_constant_time(client, monkeypatch):
    import hmac

    import web.auth

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(web.auth.hmac, "compare_digest", spy)
    assert client.get("/api/v1/jobs", headers=bearer(TOKEN_B)).status_code == 200
    assert len(calls) == 2  # every configured token is compared, no early exit


# --------------------------------------------------------------------------- open endpoints


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/static/css/app.css",
                                  "/static/js/job.js", "/api/v1/openapi.json", "/login"])
def test_probes_static_files_and_login_stay_open(client, path):
    response = client.get(path)
    assert response.status_code == 200, (path, response.status_code)


# --------------------------------------------------------------------------- pages


@pytest.mark.parametrize("path", ["/", "/jobs", "/jobs?page=2", f"/jobs/{uuid.uuid4()}",
                                  f"/jobs/{uuid.uuid4()}/image",
                                  f"/jobs/{uuid.uuid4()}/thumbnail", "/nope"])
def test_pages_redirect_to_login_with_next(client, path):
    from urllib.parse import parse_qs, urlsplit

    response = client.get(path)
    assert response.status_code == 302
    location = urlsplit(response.headers["Location"])
    assert location.path == "/login"
    assert parse_qs(location.query)["next"] == [path]


def test_form_post_without_login_redirects_and_stores_nothing(app, client):
    data = {"image": (io.BytesIO(image_bytes()), "a.png")}
    response = client.post("/", data=data, content_type="multipart/form-data")
    assert response.status_code == 303
    assert response.headers["Location"].startswith("/login")
    assert job_rows(app) == 0


def test_bearer_token_also_opens_pages(client):
    assert client.get("/jobs", headers=bearer(TOKEN_A)).status_code == 200


def test_login_page_logs_in_and_session_can_use_the_api(app, client):
    page = client.get("/login?next=/jobs")
    html = page.get_data(as_text=True)
    assert 'type="password"' in html and 'name="csrf_token"' in html

    response = login(client, TOKEN_B, next_="/jobs?page=1")
    assert response.status_code == 303
    assert response.headers["Location"] == "/jobs?page=1"
    assert client.get("/").status_code == 200
    assert client.get("/jobs").status_code == 200
    assert 'id="logout"' in client.get("/jobs").get_data(as_text=True)
    # the job page's JS polls the API with the session cookie
    assert client.get("/api/v1/jobs").status_code == 200

    # a session changing state through the API must show the CSRF token
    refused = post_job(client)
    assert refused.status_code == 400
    assert refused.get_json()["error"]["code"] == "csrf_failed"
    assert job_rows(app) == 0
    token = csrf_from(client.get("/").get_data(as_text=True))
    accepted = post_job(client, headers={"X-CSRFToken": token})
    assert accepted.status_code == 202, accepted.get_data(as_text=True)

    # the upload form works for a logged-in browser
    form = client.get("/").get_data(as_text=True)
    response = client.post("/", data={"csrf_token": csrf_from(form), "iterations": "5",
                                      "image": (io.BytesIO(image_bytes()), "b.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 303 and response.headers["Location"].startswith("/jobs/")
    assert job_rows(app) == 2


def test_wrong_token_does_not_log_in(client):
    response = login(client, "not-a-token", next_="/jobs")
    assert response.status_code == 401
    assert "not valid" in response.get_data(as_text=True)
    assert client.get("/jobs").status_code == 302
    assert_401(client.get("/api/v1/jobs"))


def test_login_needs_the_csrf_token(client):
    response = client.post("/login", data={"token": TOKEN_A})
    assert response.status_code == 400
    assert client.get("/jobs").status_code == 302


def test_logout_ends_the_session(client):
    assert login(client).status_code == 303
    assert client.get("/jobs").status_code == 200
    html = client.get("/logout").get_data(as_text=True)
    response = client.post("/logout", data={"csrf_token": csrf_from(html)})
    assert response.status_code == 303
    assert client.get("/jobs").status_code == 302
    assert_401(client.get("/api/v1/jobs"))


def test_logout_needs_the_csrf_token(client):
    assert login(client).status_code == 303
    assert client.post("/logout").status_code == 400
    assert client.get("/jobs").status_code == 200


def test_session_of_a_removed_token_no_longer_works(app, client):
    assert login(client, TOKEN_A).status_code == 303
    assert client.get("/jobs").status_code == 200
    state = app.extensions["ebb"]
    state.settings = dataclasses.replace(state.settings, api_tokens=(TOKEN_B,))
    assert client.get("/jobs").status_code == 302
    assert_401(client.get("/api/v1/jobs"))


def test_forged_session_flag_is_refused(app, client):
    """The session is signed: a cookie claiming a login without the key is ignored."""
    from flask.sessions import SecureCookieSessionInterface

    other = app.test_client()
    forger = SecureCookieSessionInterface().get_signing_serializer(
        type("A", (), {"secret_key": "another-key", "config": app.config})())
    other.set_cookie("session", forger.dumps({"ebb_auth": "x" * 64}), domain="localhost")
    assert other.get("/jobs").status_code == 302


@pytest.mark.parametrize("target,expected", [
    ("/jobs?page=2", "/jobs?page=2"),
    ("/jobs/123", "/jobs/123"),
    ("https://evil.example/", "/"),
    ("//evil.example/x", "/"),
    ("/\\evil.example", "/"),
    ("\\\\evil.example", "/"),
    ("javascript:alert(1)", "/"),
    ("jobs", "/"),
    ("/login", "/"),
    ("/ok\r\nSet-Cookie: x=1", "/"),
    ("", "/"),
])
def test_login_redirects_only_to_local_paths(client, target, expected):
    response = login(client, TOKEN_A, next_=target)
    assert response.status_code == 303
    assert response.headers["Location"] == expected


def test_login_when_no_tokens_configured_just_redirects(tmp_path, monkeypatch):
    client = make_app(tmp_path, monkeypatch).test_client()
    response = client.get("/login?next=/jobs")
    assert response.status_code == 303
    assert response.headers["Location"] == "/jobs"


# --------------------------------------------------------------------------- OpenAPI


def test_openapi_documents_the_bearer_scheme(client, tmp_path, monkeypatch):
    doc = client.get("/api/v1/openapi.json").get_json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert doc["security"] == [{"bearer": []}, {"session": []}]
    assert doc["paths"]["/openapi.json"]["get"]["security"] == []
    assert "401" in doc["paths"]["/jobs"]["post"]["responses"]
    assert "429" in doc["paths"]["/jobs"]["post"]["responses"]
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(doc)

    open_doc = make_app(tmp_path / "open", monkeypatch).test_client().get(
        "/api/v1/openapi.json").get_json()
    assert "bearer" in open_doc["components"]["securitySchemes"]
    assert "security" not in open_doc  # an open service requires nothing
    validator.validate(open_doc)


def test_secure_cookies_behind_https(tmp_path, monkeypatch):
    plain = make_app(tmp_path / "a", monkeypatch, EBB_API_TOKENS=TOKEN_A)
    cookie = login(plain.test_client(), TOKEN_A, next_="/jobs").headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    secure = make_app(tmp_path / "b", monkeypatch, EBB_API_TOKENS=TOKEN_A, EBB_SECURE_COOKIES="1")
    response = login(secure.test_client(), TOKEN_A, next_="/jobs")
    assert response.status_code == 303 and "; Secure" in response.headers["Set-Cookie"]
    with pytest.raises(ValueError, match="EBB_SECURE_COOKIES must be 1 or 0"):
        make_app(tmp_path / "c", monkeypatch, EBB_SECURE_COOKIES="maybe")
