"""No job lost: fault injection against real workers, Redis, PostgreSQL and gunicorn.

Modelled on Celery's own failover smoke tests (``t/smoke/tests/failover``): a
cluster of real ``ebb worker`` processes, one of them killed or stopped in the
middle of a job, the broker or the database restarted under them, the web
process restarted. Every test checks the same three things:

* nothing lost: every job accepted ends ``succeeded`` (or, for the reaper's
  last-attempt case, ``failed`` with a reason), none stays ``queued`` or
  ``running``;
* nothing duplicated: ``attempts`` is exactly what the fault explains, a
  redelivered duplicate message is dropped, the job folder holds exactly the
  six artifacts and no temporary folder is left next to it;
* every job ends in a terminal state within the test.

Each test runs its own ``redis-server`` (and, for the PostgreSQL restart, its
own cluster) on a free port: they kill, restart or shorten the visibility
timeout of the broker, which must never affect the shared Redis (kombu's
``unacked`` hash is shared by every queue of a Redis database).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest

from .conftest import TEST_MODEL, Stack, node, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(300)]

TERMINAL = ("succeeded", "failed", "cancelled")
#: A job that lasts a few seconds on a shared CPU: long enough to be hit "in the middle".
LONG = {"iterations": 40, "input_size": 96, "mask_size": 8}
#: A job that takes a second or two.
SHORT = {"iterations": 10, "input_size": 64, "mask_size": 8}


# --------------------------------------------------------------------------- helpers


def running_with_progress(stack: Stack, job_id: uuid.UUID, timeout: float = 90.0):
    return wait_for(lambda: (j := stack.job(job_id)).status == "running" and j.progress_iteration > 0 and j,
                    timeout=timeout, interval=0.05, what=f"job {job_id} to make progress")


def assert_artifacts_complete(stack: Stack, job_id: uuid.UUID) -> None:
    """Exactly the six artifacts, the saliency and the Grad-CAM baseline in the job's folder;
    no temporary folder beside it."""
    from shared.imaging.render import ARTIFACT_NAMES, EXTRA_ARTIFACT_NAMES

    storage = stack.storage
    folder = storage.job_dir(job_id)
    expected = [*ARTIFACT_NAMES.values(), EXTRA_ARTIFACT_NAMES["gradcam_npy"], EXTRA_ARTIFACT_NAMES["gradcam_png"],
                EXTRA_ARTIFACT_NAMES["saliency_npy"], EXTRA_ARTIFACT_NAMES["saliency_png"]]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected), folder
    assert all(p.stat().st_size > 0 for p in folder.iterdir())
    leftovers = [p.name for p in storage.jobs_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary folders left behind: {leftovers}"


def all_jobs(database_url: str) -> dict[uuid.UUID, Any]:
    from sqlalchemy import select

    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope(database_url) as session:
        rows = session.execute(select(Job)).scalars().all()
        for row in rows:
            session.expunge(row)
        return {row.id: row for row in rows}


def set_job(database_url: str, job_id: uuid.UUID, **values: Any) -> None:
    from sqlalchemy import update

    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope(database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def broker_leftovers(redis, queue: str) -> tuple[list[str], list[str]]:
    """Job ids of the messages still waiting on ``queue``, and of those still unacknowledged."""
    import base64
    import json

    def job_of(message: dict) -> str:
        return json.loads(base64.b64decode(message["body"]))[0][0]

    waiting = [job_of(json.loads(m)) for m in redis.lrange(queue, 0, -1)]
    unacked = [job_of(json.loads(p)[0]) for _, p in redis.hscan_iter("unacked")]
    return waiting, unacked


# --------------------------------------------------------------------------- 1. SIGKILL


def test_worker_killed_mid_job_is_redelivered_once_to_another_worker(
        start_redis_server, spawn, sqlite_url, tmp_path, image_bytes):
    """A cluster of two workers; SIGKILL the one running a job (as Celery's failover test).

    The survivor's reaper re-queues the job once its heartbeat is stale
    (``EBB_HEARTBEAT_TIMEOUT``), it runs again there (``attempts`` == 2). The
    killed worker's own message is still unacknowledged in Redis: when the
    killed worker is restarted, kombu puts it back (its visibility timeout,
    ``EBB_VISIBILITY_TIMEOUT``, has passed) and it is delivered again: that
    duplicate must be dropped without touching the finished job.
    """
    redis = start_redis_server("redis")
    common = dict(database_url=sqlite_url, redis_url=redis.url(), data_dir=tmp_path / "data",
                  queue_prefix="faults-kill", EBB_HEARTBEAT_TIMEOUT="5", EBB_REAP_INTERVAL="1",
                  EBB_VISIBILITY_TIMEOUT="8")
    first, second = spawn("kill-a", wait=False, **common), spawn("kill-b", wait=False, **common)
    first.worker.wait_ready(), second.worker.wait_ready()

    job_id = first.submit(image_bytes, config=LONG)
    delivered = time.monotonic()
    job = running_with_progress(first, job_id)
    victim, survivor = (first, second) if job.worker_hostname.startswith(node(first)) else (second, first)
    assert job.worker_hostname.startswith(node(victim))
    os.killpg(victim.worker.proc.pid, signal.SIGKILL)
    victim.worker.proc.wait(10)
    killed = time.monotonic()
    assert first.job(job_id).status == "running"

    job = survivor.wait(job_id, timeout=120)
    recovered_s = time.monotonic() - killed
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    assert job.worker_hostname.startswith(node(survivor))
    assert "re-queued" in survivor.worker.log_text()
    assert_artifacts_complete(survivor, job_id)
    result = survivor.storage.job_dir(job_id) / "result.json"
    written = result.stat().st_mtime_ns

    # The killed worker's message is still in Redis, unacknowledged.
    queue = f"{common['queue_prefix']}.{TEST_MODEL}"
    assert broker_leftovers(redis.client(), queue) == ([], [str(job_id)])
    time.sleep(max(0.0, delivered + 9 - time.monotonic()))  # past the visibility timeout
    restarted = spawn("kill-a-again", **common)
    wait_for(lambda: broker_leftovers(redis.client(), queue) == ([], []), timeout=60,
             what="the duplicate message to be redelivered and acknowledged")
    wait_for(lambda: f"job {job_id} already succeeded" in restarted.worker.log_text() + survivor.worker.log_text(),
             timeout=30, what="the duplicate to be dropped")
    again = survivor.job(job_id)
    assert (again.status, again.attempts, again.finished_at) == ("succeeded", 2, job.finished_at)
    assert result.stat().st_mtime_ns == written  # artifacts written once
    assert_artifacts_complete(survivor, job_id)
    assert list(all_jobs(sqlite_url)) == [job_id]
    print(f"\nSIGKILL: job recovered {recovered_s:.1f} s after the kill")


# --------------------------------------------------------------------------- 2. SIGTERM


def test_worker_stopped_gracefully_mid_job_hands_it_to_another_worker(
        start_redis_server, spawn, sqlite_url, tmp_path, image_bytes):
    """SIGTERM (warm shutdown) the worker running a job while a second worker serves the queue.

    The stopping worker does not wait for the whole job: it puts it back on
    the queue and exits; the other worker completes it and no message is left
    behind. The hand-back is not an attempt: ``attempts`` == 1 (issue 10).
    """
    redis = start_redis_server("redis")
    common = dict(database_url=sqlite_url, redis_url=redis.url(), data_dir=tmp_path / "data",
                  queue_prefix="faults-term")
    first, second = spawn("term-a", wait=False, **common), spawn("term-b", wait=False, **common)
    first.worker.wait_ready(), second.worker.wait_ready()

    job_id = first.submit(image_bytes, config=LONG)
    job = running_with_progress(first, job_id)
    stopping, other = (first, second) if job.worker_hostname.startswith(node(first)) else (second, first)
    asked = time.monotonic()
    os.killpg(stopping.worker.proc.pid, signal.SIGTERM)  # warm shutdown
    handed_back = wait_for(
        lambda: (j := other.job(job_id)).status != "running" or not j.worker_hostname.startswith(node(stopping)),
        timeout=15, interval=0.05, what="the stopping worker to hand the job back")
    handed_back_s = time.monotonic() - asked
    stopping.worker.proc.wait(60)
    stop_s = time.monotonic() - asked
    assert handed_back_s < 5, f"the job was handed back after {handed_back_s:.1f} s: the worker waited for it"
    assert stopping.worker.proc.returncode == 0, stopping.worker.tail()
    assert "re-queued (worker shutting down)" in stopping.worker.log_text()

    job = other.wait(job_id, timeout=120)
    assert job.status == "succeeded", job.error
    assert job.attempts == 1
    assert job.worker_hostname.startswith(node(other))
    assert_artifacts_complete(other, job_id)
    queue = f"{common['queue_prefix']}.{TEST_MODEL}"
    wait_for(lambda: broker_leftovers(redis.client(), queue) == ([], []), timeout=10,
             what="no message left in Redis")
    assert list(all_jobs(sqlite_url)) == [job_id]
    print(f"\nSIGTERM: job handed back {handed_back_s:.1f} s after the signal, worker gone after {stop_s:.1f} s")


# --------------------------------------------------------------------------- 3. Redis restart


def _web_env(stack: Stack, **extra: str) -> dict[str, str]:
    env = {
        "DATA_DIR": str(stack.data_dir),
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": stack.redis_url,
        "EBB_MODEL": TEST_MODEL,
        "EBB_MODELS": TEST_MODEL,
        "EBB_QUEUE_PREFIX": stack.queue_prefix,
        "EBB_SECRET_KEY": "test-secret-key",
        "EBB_API_TOKENS": "",
        "EBB_RATE_LIMIT": "1000/minute",
        # identical SHORT jobs must each run (attempts, folders): no answers from the store
        "EBB_REUSE": "0",
    }
    env.update(extra)
    return env


def _form(config: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in config.items()}


def test_redis_restart_loses_no_job_and_refuses_submissions_while_down(
        start_redis_server, spawn, sqlite_url, tmp_path, image_bytes, monkeypatch):
    """Redis (AOF on) crashes and restarts while one job runs and two wait in its queue.

    While it is down, ``POST /api/v1/jobs`` answers 503 ``queue_unavailable``
    and leaves no job row behind; after the restart the queued messages are
    still there (AOF), the web queues again without a restart of its own, and
    every job completes exactly once.
    """
    import io

    from web import create_app

    redis = start_redis_server("redis-aof", appendonly=True)
    prefix = f"faults-redis-{uuid.uuid4().hex[:6]}"
    stack = spawn("redis-restart", database_url=sqlite_url, redis_url=redis.url(), data_dir=tmp_path / "data",
                  queue_prefix=prefix, EBB_MAX_BATCH="1")  # one job at a time: the others stay queued
    monkeypatch.setenv("EBB_QUEUE_PREFIX", prefix)  # the web's queue_for() reads os.environ
    client = create_app({"TESTING": True, "EBB_ENV": _web_env(stack)}).test_client()
    queue = f"{prefix}.{TEST_MODEL}"

    def post(config):
        return client.post("/api/v1/jobs", content_type="multipart/form-data",
                           data={**_form(config), "image": (io.BytesIO(image_bytes), "flute.jpg")})

    accepted = []
    for config in (LONG, SHORT, SHORT):
        response = post(config)
        assert response.status_code == 202, response.get_json()
        accepted.append(uuid.UUID(response.get_json()["id"]))
    running = running_with_progress(stack, accepted[0])
    assert running.progress_iteration < running.progress_total
    assert redis.client().llen(queue) == 2

    redis.kill(signal.SIGKILL)  # a crash: only the AOF survives
    down = time.monotonic()
    refused = post(SHORT)
    assert refused.status_code == 503, refused.get_json()
    error = refused.get_json()["error"]
    assert error["code"] == "queue_unavailable"
    assert "queue is unavailable" in error["message"] and "nothing was queued" in error["message"]
    assert set(all_jobs(sqlite_url)) == set(accepted), "the refused submission left a job row"
    listed = client.get("/api/v1/jobs?limit=100")  # reads still work: they need no broker
    assert listed.status_code == 200
    assert {j["id"] for j in listed.get_json()["jobs"]} == {str(j) for j in accepted}
    time.sleep(max(0.0, down + 3 - time.monotonic()))

    redis.start()  # same port, same folder: the AOF is replayed
    waiting, unacked = broker_leftovers(redis.client(), queue)
    rows = all_jobs(sqlite_url)
    for job_id in accepted[1:]:  # the AOF kept the queued jobs' messages
        assert str(job_id) in waiting + unacked or rows[job_id].status != "queued", (waiting, unacked)
    response = post(SHORT)  # the web queues again, without a restart of its own
    assert response.status_code == 202, response.get_json()
    accepted.append(uuid.UUID(response.get_json()["id"]))

    for job_id in accepted:
        job = stack.wait(job_id, timeout=150)
        assert job.status == "succeeded", job.error
        assert job.attempts == 1, f"job {job_id} ran {job.attempts} times"
        assert_artifacts_complete(stack, job_id)
    rows = all_jobs(sqlite_url)
    assert set(rows) == set(accepted)
    # A message left behind (the running job's, unacknowledged when Redis went
    # down) only ever refers to a finished job: redelivered, it is dropped.
    waiting, unacked = broker_leftovers(redis.client(), queue)
    assert waiting == []
    assert all(rows[uuid.UUID(j)].status == "succeeded" for j in unacked), unacked
    noticed = stack.worker.log_text().count("Connection to broker lost")
    print(f"\nRedis restart: all {len(accepted)} jobs done; the worker saw the connection drop {noticed} "
          f"time(s); {len(unacked)} stale message(s) of finished jobs left unacknowledged")


# --------------------------------------------------------------------------- 4. PostgreSQL restart


def test_postgres_restart_mid_job_worker_retries_and_completes(
        private_postgres, start_redis_server, spawn, tmp_path, image_bytes):
    """A private PostgreSQL cluster is restarted twice under a running job.

    First ``pg_ctl restart -m fast`` (every connection dies), then a stop,
    three seconds down, and a start. The worker's writes retry, progress
    resumes after each restart and the job completes once (``attempts`` == 1).
    """
    from shared.db.migrations import upgrade_database
    from shared.db.session import get_engine
    from shared.db.models import utcnow

    url = private_postgres.create_database("ebb_faults")
    upgrade_database(url)
    redis = start_redis_server("redis")
    stack = spawn("pg-restart", database_url=url, redis_url=redis.url(), data_dir=tmp_path / "data",
                  queue_prefix="faults-pg")
    try:
        job_id = stack.submit(image_bytes, config={**LONG, "iterations": 60})
        running_with_progress(stack, job_id)

        before = private_postgres.postmaster_pid()
        private_postgres.restart("fast")
        assert private_postgres.postmaster_pid() not in (None, before)
        restarted = utcnow()
        job = wait_for(lambda: ((j := stack.job(job_id)).status in TERMINAL or
                                (j.heartbeat_at is not None and j.heartbeat_at > restarted)) and j,
                       timeout=60, what="the worker to write again after the restart")
        if job.status == "running":  # a second, longer outage
            private_postgres.stop("fast")
            time.sleep(3)
            private_postgres.start()

        job = stack.wait(job_id, timeout=150)
        assert job.status == "succeeded", f"{job.error}\n{stack.worker.tail()}"
        assert job.attempts == 1
        assert job.progress_iteration == job.progress_total == 60
        assert_artifacts_complete(stack, job_id)
        assert list(all_jobs(url)) == [job_id]
    finally:
        stack.worker.stop()
        get_engine(url).dispose()
    print(f"\nPostgreSQL restart: retries logged: {stack.worker.log_text().count('retrying in')}, "
          f"progress failures: {stack.worker.log_text().count('progress update failed')}")


# --------------------------------------------------------------------------- 5. vanished worker


def test_reaper_requeues_or_fails_the_jobs_of_a_vanished_worker(
        start_redis_server, spawn, sqlite_url, tmp_path, image_bytes):
    """A worker that vanishes for good leaves jobs ``running`` with a stale heartbeat.

    The reaper of a live worker re-queues the one with attempts left (it then
    runs there: ``attempts`` == 2) and fails, with a reason, the one on its
    last attempt. Neither stays ``running``. While the vanished worker was
    still alive (its heartbeat fresh) the reaper left its job alone.
    """
    from shared.db.models import utcnow

    redis = start_redis_server("redis")
    stack = spawn("reaper", database_url=sqlite_url, redis_url=redis.url(), data_dir=tmp_path / "data",
                  queue_prefix="faults-reap", EBB_HEARTBEAT_TIMEOUT="4", EBB_REAP_INTERVAL="1",
                  EBB_MAX_ATTEMPTS="2")
    ghost = "vanished@nowhere"
    # No message for these jobs exists any more: the vanished worker had taken
    # them, and whatever it had unacknowledged is beyond reach.
    retry = stack.submit(image_bytes, config=SHORT, send=False)
    last = stack.submit(image_bytes, config=SHORT, send=False)
    long_ago = utcnow() - timedelta(minutes=5)
    set_job(sqlite_url, last, status="running", attempts=2, started_at=long_ago, heartbeat_at=long_ago,
            worker_hostname=ghost, progress_iteration=3)

    # The ghost worker is alive for a while: its heartbeat keeps the reaper off.
    alive_until = time.monotonic() + 5
    set_job(sqlite_url, retry, status="running", attempts=1, started_at=utcnow(), heartbeat_at=utcnow(),
            worker_hostname=ghost, progress_iteration=2)
    while time.monotonic() < alive_until:
        set_job(sqlite_url, retry, heartbeat_at=utcnow())
        time.sleep(0.25)
    still = stack.job(retry)
    assert (still.status, still.attempts, still.worker_hostname) == ("running", 1, ghost)
    vanished = time.monotonic()  # ...and then it is gone

    failed = stack.wait(last, timeout=30)
    assert failed.status == "failed"
    assert "stopped responding" in failed.error and "after 2 attempts" in failed.error, failed.error
    assert failed.finished_at is not None

    job = stack.wait(retry, timeout=120)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    assert job.worker_hostname.startswith(node(stack))
    assert job.progress_iteration == job.progress_total
    assert_artifacts_complete(stack, retry)
    assert "re-queued" in stack.worker.log_text()
    assert not (stack.storage.job_dir(last)).exists()
    assert {j.status for j in all_jobs(sqlite_url).values()} == {"succeeded", "failed"}
    print(f"\nvanished worker: job re-run and done {time.monotonic() - vanished:.1f} s after the last heartbeat")


# --------------------------------------------------------------------------- 6. web restart


def test_web_restart_loses_nothing_in_flight(start_redis_server, spawn, start_gunicorn, sqlite_url, tmp_path,
                                             image_bytes):
    """``gunicorn web.wsgi:app`` is killed (SIGKILL, master and workers) and restarted.

    Jobs accepted before, one running and three queued, all complete; the
    restarted web returns every one of them, its artifacts, and accepts new
    jobs.
    """
    import requests

    redis = start_redis_server("redis")
    stack = spawn("web-restart", wait=False, database_url=sqlite_url, redis_url=redis.url(),
                  data_dir=tmp_path / "data", queue_prefix=f"faults-web-{uuid.uuid4().hex[:6]}",
                  EBB_MAX_BATCH="1")
    web_env = {**os.environ, **_web_env(stack)}
    web = start_gunicorn(web_env)
    web.wait_ready()
    stack.worker.wait_ready()

    def post(base: str, config: dict[str, Any]) -> uuid.UUID:
        response = requests.post(f"{base}/api/v1/jobs", data=_form(config),
                                 files={"image": ("flute.jpg", image_bytes)}, timeout=30)
        assert response.status_code == 202, response.text
        return uuid.UUID(response.json()["id"])

    accepted = [post(web.base_url, LONG)] + [post(web.base_url, SHORT) for _ in range(3)]
    running_with_progress(stack, accepted[0])
    assert any(j.status == "queued" for j in all_jobs(sqlite_url).values())

    web.kill(signal.SIGKILL)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{web.base_url}/healthz", timeout=2)
    restarted = start_gunicorn(web_env, port=web.port, name="gunicorn-again")
    restart_s = restarted.wait_ready()
    accepted.append(post(restarted.base_url, SHORT))

    for job_id in accepted:
        deadline = time.monotonic() + 150
        while True:
            response = requests.get(f"{restarted.base_url}/api/v1/jobs/{job_id}", timeout=10)
            assert response.status_code == 200, response.text
            body = response.json()
            if body["status"] in TERMINAL:
                break
            assert time.monotonic() < deadline, f"job {job_id} still {body['status']}:\n{stack.worker.tail()}"
            time.sleep(0.2)
        assert body["status"] == "succeeded", body["error"]
        assert body["attempts"] == 1
        artifact = requests.get(f"{restarted.base_url}{body['artifacts']['result_json']}", timeout=10)
        assert artifact.status_code == 200 and artifact.json()["artifacts"]
        assert_artifacts_complete(stack, job_id)
    listed = requests.get(f"{restarted.base_url}/api/v1/jobs", params={"limit": 100}, timeout=10).json()
    assert {j["id"] for j in listed["jobs"]} == {str(j) for j in accepted}
    assert set(all_jobs(sqlite_url)) == set(accepted)
    print(f"\nweb restart: gunicorn back in {restart_s:.1f} s; all {len(accepted)} jobs done")
