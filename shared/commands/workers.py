"""``ebb workers``: the service's worker fleet as a table (``GET /api/v1/workers``)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import Any, Sequence

from shared.commands.submit import add_connection_arguments

#: (header, right-aligned) of the table's columns, in order.
COLUMNS: tuple[tuple[str, bool], ...] = (
    ("HOSTNAME", False), ("MODEL", False), ("DEVICE", False), ("PRECISION", False),
    ("BATCH", True), ("RUNNING", True), ("DONE", True), ("IT/S", True),
    ("UP", True), ("LAST SEEN", True), ("VERSION", False),
)
#: What ``ebb workers`` prints when no worker is connected.
EMPTY_FLEET = "no workers are connected"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ebb workers`` to the ``ebb`` parser."""
    p = subparsers.add_parser("workers", help="list the service's workers (a table)",
                              description="Print the workers connected to the service at --url.")
    add_connection_arguments(p)
    p.set_defaults(func=run)


def parse_time(value: Any) -> datetime | None:
    """An ISO-8601 timestamp as an aware datetime (naive = UTC); None if unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def format_duration(seconds: float) -> str:
    """A short duration: ``42s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _since(value: Any, now: datetime, suffix: str = "") -> str:
    when = parse_time(value)
    return "-" if when is None else format_duration((now - when).total_seconds()) + suffix


def worker_row(worker: dict[str, Any], now: datetime) -> list[str]:
    """The table cells of one worker (see :data:`COLUMNS`)."""
    rate = worker.get("iterations_per_s")
    return [
        _cell(worker.get("hostname")),
        _cell(worker.get("model")),
        _cell(worker.get("device")),
        _cell(worker.get("precision")),
        _cell(worker.get("max_batch")),
        _cell(worker.get("running_jobs")),
        _cell(worker.get("jobs_done")),
        f"{rate:.1f}" if isinstance(rate, (int, float)) and not isinstance(rate, bool) else "-",
        _since(worker.get("started_at"), now),
        _since(worker.get("last_seen"), now, " ago"),
        _cell(worker.get("version")),
    ]


def format_workers_table(workers: Sequence[dict[str, Any]], now: datetime | None = None) -> str:
    """``workers`` (the API's dicts) as an aligned text table, sorted by model
    then hostname; :data:`EMPTY_FLEET` when there are none."""
    if not workers:
        return EMPTY_FLEET
    now = now or datetime.now(timezone.utc)
    ordered = sorted(workers, key=lambda w: (str(w.get("model") or ""), str(w.get("hostname") or "")))
    rows = [[header for header, _ in COLUMNS]] + [worker_row(w, now) for w in ordered]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for row in rows:
        cells = [cell.rjust(width) if right else cell.ljust(width)
                 for cell, width, (_, right) in zip(row, widths, COLUMNS)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Handle ``ebb workers``."""
    from shared.client import ExplainClient, ExplainClientError

    try:
        workers = ExplainClient(args.url, args.token).workers()
    except ExplainClientError as error:
        print(f"ebb workers: error: {error}", file=sys.stderr)
        return 2
    print(format_workers_table(workers))
    return 0
