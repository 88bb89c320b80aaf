"""Owners (named tokens), isolation, database tokens, server-side sessions,
the auth-failure lockout and the caching of user content; real Redis and SQLite.

Redis database 12 on 127.0.0.1:6379 with a prefix unique to this run.
Every test here fails if the protection it names is removed.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from pathlib import Path

import pytest

from web.testing import TestApps, image_bytes, write_result_files

REDIS_DB = 12
PREFIX = f"ebbtest-owners{REDIS_DB}-{uuid.uuid4().hex[:8]}"
TOK_A = "tok-lab-a-0123456789"
TOK_B = "tok-lab-b-9876543210"
TOK_OPS = "tok-ops-5555555555"
TOKENS = f"lab-a:{TOK_A},lab-b:{TOK_B},ops:{TOK_OPS}:admin"

APPS = TestApps(REDIS_DB, PREFIX)
_redis, _dispose_engines = APPS.module_fixtures()


def make_app(tmp_path: Path, monkeypatch, **env):
    return APPS.make(tmp_path, monkeypatch, clear=("EBB_API_TOKENS", "EBB_SESSION_HOURS"), **env)


@pytest.fixture
def app(tmp_path, monkeypatch):
    return make_app(tmp_path, monkeypatch, EBB_API_TOKENS=TOKENS)


@pytest.fixture
def client(app):
    return app.test_client()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post_job(client, token: str | None, **extra):
    data = {"image": (io.BytesIO(image_bytes()), "a.png"), "iterations": "5"}
    headers = {**(bearer(token) if token else {}), **extra}
    response = client.post("/api/v1/jobs", data=data, content_type="multipart/form-data",
                           headers=headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html) or re.search(
        r'value="([^"]+)"[^>]*name="csrf_token"', html)
    assert match, html[:2000]
    return match.group(1)


def login(client, token: str):
    page = client.get("/login")
    return client.post("/login", data={"csrf_token": csrf_from(page.get_data(as_text=True)),
                                       "token": token})


def logout(client):
    html = client.get("/logout").get_data(as_text=True)
    return client.post("/logout", data={"csrf_token": csrf_from(html)})


# --------------------------------------------------------------------------- parsing


def test_token_entries_are_parsed_with_names_and_admin_flag():
    from shared.settings import TokenEntry, parse_api_tokens

    assert parse_api_tokens(("bare-token", "lab-a:ta", "ops:to:admin", "x.y@z-1:tz:ADMIN")) == (
        TokenEntry("default", "bare-token", False),
        TokenEntry("lab-a", "ta", False),
        TokenEntry("ops", "to", True),
        TokenEntry("x.y@z-1", "tz", True),
    )


@pytest.mark.parametrize("raw", ["lab a:tok", ":tok", "lab:", "a:b:c", "a:b:admin:x",
                                 "a:same,b:same", "-lab:tok", "x" * 65 + ":tok"])
def test_malformed_token_entries_fail_at_start_up(raw):
    from shared.settings import load

    with pytest.raises(ValueError, match="EBB_API_TOKENS"):
        load({"EBB_API_TOKENS": raw})


def test_session_hours_default_and_validation():
    from shared.settings import DEFAULT_SESSION_HOURS, load

    assert load({}).session_hours == DEFAULT_SESSION_HOURS == 12.0
    assert load({"EBB_SESSION_HOURS": "0.5"}).session_hours == 0.5
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ValueError, match="EBB_SESSION_HOURS"):
            load({"EBB_SESSION_HOURS": bad})


# --------------------------------------------------------------------------- owners


def test_jobs_record_their_owner_and_bare_tokens_are_default(tmp_path, monkeypatch):
    client = make_app(tmp_path, monkeypatch, EBB_API_TOKENS=f"bare-token-1234,{TOKENS}").test_client()
    assert post_job(client, TOK_A)["owner"] == "lab-a"
    assert post_job(client, TOK_OPS)["owner"] == "ops"
    assert post_job(client, "bare-token-1234")["owner"] == "default"


def test_single_user_mode_is_unchanged(tmp_path, monkeypatch):
    client = make_app(tmp_path, monkeypatch).test_client()
    job = post_job(client, None)
    assert job["owner"] == "default"
    assert client.get(f"/api/v1/jobs/{job['id']}").status_code == 200
    listed = client.get("/api/v1/jobs").get_json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]
    # without auth, uploads keep their long public caching
    for path in (f"/jobs/{job['id']}/thumbnail", f"/jobs/{job['id']}/image"):
        response = client.get(path)
        assert response.status_code == 200
        assert {"public", "max-age=86400"} <= {
            v.strip() for v in response.headers["Cache-Control"].split(",")}, path


def test_existing_jobs_belong_to_default_after_the_migration(tmp_path):
    from sqlalchemy import text

    from shared.db.migrations import upgrade_database
    from shared.db.session import get_engine

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    upgrade_database(url, "0004")
    with get_engine(url).begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, status, model, config, image_sha256, image_width, image_height, "
            "image_filename, progress_iteration, progress_total, cancel_requested, created_at, attempts) "
            "VALUES ('0123456789abcdef0123456789abcdef', 'succeeded', 'm', '{}', 'x', 1, 1, 'f', 0, 1, 0, "
            "'2024-01-01 00:00:00', 0)"))
    upgrade_database(url, force=True)
    with get_engine(url).connect() as conn:
        assert conn.execute(text("SELECT owner FROM jobs")).scalar_one() == "default"


def test_tokens_sharing_a_name_are_one_owner(tmp_path, monkeypatch):
    client = make_app(tmp_path, monkeypatch,
                      EBB_API_TOKENS=f"{TOKENS},lab-a:tok-lab-a-rotated").test_client()
    job = post_job(client, TOK_A)
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=bearer("tok-lab-a-rotated")).status_code == 200


def _finish(app, job_id: str) -> None:
    """Mark a job succeeded with artifacts on disk, as a worker would."""
    from sqlalchemy import update

    from shared.db.models import Job, utcnow

    st = app.extensions["ebb"]
    write_result_files(st.storage.data_dir / "jobs" / job_id, 0)
    with st.session_factory() as db:
        db.execute(update(Job).where(Job.id == uuid.UUID(job_id))
                   .values(status="succeeded", finished_at=utcnow(), progress_iteration=5))
        db.commit()


def _not_found_body(response) -> dict:
    assert response.status_code == 404, response.get_data(as_text=True)
    return response.get_json() if response.is_json else {"html": True}


def test_each_owner_sees_only_their_jobs_and_admin_sees_all(app, client):
    a = post_job(client, TOK_A)
    b = post_job(client, TOK_B)
    _finish(app, a["id"])
    missing = str(uuid.uuid4())

    def ids(token):
        return {j["id"] for j in client.get("/api/v1/jobs", headers=bearer(token)).get_json()["jobs"]}

    assert ids(TOK_A) == {a["id"]}
    assert ids(TOK_B) == {b["id"]}
    assert ids(TOK_OPS) == {a["id"], b["id"]}

    for path in ("/api/v1/jobs/{id}", "/api/v1/jobs/{id}/artifacts/overlay_png",
                 "/api/v1/jobs/{id}/results/0/artifacts/overlay_png"):
        own = client.get(path.format(id=a["id"]), headers=bearer(TOK_A))
        assert own.status_code == 200, (path, own.get_data(as_text=True))
        assert client.get(path.format(id=a["id"]), headers=bearer(TOK_OPS)).status_code == 200
        other = client.get(path.format(id=a["id"]), headers=bearer(TOK_B))
        absent = client.get(path.format(id=missing), headers=bearer(TOK_B))
        body_other, body_absent = _not_found_body(other), _not_found_body(absent)
        # identical to a missing job, but for the id in the message
        assert json.dumps(body_other).replace(a["id"], "ID") == json.dumps(body_absent).replace(missing, "ID")

    for path in ("/jobs/{id}", "/jobs/{id}/image", "/jobs/{id}/thumbnail"):
        assert client.get(path.format(id=a["id"]), headers=bearer(TOK_A)).status_code == 200, path
        assert client.get(path.format(id=a["id"]), headers=bearer(TOK_OPS)).status_code == 200, path
        other = client.get(path.format(id=a["id"]), headers=bearer(TOK_B))
        absent = client.get(path.format(id=missing), headers=bearer(TOK_B))
        assert other.status_code == absent.status_code == 404, path
        assert other.get_data() == absent.get_data(), path

    jobs_page = client.get("/jobs", headers=bearer(TOK_B)).get_data(as_text=True)
    assert b["id"] in jobs_page and a["id"] not in jobs_page
    admin_page = client.get("/jobs", headers=bearer(TOK_OPS)).get_data(as_text=True)
    assert a["id"] in admin_page and b["id"] in admin_page
    # the admin's list says whose each job is; an owner's list does not need to
    assert re.findall(r'class="job-owner"[^>]*>([^<]+)<', admin_page) == ["lab-b", "lab-a"]
    assert 'class="job-owner"' not in jobs_page

    # cancel: another owner's job is a 404 and stays queued; the admin may cancel it
    refused = client.post(f"/api/v1/jobs/{b['id']}/cancel", headers=bearer(TOK_A))
    assert refused.status_code == 404
    assert client.get(f"/api/v1/jobs/{b['id']}", headers=bearer(TOK_B)).get_json()["status"] == "queued"
    done = client.post(f"/api/v1/jobs/{b['id']}/cancel", headers=bearer(TOK_OPS))
    assert done.status_code == 200 and done.get_json()["status"] == "cancelled"

    # delete: another owner's job is a 404 exactly like a missing one, and stays
    other = client.delete(f"/api/v1/jobs/{a['id']}", headers=bearer(TOK_B))
    absent = client.delete(f"/api/v1/jobs/{missing}", headers=bearer(TOK_B))
    assert json.dumps(_not_found_body(other)).replace(a["id"], "ID") == \
        json.dumps(_not_found_body(absent)).replace(missing, "ID")
    assert client.get(f"/api/v1/jobs/{a['id']}", headers=bearer(TOK_A)).status_code == 200
    assert client.delete(f"/api/v1/jobs/{a['id']}", headers=bearer(TOK_A)).status_code == 204
    assert client.delete(f"/api/v1/jobs/{b['id']}", headers=bearer(TOK_OPS)).status_code == 204
    assert client.get("/api/v1/jobs", headers=bearer(TOK_OPS)).get_json()["jobs"] == []


def test_page_cancel_of_another_owners_job_is_404(app, client):
    b = post_job(client, TOK_B)
    assert login(client, TOK_A).status_code == 303
    html = client.get("/").get_data(as_text=True)
    response = client.post(f"/jobs/{b['id']}/cancel", data={"csrf_token": csrf_from(html)})
    assert response.status_code == 404
    response = client.post(f"/jobs/{b['id']}/delete", data={"csrf_token": csrf_from(html)})
    assert response.status_code == 404
    assert client.get(f"/api/v1/jobs/{b['id']}", headers=bearer(TOK_B)).get_json()["status"] == "queued"


def test_page_login_maps_to_the_same_owner(app, client):
    a = post_job(client, TOK_A)
    b = post_job(client, TOK_B)
    assert login(client, TOK_B).status_code == 303
    listed = {j["id"] for j in client.get("/api/v1/jobs").get_json()["jobs"]}
    assert listed == {b["id"]}
    assert client.get(f"/jobs/{a['id']}").status_code == 404
    token = csrf_from(client.get("/").get_data(as_text=True))
    created = post_job(client, None, **{"X-CSRFToken": token})
    assert created["owner"] == "lab-b"


# --------------------------------------------------------------------------- database tokens


def test_database_tokens_work_alongside_environment_tokens(app, client):
    from sqlalchemy import select

    from shared.db.models import ApiToken
    from shared.tokens import create_token, token_sha256

    st = app.extensions["ebb"]
    with st.session_factory() as db:
        lab_c = create_token(db, "lab-c")
        admin = create_token(db, "root", admin=True)
        rows = list(db.scalars(select(ApiToken)))
    assert {r.token_sha256 for r in rows} == {token_sha256(lab_c), token_sha256(admin)}
    assert all(lab_c not in (r.token_sha256, r.name) for r in rows)  # only the hash is stored
    c = post_job(client, lab_c)
    a = post_job(client, TOK_A)
    assert c["owner"] == "lab-c"
    assert client.get(f"/api/v1/jobs/{a['id']}", headers=bearer(lab_c)).status_code == 404
    assert client.get(f"/api/v1/jobs/{c['id']}", headers=bearer(admin)).status_code == 200
    assert client.get(f"/api/v1/jobs/{c['id']}", headers=bearer(TOK_A)).status_code == 404


def test_a_database_token_turns_auth_on(tmp_path, monkeypatch):
    import web.auth

    monkeypatch.setattr(web.auth, "DB_TOKENS_CACHE_S", 0.0)
    app = make_app(tmp_path, monkeypatch)
    client = app.test_client()
    assert client.get("/api/v1/jobs").status_code == 200  # open
    from shared.tokens import create_token

    with app.extensions["ebb"].session_factory() as db:
        token = create_token(db, "solo")
    assert client.get("/api/v1/jobs").status_code == 401
    assert client.get("/api/v1/jobs", headers=bearer(token)).status_code == 200


def test_cli_tokens_create_prints_the_token_once_and_stores_its_hash(tmp_path, capsys):
    from sqlalchemy import select

    from shared.cli import main
    from shared.db.models import ApiToken
    from shared.db.session import session_factory
    from shared.tokens import token_sha256

    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    assert main(["tokens", "create", "lab-z", "--admin", "--url", url]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("ebb_") and len(token) > 40
    assert "cannot be shown again" in err
    with session_factory(url)() as db:
        (row,) = db.scalars(select(ApiToken)).all()
    assert (row.name, row.admin, row.token_sha256) == ("lab-z", True, token_sha256(token))
    assert main(["tokens", "create", "bad name", "--url", url]) == 2


def test_cli_tokens_create_uses_database_url(tmp_path, monkeypatch, capsys):
    from shared.cli import main
    from shared.db.session import session_factory
    from shared.tokens import find_token, token_sha256

    url = f"sqlite:///{tmp_path / 'env.sqlite3'}"
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["tokens", "create", "lab-y"]) == 0
    token = capsys.readouterr().out.strip()
    with session_factory(url)() as db:
        assert find_token(db, token_sha256(token)).name == "lab-y"


# --------------------------------------------------------------------------- sessions


def test_logout_revokes_the_session_server_side(client):
    assert login(client, TOK_A).status_code == 303
    cookie = client.get_cookie("session").value
    assert client.get("/api/v1/jobs").status_code == 200
    assert logout(client).status_code == 303
    replay = client.application.test_client()
    replay.set_cookie("session", cookie, domain="localhost")
    response = replay.get("/api/v1/jobs")
    assert response.status_code == 401, "a session cookie replayed after logout must not work"
    assert replay.get("/jobs").status_code == 302


def test_sessions_expire(app, client):
    from sqlalchemy import update

    from shared.db.models import LoginSession, utcnow

    assert login(client, TOK_A).status_code == 303
    assert client.get("/api/v1/jobs").status_code == 200
    with app.extensions["ebb"].session_factory() as db:
        row = db.query(LoginSession).one()
        created, expires = row.created_at, row.expires_at
        assert abs((expires - created).total_seconds() - 12 * 3600) < 5
        db.execute(update(LoginSession).values(expires_at=utcnow()))
        db.commit()
    assert client.get("/api/v1/jobs").status_code == 401


def test_session_hours_setting_sets_the_expiry(tmp_path, monkeypatch):
    from shared.db.models import LoginSession

    app = make_app(tmp_path, monkeypatch, EBB_API_TOKENS=TOKENS, EBB_SESSION_HOURS="2")
    client = app.test_client()
    assert login(client, TOK_A).status_code == 303
    with app.extensions["ebb"].session_factory() as db:
        row = db.query(LoginSession).one()
        assert abs((row.expires_at - row.created_at).total_seconds() - 7200) < 5
    assert app.permanent_session_lifetime.total_seconds() == 7200


# --------------------------------------------------------------------------- failures


def test_failed_bearer_tokens_are_locked_out_per_address(client):
    from web.auth import FAILURE_LIMIT

    here = {"REMOTE_ADDR": "198.51.100.7"}
    browser = client.application.test_client()
    page = browser.get("/login", environ_base=here)
    assert browser.post("/login", data={"csrf_token": csrf_from(page.get_data(as_text=True)),
                                        "token": TOK_B}, environ_base=here).status_code == 303
    for i in range(FAILURE_LIMIT):
        response = client.get("/api/v1/jobs", headers=bearer(f"guess-{i}"), environ_base=here)
        assert response.status_code == 401
    locked = client.get("/api/v1/jobs", headers=bearer("guess-x"), environ_base=here)
    assert locked.status_code == 429
    assert locked.get_json()["error"]["code"] == "too_many_requests"
    assert 0 < int(locked.headers["Retry-After"]) <= 900
    # even the right token: a locked address learns nothing more
    assert client.get("/api/v1/jobs", headers=bearer(TOK_A), environ_base=here).status_code == 429
    # and a wrong login from it is refused too
    page = client.get("/login", environ_base=here)
    refused = client.post("/login", data={"csrf_token": csrf_from(page.get_data(as_text=True)),
                                          "token": TOK_A}, environ_base=here)
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    # a session logged in before is unaffected, and so is another address
    assert browser.get("/api/v1/jobs", environ_base=here).status_code == 200
    other = {"REMOTE_ADDR": "198.51.100.8"}
    assert client.get("/api/v1/jobs", headers=bearer(TOK_A), environ_base=other).status_code == 200


def test_failed_logins_count_towards_the_lockout(client):
    from web.auth import FAILURE_LIMIT

    here = {"REMOTE_ADDR": "198.51.100.9"}
    for i in range(FAILURE_LIMIT):
        page = client.get("/login", environ_base=here)
        response = client.post("/login", data={"csrf_token": csrf_from(page.get_data(as_text=True)),
                                               "token": f"wrong-{i}"}, environ_base=here)
        assert response.status_code == 401
    assert client.get("/api/v1/jobs", headers=bearer(TOK_A), environ_base=here).status_code == 429


# --------------------------------------------------------------------------- caching


def test_user_content_is_private_no_store_with_auth(app, client):
    a = post_job(client, TOK_A)
    _finish(app, a["id"])
    for path in (f"/api/v1/jobs/{a['id']}", "/api/v1/jobs", f"/api/v1/jobs/{a['id']}/artifacts/mask_png",
                 f"/api/v1/jobs/{a['id']}/results/0/artifacts/mask_png",
                 f"/jobs/{a['id']}", f"/jobs/{a['id']}/image", f"/jobs/{a['id']}/thumbnail", "/jobs"):
        for _ in range(2):  # the second time from the stored thumbnail / rendition
            response = client.get(path, headers=bearer(TOK_A))
            assert response.status_code == 200, path
            assert response.headers["Cache-Control"] == "private, no-store", path
            assert "Expires" not in response.headers, path
            assert {"Authorization", "Cookie"} <= {
                v.strip() for v in response.headers["Vary"].split(",")}, path


# --------------------------------------------------------------------------- database down


def test_database_down_is_a_503_never_a_500(tmp_path, monkeypatch):
    from web import create_app

    APPS.make(tmp_path, monkeypatch, clear=("EBB_API_TOKENS",))  # env of a test app
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5999/nope"
                                       "?connect_timeout=1")
    for tokens in (TOKENS, ""):
        monkeypatch.setenv("EBB_API_TOKENS", tokens)
        client = create_app({"TESTING": True, "EBB_MIGRATE": False}).test_client()
        # a token that is not in EBB_API_TOKENS needs the database (api_tokens)
        response = client.get("/api/v1/jobs", headers=bearer("not-an-env-token"),
                              environ_base={"REMOTE_ADDR": "198.51.100.30"})
        assert response.status_code == 503, response.get_data(as_text=True)
        assert response.get_json()["error"]["code"] == "service_unavailable"
        assert client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- reuse


def test_identical_submissions_reuse_only_the_owners_own_jobs(app, client):
    from sqlalchemy import update

    from shared import reuse
    from shared.db.models import Job

    def submit(token):
        data = {"image": (io.BytesIO(image_bytes("PNG", (64, 48))), "a.png"), "iterations": "20",
                "seed": "3"}
        response = client.post("/api/v1/jobs", data=data, content_type="multipart/form-data",
                               headers=bearer(token))
        assert response.status_code == 202, response.get_data(as_text=True)
        return response.get_json()

    first = submit(TOK_A)
    st = app.extensions["ebb"]
    with st.session_factory() as db:  # succeeded, as the worker commits it
        job = db.get(Job, uuid.UUID(first["id"]))
        st.storage.put(f"jobs/{first['id']}/overlay.png", image_bytes("PNG", (8, 8)))
        db.execute(update(Job).where(Job.id == job.id).values(
            status="succeeded", artifacts_key=f"jobs/{first['id']}", finished_at=job.created_at,
            results=[{"scores": {"before": 0.5, "after": 0.1}}],
            reuse_key=reuse.reuse_key(job.reuse_key, st.settings.arithmetic)))
        db.commit()
    other = submit(TOK_B)  # another owner: computed anew, nothing of lab-a's revealed
    assert other["status"] == "queued" and other["reused_from"] is None and other["owner"] == "lab-b"
    again = submit(TOK_A)
    assert again["status"] == "succeeded" and again["reused_from"] == first["id"]
    assert again["owner"] == "lab-a"
