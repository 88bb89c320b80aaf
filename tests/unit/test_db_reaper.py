"""worker.reaper: stale running jobs are re-queued or failed; lost queued jobs re-sent."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from shared.db.migrations import upgrade_database
from shared.db.models import Job, utcnow
from shared.db.session import session_scope
from worker.reaper import reap_stale_jobs


@pytest.fixture
def url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'reap.sqlite3'}"
    upgrade_database(url)
    return url


def add(url: str, **values) -> uuid.UUID:
    now = utcnow()
    row = dict(id=uuid.uuid4(), status="queued", model="m", config={}, image_sha256="a" * 64,
               image_width=1, image_height=1, image_filename="x", progress_iteration=0, progress_total=10,
               cancel_requested=False, attempts=0, created_at=now, enqueued_at=now)
    row.update(values)
    with session_scope(url) as s:
        s.add(Job(**row))
    return row["id"]


def get(url: str, job_id: uuid.UUID) -> Job:
    with session_scope(url) as s:
        return s.get(Job, job_id)


def reap(url: str, **kwargs):
    sent: list[tuple[uuid.UUID, str]] = []
    kwargs.setdefault("send", lambda job_id, model: sent.append((job_id, model)))
    with session_scope(url) as s:
        report = reap_stale_jobs(s, kwargs.pop("timeout", 60), **kwargs)
    return report, sent


def test_stale_running_job_is_requeued_and_resent(url):
    old = utcnow() - timedelta(seconds=300)
    job_id = add(url, status="running", attempts=1, started_at=old, heartbeat_at=old, model="vgg19")
    report, sent = reap(url)
    assert report.requeued == [job_id] and sent == [(job_id, "vgg19")]
    job = get(url, job_id)
    assert job.status == "queued" and job.heartbeat_at is None and job.enqueued_at is not None
    # Compare-and-set: a second pass (or another worker's reaper) does nothing more.
    report, sent = reap(url)
    assert not report and sent == []


def test_stale_job_without_attempts_left_fails_with_a_reason(url):
    old = utcnow() - timedelta(seconds=300)
    job_id = add(url, status="running", attempts=3, started_at=old, heartbeat_at=old)
    report, sent = reap(url, max_attempts=3)
    assert report.failed == [job_id] and sent == []
    job = get(url, job_id)
    assert job.status == "failed" and "stopped responding" in job.error and "3 attempts" in job.error
    assert job.finished_at is not None


def test_running_job_without_heartbeat_uses_started_at(url):
    old = utcnow() - timedelta(seconds=300)
    job_id = add(url, status="running", attempts=1, started_at=old, heartbeat_at=None)
    report, _ = reap(url)
    assert report.requeued == [job_id]


def test_fresh_and_terminal_jobs_are_left_alone(url):
    now = utcnow()
    old = now - timedelta(seconds=300)
    fresh = add(url, status="running", attempts=1, started_at=old, heartbeat_at=now)
    done = add(url, status="succeeded", attempts=1, started_at=old, heartbeat_at=old, created_at=old,
               enqueued_at=old)
    queued = add(url)
    report, sent = reap(url)
    assert not report and sent == []
    assert get(url, fresh).status == "running"
    assert get(url, done).status == "succeeded"
    assert get(url, queued).status == "queued"


def test_long_queued_job_is_resent_once_per_period(url):
    old = utcnow() - timedelta(hours=1)
    job_id = add(url, created_at=old, enqueued_at=old)
    report, sent = reap(url, requeue_queued_after_s=600)
    assert report.resent == [job_id] and sent == [(job_id, "m")]
    assert get(url, job_id).status == "queued"
    report, sent = reap(url, requeue_queued_after_s=600)
    assert not report.resent and sent == []
    report, sent = reap(url, requeue_queued_after_s=None)
    assert sent == []


def test_queued_job_nobody_takes_eventually_fails(url):
    ancient = utcnow() - timedelta(days=2)
    job_id = add(url, created_at=ancient, enqueued_at=ancient)
    report, sent = reap(url)
    assert report.failed == [job_id] and sent == []
    assert "no worker" in get(url, job_id).error


def test_queued_job_with_cancel_request_becomes_cancelled(url):
    job_id = add(url, cancel_requested=True)
    report, _ = reap(url)
    assert report.cancelled == [job_id]
    assert get(url, job_id).status == "cancelled"


def test_send_failure_keeps_the_job_queued(url):
    old = utcnow() - timedelta(seconds=300)
    job_id = add(url, status="running", attempts=1, started_at=old, heartbeat_at=old)

    def broken(job_id, model):
        raise ConnectionError("redis down")

    report, _ = reap(url, send=broken)
    assert report.requeued == [job_id]
    assert get(url, job_id).status == "queued"  # a later pass re-sends it


def test_timeout_must_be_positive(url):
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        reap(url, timeout=0)


def test_summary_text(url):
    report, _ = reap(url)
    assert report.summary() == "requeued 0, failed 0, resent 0, cancelled 0"


def test_resend_period_comes_from_the_environment():
    from worker.reaper import DEFAULT_REQUEUE_QUEUED_AFTER_S, resend_queued_after_s

    assert resend_queued_after_s({}) == DEFAULT_REQUEUE_QUEUED_AFTER_S
    assert resend_queued_after_s({"EBB_RESEND_QUEUED_AFTER": "90"}) == 90.0
    assert resend_queued_after_s({"EBB_RESEND_QUEUED_AFTER": "0"}) is None  # never re-send
    for bad in ("soon", "-5", "nan"):
        with pytest.raises(ValueError, match="EBB_RESEND_QUEUED_AFTER"):
            resend_queued_after_s({"EBB_RESEND_QUEUED_AFTER": bad})


def test_sweep_removes_only_old_leftover_folders(tmp_path):
    import os
    import time

    from worker.reaper import sweep_leftovers

    jobs = tmp_path / "jobs"
    old_tmp, old_old, young, real = (jobs / ".a.tmp-x1", jobs / ".b.old-y2", jobs / ".c.tmp-z3", jobs / "d")
    for folder in (old_tmp, old_old, young, real):
        folder.mkdir(parents=True)
        (folder / "mask.png").write_bytes(b"x")
    hour_ago = time.time() - 3700
    for folder in (old_tmp, old_old, real):
        os.utime(folder, (hour_ago, hour_ago))
    removed = sweep_leftovers(jobs)
    assert sorted(p.name for p in removed) == [".a.tmp-x1", ".b.old-y2"]
    assert sorted(p.name for p in jobs.iterdir()) == [".c.tmp-z3", "d"]  # in-progress and real kept
    assert sweep_leftovers(tmp_path / "missing") == []


# --------------------------------------------------------------------------- issue 10: only when the worker is gone


def test_stale_job_of_a_live_worker_is_left_alone(url):
    old = utcnow() - timedelta(seconds=300)
    job_id = add(url, status="running", attempts=1, started_at=old, heartbeat_at=old, worker_hostname="w@box")
    asked = []

    def alive(hostname, started):
        asked.append((hostname, started is not None))
        return hostname == "w@box"

    report, sent = reap(url, alive=alive)
    assert not report and sent == [] and asked == [("w@box", True)]
    assert get(url, job_id).status == "running"
    report, sent = reap(url, alive=lambda hostname, started: False)  # now it is gone
    assert report.requeued == [job_id] and sent == [(job_id, "m")]


def test_requeued_job_restarts_its_progress_at_zero(url):
    old = utcnow() - timedelta(seconds=300)
    job_id = add(url, status="running", attempts=1, started_at=old, heartbeat_at=old, progress_iteration=7,
                 current_score=0.4, live=[{"iteration": 7}])
    reap(url)
    job = get(url, job_id)
    assert (job.status, job.progress_iteration, job.current_score, job.live) == ("queued", 0, None, None)


def test_fleet_liveness_reads_the_records_and_spots_a_restarted_namesake():
    import json
    from datetime import datetime, timezone

    from worker.reaper import fleet_liveness

    started = datetime(2026, 12, 1, 10, 0, 0, tzinfo=timezone.utc)

    class Records:  # the two calls fleet.list_workers makes, over a fixed set of records
        data = {"explain-workers:w@box": json.dumps({"hostname": "w@box", "model": "m",
                                                     "started_at": "2026-12-01T10:00:00Z"})}

        def scan_iter(self, match, count):
            return [k for k in self.data if k.startswith(match.rstrip("*"))]

        def mget(self, keys):
            return [self.data[k] for k in keys]

    alive = fleet_liveness(Records(), {})
    assert alive("w@box", started + timedelta(minutes=1))  # claimed by this process
    assert not alive("w@box", started - timedelta(minutes=1))  # claimed by the process before it
    assert alive("w@box", None)
    assert not alive("gone@box", started + timedelta(minutes=1))
    assert not alive(None, None)


def test_reconcile_settings_come_from_the_environment():
    from shared import settings

    s = settings.load({})
    assert (s.reconcile_interval_s, s.resend_queued_after_s, s.test_slow_scoring_s) == (15.0, 20.0, 0.0)
    s = settings.load({"EBB_RECONCILE_INTERVAL": "2.5", "EBB_RESEND_QUEUED_AFTER": "0"})
    assert (s.reconcile_interval_s, s.resend_queued_after_s) == (2.5, None)
    for name in ("EBB_RECONCILE_INTERVAL", "EBB_RESEND_QUEUED_AFTER"):
        for bad in ("soon", "-1", "inf"):
            with pytest.raises(ValueError, match=name):
                settings.load({name: bad})


def test_message_job_id_reads_queue_and_unacked_entries():
    import json

    from worker.reconcile import message_job_id, queue_keys

    message = {"headers": {"id": "abc"}, "properties": {"correlation_id": "abc"}, "body": ""}
    assert message_job_id(json.dumps(message)) == "abc"
    assert message_job_id(json.dumps([message, "", "q"])) == "abc"  # an ``unacked`` entry
    assert message_job_id(json.dumps({"properties": {"correlation_id": "x"}})) == "x"
    assert message_job_id(b"not json") is None and message_job_id(json.dumps({"headers": {}})) is None
    assert queue_keys("vgg19", {"EBB_QUEUE_PREFIX": "p"}) == ["p.vgg19", "p.vgg19\x06\x163", "p.vgg19\x06\x166",
                                                             "p.vgg19\x06\x169"]
