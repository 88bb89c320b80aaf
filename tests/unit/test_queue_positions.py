"""Queue positions of a page of jobs come from one window query, not one count per row.

``web.jobs.queue_snapshot`` against the per-job count (``queue_position``) on
a real SQLite file, and ``GET /api/v1/jobs`` with 20,000 jobs queued: a page
of 100 costs a handful of statements, none of them a per-row count.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import event, insert, select

from shared.db.migrations import upgrade_database
from shared.db.models import Job, utcnow
from shared.db.session import session_scope
from web.jobs import queue_position, queue_snapshot
from web.testing import TEST_MODELS, TestApps

REDIS_DB = 13
PREFIX = f"ebbtest-pos{REDIS_DB}-{uuid.uuid4().hex[:8]}"
APPS = TestApps(REDIS_DB, PREFIX)


def rows(n: int, *, seed: int = 0, models=("a", "b"), statuses=("queued",), start=None) -> list[dict]:
    """``n`` job rows with shuffled enqueue times, some tied, some without ``enqueued_at``."""
    rng = random.Random(seed)
    start = start or utcnow() - timedelta(hours=1)
    out = []
    for i in range(n):
        created = start + timedelta(seconds=i)
        enqueued = None if i % 7 == 0 else start + timedelta(seconds=rng.randrange(0, n // 3 + 1))
        out.append(dict(id=uuid.UUID(int=rng.getrandbits(128)), status=rng.choice(statuses), model=rng.choice(models),
                        config={}, image_sha256="a" * 64, image_width=1, image_height=1, image_filename="x",
                        progress_iteration=0, progress_total=rng.choice((10, 20, 30)), cancel_requested=False,
                        attempts=0, created_at=created, enqueued_at=enqueued))
    return out


@pytest.fixture
def url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'pos.sqlite3'}"
    upgrade_database(url)
    return url


def test_snapshot_matches_the_per_job_count_and_work_ahead(url):
    with session_scope(url) as session:
        session.execute(insert(Job), rows(300, statuses=("queued", "queued", "running", "succeeded")))
    with session_scope(url) as session:
        jobs = session.scalars(select(Job)).all()
        snapshot = queue_snapshot(session, jobs)
        queued = [j for j in jobs if j.status == "queued"]
        assert set(snapshot) == {j.id for j in queued} and len(queued) > 100
        for job in jobs:
            expected = queue_position(session, job)
            assert (snapshot[job.id].position if job.id in snapshot else None) == expected
        for job in queued:  # the iterations queued before it, as the ETA counts them
            ahead = [j for j in queued if j.model == job.model and snapshot[j.id].position < snapshot[job.id].position]
            assert snapshot[job.id].work_before == sum(j.progress_total for j in ahead)
        positions = sorted(s.position for j, s in snapshot.items() if next(q for q in queued if q.id == j).model == "a")
        assert positions == list(range(1, len(positions) + 1))


def test_snapshot_of_no_queued_job_runs_no_query(url):
    with session_scope(url) as session:
        session.execute(insert(Job), rows(5, statuses=("succeeded",)))
    with session_scope(url) as session:
        statements = []
        event.listen(session.get_bind(), "before_cursor_execute", lambda *a: statements.append(a[2]))
        jobs = session.scalars(select(Job)).all()
        statements.clear()
        assert queue_snapshot(session, jobs) == {}
        assert statements == []


def test_job_list_of_100_with_20000_queued_counts_once(tmp_path, monkeypatch):
    from web.testing import redis_available

    if redis_available(APPS.redis_url):
        pytest.skip("Redis not reachable")
    app = APPS.make(tmp_path, monkeypatch)
    try:
        url = app.extensions["ebb"].settings.database_url
        with session_scope(url) as session:
            session.execute(insert(Job), rows(20_000, seed=1, models=TEST_MODELS))
        engine = app.extensions["ebb"].session_factory.kw["bind"]
        statements: list[str] = []
        listener = lambda *a: statements.append(a[2])  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        client = app.test_client()
        client.get("/api/v1/jobs?limit=1")  # warm up (first request, connections)
        statements.clear()
        started = time.perf_counter()
        response = client.get("/api/v1/jobs?limit=100&status=queued")
        seconds = time.perf_counter() - started
        event.remove(engine, "before_cursor_execute", listener)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()["jobs"]
        assert len(body) == 100
        counts = [s for s in statements if "count(" in s.lower() and "enqueued_at" in s.lower()]
        windows = [s for s in statements if "row_number()" in s.lower()]
        assert counts == [], counts[:2]  # no per-row queue-position count
        assert len(windows) == 1
        assert len(statements) < 15, len(statements)  # not 100 × (count + work ahead)
        # and the answer is right: each job's position by the per-job count
        with session_scope(url) as session:
            for item in body[:10]:
                job = session.get(Job, uuid.UUID(item["id"]))
                assert item["queue_position"] == queue_position(session, job) == item["queue"]["position"]
        print(f"\njob list: 100 of 20,000 queued in {seconds:.3f} s, {len(statements)} statements")
    finally:
        APPS.dispose()
        from web.testing import delete_keys

        delete_keys(APPS.redis_url, PREFIX)
