"""Migrations on each real backend: concurrent upgrades, no drift against the models."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import create_engine, text

from shared.db.migrations import head_revision


pytestmark = [pytest.mark.timeout(300)]



def test_concurrent_upgrades_on_a_fresh_postgres_database(fresh_postgres_url, tmp_path):
    env = {**os.environ, "DATABASE_URL": fresh_postgres_url}
    procs = [subprocess.Popen([sys.executable, "-m", "shared.cli", "db", "upgrade"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    engine = create_engine(fresh_postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head_revision()]
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(database_url):
    """Runs on SQLite and PostgreSQL: autogenerate finds nothing to change."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from shared.db.models import Base
    from shared.db.session import get_engine

    with get_engine(database_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == [], "models changed without a migration"


def test_job_round_trip_keeps_uuid_json_and_timezones(database_url):
    from datetime import timezone

    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope

    job_id = uuid.uuid4()
    now = utcnow()
    with session_scope(database_url) as s:
        s.add(Job(id=job_id, model="m", config={"iterations": 3, "blur": "mean"}, image_sha256="a" * 64,
                  image_width=2, image_height=3, top5={"before": [{"index": 1, "label": "x", "prob": 0.5}]},
                  heartbeat_at=now))
    with session_scope(database_url) as s:
        job = s.get(Job, job_id)
        assert job.status == "queued" and job.attempts == 0 and job.cancel_requested is False
        assert job.config == {"iterations": 3, "blur": "mean"}
        assert job.top5["before"][0]["prob"] == 0.5
        beat = job.heartbeat_at if job.heartbeat_at.tzinfo else job.heartbeat_at.replace(tzinfo=timezone.utc)
        assert abs((beat - now).total_seconds()) < 1e-3
        assert job.enqueued_at is not None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0002_keeps_existing_jobs(tmp_path, backend, request):
    """A database holding jobs from before several targets and results
    (revision 0001) upgrades in place: rows kept, the new columns empty."""
    from shared.db.migrations import head_revision, upgrade_database
    from shared.db.models import Job
    from shared.db.session import session_scope

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    upgrade_database(url, revision="0001", force=True)
    job_id = uuid.uuid4()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, status, model, config, image_sha256, image_width, image_height, "
            "image_filename, progress_iteration, progress_total, cancel_requested, created_at, attempts) "
            "VALUES (:id, 'succeeded', 'vgg19', '{}', :sha, 4, 4, 'x.png', 5, 5, false, :now, 1)"),
            {"id": job_id.hex if backend == "sqlite" else str(job_id), "sha": "0" * 64,
             "now": "2026-01-01 00:00:00"})
    engine.dispose()
    assert upgrade_database(url, force=True) == head_revision()
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "succeeded" and job.progress_total == 5
        assert job.results is None and job.targets is None and job.top_k is None and job.live is None
        assert job.artifacts_key is None and job.reused_from is None  # 0004
        assert job.owner == "default"  # 0005
