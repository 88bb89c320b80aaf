"""Rate limits on job submission (Flask-Limiter, counters in the real Redis).

Redis database 6 on 127.0.0.1:6379; queues and counters use a prefix unique to
this run (counters: ``<prefix>-ratelimit``), and only keys containing it are
deleted. The limit is tiny (``2/minute``) so a test hits it at once; fixed
windows start at a client's first hit, so three quick requests always see the
third refused.
"""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path

import pytest

from web.testing import DEAD_REDIS_URL, image_bytes, queue_messages
from web.testing import TestApps

REDIS_DB = 6
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PREFIX = f"ebbtest-rl{REDIS_DB}-{uuid.uuid4().hex[:8]}"
MODEL = "efficientnet_lite0"
QUEUE = f"{PREFIX}.{MODEL}"
LIMIT = "2/minute"


APPS = TestApps(REDIS_DB, PREFIX)
_redis, _dispose_engines = APPS.module_fixtures()


def make_app(tmp_path: Path, monkeypatch, reset: bool = True, **env):
    env.setdefault("EBB_RATE_LIMIT", LIMIT)
    return APPS.make(tmp_path, monkeypatch, reset=reset,
                     clear=("EBB_API_TOKENS", "EBB_TRUSTED_PROXIES", "EBB_RATE_LIMIT_PREFIX"), **env)

@pytest.fixture
def app(tmp_path, monkeypatch):
    return make_app(tmp_path, monkeypatch)


@pytest.fixture
def client(app):
    return app.test_client()


def post_job(client, headers=None, **kwargs):
    data = {"image": (io.BytesIO(image_bytes()), "a.png"), "iterations": "5"}
    return client.post("/api/v1/jobs", data=data, content_type="multipart/form-data",
                       headers=headers or {}, **kwargs)


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html)
    assert match, html[:1000]
    return match.group(1)


def post_form(client):
    token = csrf_from(client.get("/").get_data(as_text=True))
    data = {"csrf_token": token, "iterations": "5",
            "image": (io.BytesIO(image_bytes()), "a.png")}
    return client.post("/", data=data, content_type="multipart/form-data")


def job_rows(app) -> int:
    from sqlalchemy import func, select

    from shared.db.models import Job

    with app.extensions["ebb"].session_factory() as db:
        return int(db.scalar(select(func.count()).select_from(Job)))


def assert_429(response) -> int:
    assert response.status_code == 429, response.get_data(as_text=True)
    retry = int(response.headers["Retry-After"])
    assert 1 <= retry <= 60
    return retry


def counter_keys() -> list[bytes]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        return list(client.scan_iter(match=f"{PREFIX}-ratelimit*"))
    finally:
        client.close()


# --------------------------------------------------------------------------- API


def test_api_submissions_beyond_the_limit_get_429_json(app, client):
    for _ in range(2):
        response = post_job(client)
        assert response.status_code == 202, response.get_data(as_text=True)
        assert response.headers["X-RateLimit-Limit"] == "2"
        assert "Retry-After" not in response.headers
    refused = post_job(client)
    assert_429(refused)
    assert refused.is_json
    error = refused.get_json()["error"]
    assert error["code"] == "too_many_requests"
    assert "2 per 1 minute" in error["message"]
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    # the refused request stored and queued nothing
    assert job_rows(app) == 2
    assert len(queue_messages(REDIS_URL, QUEUE)) == 2
    # reading stays allowed
    assert client.get("/api/v1/jobs").status_code == 200


def test_invalid_submissions_count_too(client):
    for _ in range(2):
        bad = client.post("/api/v1/jobs", data={"image": (io.BytesIO(b"junk"), "a.png")},
                          content_type="multipart/form-data")
        assert bad.status_code == 400
    assert_429(post_job(client))


def test_counters_live_in_redis_and_are_shared_between_processes(tmp_path, monkeypatch):
    """Two app instances (two gunicorn workers) share one budget through Redis."""
    first = make_app(tmp_path / "one", monkeypatch)
    assert post_job(first.test_client()).status_code == 202
    assert post_job(first.test_client()).status_code == 202
    assert counter_keys(), "no rate-limit counter in Redis"
    second = make_app(tmp_path / "two", monkeypatch, reset=False)
    assert_429(post_job(second.test_client()))


def test_limit_is_per_client_address(client):
    for _ in range(2):
        assert post_job(client).status_code == 202
    assert_429(post_job(client))
    other = {"REMOTE_ADDR": "10.1.2.3"}
    assert post_job(client, environ_base=other).status_code == 202


def test_forwarded_for_is_ignored_without_trusted_proxies(client):
    for i in range(2):
        assert post_job(client, headers={"X-Forwarded-For": f"10.9.0.{i}"}).status_code == 202
    assert_429(post_job(client, headers={"X-Forwarded-For": "10.9.0.99"}))


def test_forwarded_for_identifies_clients_behind_trusted_proxies(tmp_path, monkeypatch):
    client = make_app(tmp_path, monkeypatch, EBB_TRUSTED_PROXIES="1").test_client()
    for _ in range(2):
        assert post_job(client, headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 202
    assert_429(post_job(client, headers={"X-Forwarded-For": "203.0.113.7"}))
    # same proxy, another client behind it: its own budget
    assert post_job(client, headers={"X-Forwarded-For": "203.0.113.8"}).status_code == 202
    # only the last hop (added by the one trusted proxy) counts: a spoofed first hop is useless
    assert_429(post_job(client, headers={"X-Forwarded-For": "1.1.1.1, 203.0.113.7"}))


def test_limit_is_per_owner(tmp_path, monkeypatch):
    client = make_app(tmp_path, monkeypatch,
                      EBB_API_TOKENS="one:tok-one-xxxx,two:tok-two-yyyy,one:tok-one-bis").test_client()
    one = {"Authorization": "Bearer tok-one-xxxx"}
    two = {"Authorization": "Bearer tok-two-yyyy"}
    for _ in range(2):
        assert post_job(client, headers=one).status_code == 202
    assert_429(post_job(client, headers=one))
    # another token of the same owner shares the budget
    assert_429(post_job(client, headers={"Authorization": "Bearer tok-one-bis"}))
    assert post_job(client, headers=two).status_code == 202  # same address, other owner


def test_made_up_tokens_do_not_buy_a_fresh_budget_on_an_open_service(client):
    for i in range(2):
        assert post_job(client, headers={"Authorization": f"Bearer x{i}"}).status_code == 202
    assert_429(post_job(client, headers={"Authorization": "Bearer x-new"}))


# --------------------------------------------------------------------------- form


def test_form_and_api_share_the_budget_and_the_form_gets_an_html_429(app, client):
    assert post_job(client).status_code == 202
    response = post_form(client)
    assert response.status_code == 303, response.get_data(as_text=True)
    refused = post_form(client)
    assert_429(refused)
    assert refused.mimetype == "text/html"
    html = refused.get_data(as_text=True)
    assert "Too many requests" in html and 'id="job-form"' in html
    assert job_rows(app) == 2
    assert_429(post_job(client))


# --------------------------------------------------------------------------- login


def test_failed_logins_are_limited(tmp_path, monkeypatch):
    client = make_app(tmp_path, monkeypatch, EBB_API_TOKENS="tok-good-zzzz").test_client()

    def attempt(token):
        token_field = csrf_from(client.get("/login").get_data(as_text=True))
        return client.post("/login", data={"csrf_token": token_field, "token": token})

    assert attempt("tok-good-zzzz").status_code == 303  # successes do not count
    client.post("/logout", data={"csrf_token": csrf_from(client.get("/logout").get_data(
        as_text=True))})
    assert attempt("wrong-1").status_code == 401
    assert attempt("wrong-2").status_code == 401
    assert_429(attempt("tok-good-zzzz"))


# --------------------------------------------------------------------------- failure modes


def test_redis_down_never_turns_submissions_into_500(tmp_path, monkeypatch):
    """Limiter storage and broker both down: the usual 503, never a 500."""
    app = make_app(tmp_path, monkeypatch, REDIS_URL=DEAD_REDIS_URL, EBB_RATE_LIMIT="3/minute")
    client = app.test_client()
    for _ in range(3):
        response = post_job(client)
        assert response.status_code == 503, response.get_data(as_text=True)
        assert response.get_json()["error"]["code"] == "queue_unavailable"
    form = post_form(client)
    assert form.status_code in (503, 429)  # in-memory fallback keeps counting
    # the in-memory fallback still enforces the limit in this process
    assert_429(post_job(client))
    assert job_rows(app) == 0


def test_rate_limit_off(tmp_path, monkeypatch):
    client = make_app(tmp_path, monkeypatch, EBB_RATE_LIMIT="off").test_client()
    for _ in range(3):
        response = post_job(client)
        assert response.status_code == 202
        assert "X-RateLimit-Limit" not in response.headers


def test_bad_rate_limit_fails_at_start_up(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="EBB_RATE_LIMIT"):
        make_app(tmp_path, monkeypatch, EBB_RATE_LIMIT="lots")


def test_default_limit(tmp_path, monkeypatch):
    from shared.settings import load

    assert load({}).rate_limit == "30/minute;500/hour"
    assert load({"EBB_RATE_LIMIT": " "}).rate_limit == "30/minute;500/hour"
    assert load({"EBB_QUEUE_PREFIX": "q"}).rate_limit_prefix == "q-ratelimit"
