"""shared.db.session: cached engines, SQLite pragmas, session scopes and retries."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import exc, text

from shared.db import session as db_session
from shared.db.migrations import upgrade_database
from shared.db.models import Job


@pytest.fixture
def url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'sub' / 'ebb.sqlite3'}"
    upgrade_database(url)
    return url


def _job(**overrides) -> Job:
    values = dict(id=uuid.uuid4(), status="queued", model="m", config={}, image_sha256="a" * 64,
                  image_width=1, image_height=1, image_filename="x", progress_iteration=0,
                  progress_total=1, cancel_requested=False, attempts=0)
    values.update(overrides)
    return Job(**values)


def test_engine_is_cached_per_url(url, tmp_path):
    assert db_session.get_engine(url) is db_session.get_engine(url)
    other = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    assert db_session.get_engine(other) is not db_session.get_engine(url)
    assert db_session.session_factory(url) is db_session.session_factory(url)


def test_sqlite_uses_wal_and_a_busy_timeout(url, tmp_path):
    assert (tmp_path / "sub").is_dir()  # folder created
    with db_session.get_engine(url).connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == db_session.SQLITE_BUSY_TIMEOUT_MS


def test_default_url_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'env.sqlite3'}")
    engine = db_session.get_engine()
    assert engine.url.database == str(tmp_path / "env.sqlite3")


def test_sqlite_path_helpers():
    assert db_session.sqlite_path("sqlite:////tmp/x.db").as_posix() == "/tmp/x.db"
    assert db_session.sqlite_path("sqlite://") is None
    assert db_session.sqlite_path("sqlite:///:memory:") is None
    assert db_session.sqlite_path("postgresql+psycopg://u@h/db") is None
    assert db_session.is_sqlite("sqlite://") and not db_session.is_sqlite("postgresql://u@h/db")


def test_session_scope_commits_and_rolls_back(url):
    job = _job()
    with db_session.session_scope(url) as s:
        s.add(job)
    with pytest.raises(RuntimeError):
        with db_session.session_scope(url) as s:
            s.get(Job, job.id).status = "running"
            raise RuntimeError("abort")
    with db_session.session_scope(url) as s:
        assert s.get(Job, job.id).status == "queued"
    # expire_on_commit=False: the object stays readable after the scope.
    assert job.status == "queued"


def _operational(invalidated: bool = False) -> exc.OperationalError:
    error = exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    error.connection_invalidated = invalidated
    return error


def test_retrying_retries_transient_errors(monkeypatch):
    sleeps = []
    monkeypatch.setattr(db_session.time, "sleep", sleeps.append)
    calls = []
    resets = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _operational(invalidated=len(calls) == 2)
        return "ok"

    assert db_session.retrying(flaky, on_retry=resets.append) == "ok"
    assert len(calls) == 3 and len(resets) == 2
    assert sleeps == [0.1, 0.2]  # exponential backoff


def test_retrying_gives_up_after_attempts(monkeypatch):
    monkeypatch.setattr(db_session.time, "sleep", lambda s: None)
    calls = []

    def down():
        calls.append(1)
        raise _operational()

    with pytest.raises(exc.OperationalError):
        db_session.retrying(down, attempts=4)
    assert len(calls) == 4


def test_retrying_does_not_retry_other_errors(monkeypatch):
    monkeypatch.setattr(db_session.time, "sleep", lambda s: pytest.fail("should not sleep"))
    calls = []

    def bad():
        calls.append(1)
        raise exc.IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(exc.IntegrityError):
        db_session.retrying(bad)
    with pytest.raises(ValueError):
        db_session.retrying(lambda: (_ for _ in ()).throw(ValueError("nope")))
    assert len(calls) == 1


def test_retrying_validates_attempts():
    with pytest.raises(ValueError, match="attempts"):
        db_session.retrying(lambda: 1, attempts=0)


def test_retrying_recovers_a_locked_sqlite_write(url, monkeypatch):
    """A real OperationalError ("database is locked") is retried until the lock goes."""
    import sqlite3

    from sqlalchemy import create_engine

    monkeypatch.setattr(db_session.time, "sleep", lambda s: None)
    blocker = sqlite3.connect(db_session.sqlite_path(url), timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    engine = create_engine(url, connect_args={"timeout": 0})  # no busy wait
    attempts = []

    def write():
        attempts.append(1)
        if len(attempts) == 2:
            blocker.rollback()  # the other writer finishes
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
        return len(attempts)

    try:
        assert db_session.retrying(write) == 2
    finally:
        blocker.close()
        engine.dispose()


def test_upgrade_shortcut(url):
    from shared.db.migrations import head_revision

    assert head_revision() == "0005"  # the newest file in shared/db/migrations/versions
    assert db_session.upgrade(url) == head_revision()
