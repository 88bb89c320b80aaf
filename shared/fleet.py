"""The fleet: which workers are alive, what they serve and how fast they go.

Every worker publishes a heartbeat (:func:`publish`) every few seconds: a
JSON record under the Redis key ``<EBB_QUEUE_PREFIX>-workers:<hostname>``
that expires after :data:`TTL_INTERVALS` missed intervals, so a worker that
dies disappears on its own; a worker that stops cleanly removes its key
(:func:`withdraw`). The web reads them back with :func:`list_workers`.

A record (all JSON, see :class:`WorkerInfo`)::

    {"hostname": "vgg19.gpu0@box", "model": "vgg19", "device": "NVIDIA H200",
     "precision": "fp32", "max_batch": 64, "running_jobs": 3, "jobs_done": 120,
     "iterations_per_s": 410.5, "busy_iterations_per_s": 455.0,
     "started_at": "2026-12-01T10:00:00Z", "last_seen": "2026-12-01T10:05:03Z",
     "version": "0.1.0"}

``iterations_per_s`` counts mask-iterations (one job's mask stepped once) over
the last minute; ``busy_iterations_per_s`` is the same count divided by the
time the worker was actually stepping, which is what a queued job can expect
(an idle worker has ``iterations_per_s`` 0 but still its busy rate).

Nothing here imports torch, Flask or Celery; only ``redis``.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, TypedDict

log = logging.getLogger(__name__)

#: Seconds between two heartbeats of a worker (``EBB_FLEET_INTERVAL``).
DEFAULT_INTERVAL_S = 3.0
#: A record expires after this many intervals without a heartbeat.
TTL_INTERVALS = 2.5


class WorkerInfo(TypedDict):
    """One worker's heartbeat record (the ``GET /api/v1/workers`` items)."""

    hostname: str
    model: str
    device: str
    precision: str
    max_batch: int
    running_jobs: int
    jobs_done: int
    iterations_per_s: float
    busy_iterations_per_s: float
    started_at: str
    last_seen: str
    version: str


def interval_s(environ: Mapping[str, str] | None = None) -> float:
    """``EBB_FLEET_INTERVAL`` (seconds between heartbeats, > 0), default 3."""
    env = os.environ if environ is None else environ
    raw = env.get("EBB_FLEET_INTERVAL")
    if raw in (None, ""):
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"EBB_FLEET_INTERVAL must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"EBB_FLEET_INTERVAL must be positive, got {raw!r}")
    return value


def key_prefix(environ: Mapping[str, str] | None = None) -> str:
    """``<EBB_QUEUE_PREFIX>-workers:`` (``explain-workers:`` by default)."""
    env = os.environ if environ is None else environ
    return f"{env.get('EBB_QUEUE_PREFIX') or 'explain'}-workers:"


def utc_iso(moment: datetime | None = None) -> str:
    """``2026-12-01T10:00:00Z`` (seconds precision) for ``moment`` (default now)."""
    moment = (moment or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def publish(client: Any, info: Mapping[str, Any], interval: float,
            environ: Mapping[str, str] | None = None) -> None:
    """Write ``info`` (a :class:`WorkerInfo` without ``last_seen``) with an
    expiry of :data:`TTL_INTERVALS` × ``interval`` seconds."""
    record = {**info, "last_seen": utc_iso()}
    ttl_ms = max(1000, int(interval * TTL_INTERVALS * 1000))
    client.set(key_prefix(environ) + str(info["hostname"]), json.dumps(record), px=ttl_ms)


def withdraw(client: Any, hostname: str, environ: Mapping[str, str] | None = None) -> None:
    """Remove ``hostname``'s record at once (a clean shutdown)."""
    client.delete(key_prefix(environ) + hostname)


def list_workers(client: Any, environ: Mapping[str, str] | None = None) -> list[WorkerInfo]:
    """Every live worker's record, sorted by model then hostname.

    Records that do not parse are skipped (and logged), never raised.
    """
    prefix = key_prefix(environ)
    keys = sorted(client.scan_iter(match=prefix + "*", count=500))
    if not keys:
        return []
    out: list[WorkerInfo] = []
    for key, raw in zip(keys, client.mget(keys)):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("model"), str):
                raise ValueError("not a worker record")
        except ValueError as exc:
            log.warning("ignoring unreadable worker record %r: %s", key, exc)
            continue
        out.append(record)  # type: ignore[arg-type]
    out.sort(key=lambda w: (w.get("model", ""), w.get("hostname", "")))
    return out


def workers_by_model(workers: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """``{model: number of live workers}``."""
    counts: dict[str, int] = {}
    for worker in workers:
        counts[str(worker.get("model"))] = counts.get(str(worker.get("model")), 0) + 1
    return counts


def model_rate(workers: Iterable[Mapping[str, Any]], model: str) -> float | None:
    """Mask-iterations per second that ``model``'s workers deliver when busy
    (the sum of their ``busy_iterations_per_s``); ``None`` when no worker of
    ``model`` has measured one yet."""
    rates = [float(w.get("busy_iterations_per_s") or 0.0) for w in workers if w.get("model") == model]
    total = sum(r for r in rates if r > 0)
    return total if total > 0 else None
