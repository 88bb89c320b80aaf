"""Prometheus metrics that both the web and the workers update (one definition
per process: a test or an embedding process may import both sides).

``ebb_jobs_finished_total{model,status}``: jobs that ended, by final status
(``succeeded``, ``failed``, ``cancelled``). A worker counts the jobs it ends;
the web counts the queued jobs it cancels itself (no worker ever runs them).
Summed over every scraped process it is the service's total.
"""

from __future__ import annotations

from prometheus_client import Counter

JOBS_FINISHED = Counter(
    "ebb_jobs_finished",
    "Jobs that ended, by final status (succeeded, failed, cancelled); the workers count the jobs "
    "they end, the web the queued jobs it cancels itself.",
    ["model", "status"])
