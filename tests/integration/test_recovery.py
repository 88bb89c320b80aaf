"""Recovery never fails a healthy job and never strands a queued one (issue 10, findings 3, 4, 7).

Real ``ebb worker`` processes, a private ``redis-server`` per test (restarted
empty, without AOF, where that is the point) and SQLite (PostgreSQL too for the
Redis restart):

* rolling restarts: SIGTERM the worker running a job five times, starting a new
  one each time: every hand-back puts the job back ``queued`` with its attempt
  count and progress back to 0, and it ends ``succeeded`` on its first counted
  attempt;
* a long scoring phase (``EBB_TEST_SLOW_SCORING_SECONDS``) with a 3 s
  ``EBB_HEARTBEAT_TIMEOUT``: the heartbeats of the job and of its batch-mate
  never go stale, nothing is re-queued;
* Redis restarted empty while jobs wait: the reconciler re-sends exactly the
  lost messages, every job finishes once;
* a queue nobody consumes keeps one message per job through many reconcile
  rounds, and a message removed by hand comes back once;
* a job re-queued by the reaper (its worker gone) restarts its progress at 0.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import timedelta

import pytest

from .conftest import TEST_MODEL, Stack, node, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(400)]

#: A job of a few seconds: long enough to be interrupted in the middle.
LONG = {"iterations": 150, "input_size": 96, "mask_size": 8}
SHORT = {"iterations": 10, "input_size": 64, "mask_size": 8}


@pytest.fixture(params=["sqlite", "postgresql"])
def own_database(request, tmp_path) -> str:
    """A migrated database for this test alone: a worker re-sends the queued
    jobs of its database into its own broker, so none may share it."""
    from shared.db.migrations import upgrade_database

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'own.sqlite3'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    upgrade_database(url)
    return url


def queued_ids(redis, queue: str) -> list[str]:
    """Job ids of the messages waiting on ``queue`` (duplicates kept)."""
    from worker.reconcile import message_job_id

    return [message_job_id(m) for m in redis.lrange(queue, 0, -1)]


def unacked_ids(redis) -> list[str]:
    from worker.reconcile import message_job_id

    return [message_job_id(raw) for _, raw in redis.hscan_iter("unacked")]


def started_count(stacks: list[Stack], job_id: uuid.UUID) -> int:
    """How many attempts of ``job_id`` the workers' logs show starting."""
    return sum(s.worker.log_text().count(f"job {job_id} started") for s in stacks)


# --------------------------------------------------------------------------- rolling restarts


def test_five_rolling_restarts_during_one_job_end_succeeded(start_redis_server, spawn, sqlite_url, tmp_path,
                                                           image_bytes):
    redis = start_redis_server("redis", appendonly=True)
    common = dict(database_url=sqlite_url, redis_url=redis.url(), data_dir=tmp_path / "data",
                  queue_prefix="recovery-roll", EBB_MAX_ATTEMPTS="3")
    current = spawn("roll-0", **common)
    job_id = current.submit(image_bytes, config=LONG)
    for restart in range(1, 6):
        wait_for(lambda: (j := current.job(job_id)).status == "running" and j.progress_iteration > 0
                 and j.worker_hostname.startswith(node(current)), timeout=120, interval=0.05,
                 what=f"the job to make progress before restart {restart}")
        os.killpg(current.worker.proc.pid, signal.SIGTERM)  # warm shutdown: hand the job back
        current.worker.proc.wait(60)
        assert current.worker.proc.returncode == 0, current.worker.tail()
        assert "re-queued (worker shutting down)" in current.worker.log_text()
        job = current.job(job_id)
        # a clean hand-back is no attempt, and the next attempt starts from 0
        assert (job.status, job.attempts, job.progress_iteration) == ("queued", 0, 0), restart
        assert job.live is None and job.error is None
        current = spawn(f"roll-{restart}", **common)
    job = current.wait(job_id, timeout=180)
    assert job.status == "succeeded", job.error
    assert job.attempts == 1
    assert job.progress_iteration == job.progress_total == LONG["iterations"]
    assert job.worker_hostname.startswith(node(current))


# --------------------------------------------------------------------------- long scoring


def test_long_scoring_keeps_every_heartbeat_fresh_and_is_never_reaped(start_redis_server, spawn, sqlite_url,
                                                                      tmp_path, image_bytes):
    from shared.db.models import utcnow
    from worker.jobs import as_utc

    redis = start_redis_server("redis", appendonly=True)
    timeout_s = 3.0
    stack = spawn("slow-scoring", database_url=sqlite_url, redis_url=redis.url(), data_dir=tmp_path / "data",
                  queue_prefix="recovery-slow", EBB_HEARTBEAT_TIMEOUT=str(timeout_s), EBB_REAP_INTERVAL="1",
                  EBB_FLEET_INTERVAL="1", EBB_TEST_SLOW_SCORING_SECONDS="10", EBB_MAX_BATCH="2")
    first = stack.submit(image_bytes, config=SHORT)
    mate = stack.submit(image_bytes, config={**SHORT, "iterations": 60})  # steps while the first one scores
    worst = 0.0
    samples = 0
    deadline = time.monotonic() + 150
    while True:
        jobs = [stack.job(first), stack.job(mate)]
        for job in jobs:
            if job.status == "running" and job.heartbeat_at is not None:
                worst = max(worst, (utcnow() - as_utc(job.heartbeat_at)).total_seconds())
                samples += 1
        if all(j.status in ("succeeded", "failed", "cancelled") for j in jobs):
            break
        assert time.monotonic() < deadline, stack.worker.tail()
        time.sleep(0.2)
    for job in jobs:
        assert job.status == "succeeded", job.error
        assert job.attempts == 1
        assert job.timings["total_s"] >= 10  # it really sat in the slow scoring phase
    assert samples > 40
    assert worst < timeout_s, f"a heartbeat was {worst:.1f} s old (limit {timeout_s} s)"
    assert "re-queued" not in stack.worker.log_text()
    print(f"\nlong scoring: oldest heartbeat seen {worst:.2f} s over {samples} samples")


# --------------------------------------------------------------------------- Redis restarted empty


def test_redis_restarted_empty_with_jobs_queued_all_finish_once(own_database, start_redis_server, spawn,
                                                               tmp_path, image_bytes):
    database_url = own_database
    redis = start_redis_server("redis", appendonly=False)  # what ebb run and .ci/run used to start
    prefix = f"recovery-empty-{uuid.uuid4().hex[:6]}"
    # No periodic pass within the test (the first one ran at start-up, before
    # any job): only the reconnect to the restarted Redis can re-send.
    stack = spawn("empty-redis", database_url=database_url, redis_url=redis.url(), data_dir=tmp_path / "data",
                  queue_prefix=prefix, EBB_MAX_BATCH="1", EBB_RECONCILE_INTERVAL="600",
                  EBB_RESEND_QUEUED_AFTER="1")
    queue = f"{prefix}.{TEST_MODEL}"
    busy = stack.submit(image_bytes, config={**LONG, "iterations": 400})
    wait_for(lambda: stack.job(busy).status == "running", timeout=60, what="the first job to start")
    waiting = [stack.submit(image_bytes, config=SHORT) for _ in range(4)]
    wait_for(lambda: len(queued_ids(redis.client(), queue)) >= 3, timeout=10, what="the jobs' messages")
    time.sleep(1.5)  # older than EBB_RESEND_QUEUED_AFTER
    assert all(stack.job(j).status == "queued" for j in waiting)
    redis.restart()  # SIGKILL, no AOF: every message is gone
    lost = time.monotonic()

    for job_id in [busy, *waiting]:
        job = stack.wait(job_id, timeout=180)
        assert job.status == "succeeded", job.error
        assert job.attempts == 1, f"job {job_id} ran {job.attempts} times"
        assert started_count([stack], job_id) == 1
    recovered_s = time.monotonic() - lost
    log = stack.worker.log_text()
    resent = [log.count(f"job {j}: queued but its message was missing") for j in waiting]
    assert resent == [1, 1, 1, 1], log[-3000:]
    assert "Redis connection back" in log
    assert f"job {busy}: queued but its message" not in log
    wait_for(lambda: queued_ids(redis.client(), queue) == [], timeout=10, what="no message left")
    assert recovered_s < 60 + 180  # bounded by the waits above; the time is printed
    print(f"\nRedis restarted empty: 4 lost jobs re-sent and done {recovered_s:.1f} s after the restart")


# --------------------------------------------------------------------------- orphan queue


def test_orphan_queue_gets_no_duplicates_and_a_lost_message_comes_back_once(start_redis_server, spawn, sqlite_url,
                                                                           tmp_path, image_bytes):
    redis = start_redis_server("redis", appendonly=True)
    stack = spawn("orphans", database_url=sqlite_url, redis_url=redis.url(), data_dir=tmp_path / "data",
                  queue_prefix="recovery-orphan", EBB_RECONCILE_INTERVAL="1", EBB_RESEND_QUEUED_AFTER="1",
                  EBB_REAP_INTERVAL="1")
    orphan_model = "vgg19"  # no worker serves it
    queue = f"recovery-orphan.{orphan_model}"
    jobs = [stack.submit(image_bytes, config=SHORT, model=orphan_model) for _ in range(3)]
    client = redis.client()
    assert sorted(queued_ids(client, queue)) == sorted(map(str, jobs))
    time.sleep(8)  # several reconcile rounds, every job long past EBB_RESEND_QUEUED_AFTER
    assert sorted(queued_ids(client, queue)) == sorted(map(str, jobs))

    # a message lost (removed by hand): re-sent once, then left alone
    raw = client.lrange(queue, 0, 0)[0]
    assert client.lrem(queue, 1, raw) == 1
    wait_for(lambda: len(queued_ids(client, queue)) == 3, timeout=30, what="the lost message to be re-sent")
    time.sleep(5)
    assert sorted(queued_ids(client, queue)) == sorted(map(str, jobs))
    assert all(stack.job(j).status == "queued" for j in jobs)
    assert stack.worker.log_text().count("queued but its message was missing") == 1


# --------------------------------------------------------------------------- progress after a re-queue


def test_progress_restarts_at_zero_after_the_reaper_requeues(start_redis_server, spawn, sqlite_url, tmp_path,
                                                             image_bytes):
    from sqlalchemy import update

    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope

    redis = start_redis_server("redis", appendonly=True)
    stack = spawn("progress", database_url=sqlite_url, redis_url=redis.url(), data_dir=tmp_path / "data",
                  queue_prefix="recovery-progress", EBB_HEARTBEAT_TIMEOUT="3", EBB_REAP_INTERVAL="1")
    job_id = stack.submit(image_bytes, config=SHORT, send=False)
    long_ago = utcnow() - timedelta(minutes=5)
    with session_scope(sqlite_url) as session:  # a worker that vanished at iteration 9,999 (its high point)
        session.execute(update(Job).where(Job.id == job_id).values(
            status="running", attempts=1, started_at=long_ago, heartbeat_at=long_ago,
            worker_hostname="vanished@nowhere", progress_iteration=9_999, current_score=0.5,
            live=[{"index": 1, "label": "x", "iteration": 9_999, "total": 10, "score": 0.5}]))
    seen = []
    while (job := stack.job(job_id)).status not in ("succeeded", "failed", "cancelled"):
        if job.attempts == 2 or job.status == "queued":
            seen.append(job.progress_iteration)
        time.sleep(0.05)
        assert len(seen) < 3000, stack.worker.tail()
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    assert job.progress_iteration == job.progress_total == SHORT["iterations"]
    assert all(p <= SHORT["iterations"] for p in seen), seen  # never the old attempt's 9,999
    assert "re-queued" in stack.worker.log_text()


# --------------------------------------------------------------------------- ebb run's Redis


def test_ebb_run_turns_aof_on_in_a_local_redis_without_it(start_redis_server):
    from shared.cli import ensure_aof

    redis = start_redis_server("redis", appendonly=False)
    assert redis.client().config_get("appendonly") == {"appendonly": "no"}
    assert ensure_aof(redis.url()) == "AOF turned on (CONFIG SET appendonly yes)"
    assert redis.client().config_get("appendonly") == {"appendonly": "yes"}
    assert ensure_aof(redis.url()) == "AOF on"


# --------------------------------------------------------------------------- SIGQUIT


def test_sigquit_hands_the_running_job_back_without_a_critical_error(start_redis_server, spawn, sqlite_url,
                                                                    tmp_path, image_bytes):
    redis = start_redis_server("redis", appendonly=True)
    common = dict(database_url=sqlite_url, redis_url=redis.url(), data_dir=tmp_path / "data",
                  queue_prefix="recovery-quit")
    first = spawn("quit", **common)
    job_id = first.submit(image_bytes, config=LONG)
    wait_for(lambda: (j := first.job(job_id)).status == "running" and j.progress_iteration > 0,
             timeout=120, interval=0.05, what="the job to make progress")
    os.killpg(first.worker.proc.pid, signal.SIGQUIT)  # cold shutdown
    first.worker.proc.wait(60)
    log = first.worker.log_text()
    assert "CRITICAL" not in log and "NotImplementedError" not in log, log[-3000:]
    assert "re-queued (worker shutting down)" in log
    job = first.job(job_id)
    assert (job.status, job.attempts, job.progress_iteration) == ("queued", 0, 0)
    second = spawn("after-quit", **common)
    job = second.wait(job_id, timeout=180)
    assert job.status == "succeeded", job.error
    assert job.attempts == 1
