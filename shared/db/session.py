"""Engines, sessions and retries for the job database.

Engines are cached per URL (one pool per process and database). SQLite gets
WAL journalling and a busy timeout so the web and the worker can share one
file; PostgreSQL gets ``pool_pre_ping`` so connections killed by a server
restart are replaced transparently. :func:`retrying` re-runs a unit of work
after a dropped connection or a locked database, with exponential backoff: the
worker wraps its writes in it so a job survives a short database outage.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

T = TypeVar("T")

#: SQLite busy timeout: how long a writer waits for another's lock.
SQLITE_BUSY_TIMEOUT_MS = 30_000

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}


def _resolve_url(url: str | None) -> str:
    if url:
        return str(url)
    from shared import settings

    return settings.load().database_url


def is_sqlite(url: str) -> bool:
    """Whether ``url`` names a SQLite database."""
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite ``url``; ``None`` for in-memory databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    return Path(database)


def _set_sqlite_pragmas(dbapi_connection, connection_record) -> None:  # noqa: ARG001
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _create_engine(url: str) -> Engine:
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_recycle=1800)


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: ``DATABASE_URL``), created once.

    SQLite engines use WAL and a 30 s busy timeout (and create the file's
    folder); others use ``pool_pre_ping=True``.
    """
    key = _resolve_url(url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = _create_engine(key)
        return engine


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    """A cached ``sessionmaker`` bound to :func:`get_engine` of ``url``.

    Sessions do not expire objects on commit, so rows read in a session stay
    usable after it closes.
    """
    key = _resolve_url(url)
    engine = get_engine(key)
    with _lock:
        factory = _factories.get(key)
        if factory is None:
            factory = _factories[key] = sessionmaker(bind=engine, expire_on_commit=False)
        return factory


@contextlib.contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success, rolls back on error, and always closes."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Close every cached engine's pool (tests, or after a fork)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
        _factories.clear()
    for engine in engines:
        engine.dispose()


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is worth retrying: a lost connection or a locked database."""
    if isinstance(error, exc.DisconnectionError):
        return True
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        if isinstance(error, (exc.OperationalError, exc.InterfaceError)):
            return True
    return False


def retrying(
    fn: Callable[[], T],
    *,
    attempts: int = 8,
    base_delay: float = 0.1,
    max_delay: float = 5.0,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Call ``fn()`` and return its result, retrying transient database errors.

    ``OperationalError``/``InterfaceError`` and invalidated (disconnected)
    connections are retried up to ``attempts`` times in all, sleeping
    ``base_delay * 2**n`` (capped at ``max_delay``) in between, so the default
    rides out about 15 s of outage. Other errors propagate at once. ``fn``
    must be a whole unit of work (open its own transaction); pass
    ``on_retry`` (e.g. ``session.rollback``-ing) to reset state between tries.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - filtered below
            if not is_transient(error) or attempt == attempts:
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            log.warning(
                "database error (attempt %d/%d), retrying in %.1f s: %s",
                attempt, attempts, delay, str(error).splitlines()[0] if str(error) else type(error).__name__,
            )
            if on_retry is not None:
                try:
                    on_retry(error)
                except Exception:  # noqa: BLE001 - best effort reset
                    log.debug("on_retry hook failed", exc_info=True)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def upgrade(url: str | None = None) -> str | None:
    """Migrate ``url`` (default ``DATABASE_URL``) to the newest revision.

    Shortcut for :func:`shared.db.migrations.upgrade_database`: idempotent,
    safe when several processes start at once. Every start-up path calls it.
    """
    from shared.db.migrations import upgrade_database

    return upgrade_database(url)
