"""Worker start-up: the model loads once, before consuming, however long it takes."""

from __future__ import annotations

import pytest

from .conftest import build_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.timeout(600)]

SLOW_LOAD_S = 6


def test_slow_model_load_still_serves_jobs(start_worker, sqlite_url, redis_url, queue_prefix,
                                           image_bytes, tmp_path):
    stack = build_stack(start_worker, database_url=sqlite_url, redis_url=redis_url,
                        data_dir=tmp_path / "data", queue_prefix=f"{queue_prefix}.slow", name="slow",
                        wait=False, EBB_TEST_SLOW_LOAD_SECONDS=str(SLOW_LOAD_S))
    # Queued before the worker is up: it must wait for the model, not fail.
    job_id = stack.submit(image_bytes)
    ready_after = stack.worker.wait_ready()
    assert ready_after >= SLOW_LOAD_S, f"worker ready after {ready_after:.1f} s"

    job = stack.wait(job_id)
    assert job.status == "succeeded", job.error
    log = stack.worker.log_text()
    # The model was loaded exactly once, in the main process, before consuming.
    assert log.count("loading model efficientnet_lite0") == 1, log
    assert log.index("model efficientnet_lite0 ready") < log.index(" ready."), log
    assert "worker_proc_alive_timeout" not in log and "Timed out waiting for UP message" not in log


def test_unknown_model_exits_before_consuming(start_worker, sqlite_url, redis_url, queue_prefix, tmp_path):
    stack = build_stack(start_worker, database_url=sqlite_url, redis_url=redis_url,
                        data_dir=tmp_path / "data", queue_prefix=f"{queue_prefix}.bad", name="bad",
                        wait=False, EBB_MODEL="no_such_model")
    code = wait_for(lambda: stack.worker.proc.poll() is not None and (stack.worker.proc.returncode,),
                    timeout=90, what="the worker to exit")[0]
    log = stack.worker.log_text()
    assert code != 0, log
    assert "start-up failed" in log, log
    assert " ready." not in log, log
