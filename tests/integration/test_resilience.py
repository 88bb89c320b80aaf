"""Jobs survive a worker killed mid-job (reaper) and database connections dropped mid-job."""

from __future__ import annotations

import os
import signal
import time

import pytest

from .conftest import PG_ADMIN_URL, build_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(600)]


def test_killed_worker_job_is_requeued_by_the_reaper(start_worker, sqlite_url, redis_url, queue_prefix,
                                                     image_bytes, tmp_path):
    common = dict(database_url=sqlite_url, redis_url=redis_url, data_dir=tmp_path / "data",
                  queue_prefix=f"{queue_prefix}.reap", EBB_HEARTBEAT_TIMEOUT="3", EBB_REAP_INTERVAL="1")
    first = build_stack(start_worker, name="doomed", **common)
    job_id = first.submit(image_bytes, config={"iterations": 100})
    wait_for(lambda: (j := first.job(job_id)).status == "running" and j.progress_iteration > 0,
             timeout=60, interval=0.05, what="the job to make progress")
    os.killpg(first.worker.proc.pid, signal.SIGKILL)
    first.worker.proc.wait(10)
    progress_at_kill = first.job(job_id).progress_iteration
    assert first.job(job_id).status == "running"

    second = build_stack(start_worker, name="rescuer", **common)
    seen = []
    deadline = time.monotonic() + 120
    while (job := second.job(job_id)).status not in ("succeeded", "failed", "cancelled"):
        if job.attempts == 2:
            seen.append(job.progress_iteration)
        assert time.monotonic() < deadline, second.worker.tail()
        time.sleep(0.1)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    assert progress_at_kill > 0
    # the second attempt counts from 0 (issue 10): its progress only grows, from wherever it was first seen
    assert seen == sorted(seen), seen
    assert "re-queued" in second.worker.log_text()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_worker_writes_survive_dropped_postgres_connections(stack, image_bytes):
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    db_name = make_url(stack.database_url).database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    job_id = stack.submit(image_bytes, config={"iterations": 150})
    wait_for(lambda: (j := stack.job(job_id)).status == "running" and j.progress_iteration > 0,
             timeout=60, interval=0.05, what="the job to make progress")
    killed = 0
    try:
        for _ in range(4):  # as a server restart would: every connection to the database dies
            with admin.connect() as conn:
                killed += len(conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": db_name}).all())
            time.sleep(0.3)
    finally:
        admin.dispose()
    assert killed > 0
    job = stack.wait(job_id)
    assert job.status == "succeeded", job.error
    assert job.attempts == 1


def test_graceful_shutdown_requeues_the_running_job(start_worker, sqlite_url, redis_url, queue_prefix,
                                                    image_bytes, tmp_path):
    common = dict(database_url=sqlite_url, redis_url=redis_url, data_dir=tmp_path / "data",
                  queue_prefix=f"{queue_prefix}.term")
    first = build_stack(start_worker, name="stopping", **common)
    job_id = first.submit(image_bytes, config={"iterations": 120})
    wait_for(lambda: (j := first.job(job_id)).status == "running" and j.progress_iteration > 0,
             timeout=60, interval=0.05, what="the job to make progress")
    asked = time.monotonic()
    os.killpg(first.worker.proc.pid, signal.SIGTERM)  # warm shutdown
    first.worker.proc.wait(30)
    assert time.monotonic() - asked < 10, "warm shutdown waited for the whole job"
    job = first.job(job_id)
    # a clean hand-back is not an attempt, and progress starts again from 0 (issue 10)
    assert (job.status, job.attempts, job.progress_iteration) == ("queued", 0, 0), first.worker.tail()
    assert "re-queued (worker shutting down)" in first.worker.log_text()

    second = build_stack(start_worker, name="next", **common)
    job = second.wait(job_id)
    assert job.status == "succeeded", job.error
    assert job.attempts == 1
