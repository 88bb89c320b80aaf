"""Fuzz the JSON API from its own OpenAPI document with schemathesis: no input,
valid or not, may produce a server error (5xx).

The app runs in-process (``schemathesis.openapi.from_wsgi``) on a temporary
SQLite file and the real Redis (database 7, a queue/counter prefix unique to
the run; only its keys are deleted), with API tokens on so the authenticated
path is the one exercised. Generation is derandomized (fixed seed) and bounded
(``max_examples`` per operation and generation phase) so the run is
reproducible and takes well under a minute.

Only the ``not_a_server_error`` check runs: ``positive_data_acceptance`` and
``negative_data_rejection`` report unavoidable false positives here (a
schema-valid upload that is not an image is rightly a 400; a "negative" value
such as an unknown form field is rightly ignored).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from web.testing import app_env, delete_keys, redis_available  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REDIS_DB = 7
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PREFIX = f"ebbtest-fuzz{REDIS_DB}-{uuid.uuid4().hex[:8]}"
TOKEN = "fuzz-token-" + uuid.uuid4().hex
MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory) -> Iterator:
    problem = redis_available(REDIS_URL)
    if problem:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {problem}")
    from web import create_app

    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    env = app_env(data_dir, REDIS_DB, EBB_QUEUE_PREFIX=PREFIX, EBB_API_TOKENS=f"fuzz-lab:{TOKEN}",  # a named owner: the owner filters run
                  EBB_RATE_LIMIT="100000/minute")
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)  # queue_for() reads EBB_QUEUE_PREFIX at request time
    app = create_app({"TESTING": True, "EBB_ENV": env})
    app.config["PROPAGATE_EXCEPTIONS"] = False  # a bug must come back as a 500, not raise
    try:
        yield app
    finally:
        app.extensions["ebb"].session_factory.kw["bind"].dispose()
        patch.undo()
        delete_keys(REDIS_URL, PREFIX)


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", fuzz_app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # fixed seed: the same cases every run
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_never_answers_5xx(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"},
                           checks=[not_a_server_error])
