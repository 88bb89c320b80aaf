"""Alembic migrations of the job database, configured in code (no ``alembic.ini``).

:func:`upgrade_database` brings a database to the newest revision. It is what
``ebb db upgrade`` runs and what every start-up path (web, worker, ``ebb run``)
calls first. It is idempotent and safe when several processes start together:
PostgreSQL upgrades hold an advisory lock, SQLite upgrades an exclusive file
lock next to the database file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Iterator

from sqlalchemy import Connection, text

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent
#: Arbitrary 64-bit key of the PostgreSQL advisory lock held while upgrading.
PG_LOCK_KEY = 0x65_62_62_5F_64_62  # "ebb_db"

_upgraded: set[str] = set()
_upgraded_lock = threading.Lock()


def alembic_config(url: str | None = None, connection: Connection | None = None):
    """An ``alembic.config.Config`` for this package's migrations.

    Works from any working directory. ``connection``, when given, is used by
    ``env.py`` instead of opening a new one.
    """
    from alembic.config import Config

    from shared.db.session import _resolve_url

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic's config is an INI parser: escape '%' in passwords.
    config.set_main_option("sqlalchemy.url", _resolve_url(url).replace("%", "%%"))
    config.attributes["configure_logger"] = False
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision shipped with the code."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The revision ``connection``'s database is at (``None`` when empty)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX ``flock``; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def upgrade_database(url: str | None = None, revision: str = "head", *, force: bool = False) -> str | None:
    """Apply migrations to ``url`` (default ``DATABASE_URL``) up to ``revision``.

    Safe to call from many processes at once, and cheap to call again (a
    process remembers which URLs it already brought to head; ``force``
    re-checks). Returns the revision the database is at afterwards.
    """
    from alembic import command

    from shared.db.session import _resolve_url, get_engine, is_sqlite, sqlite_path

    url = _resolve_url(url)
    if revision == "head" and not force:
        with _upgraded_lock:
            if url in _upgraded:
                return head_revision()

    engine = get_engine(url)
    lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None:
            lock = _file_lock(path.with_name(path.name + ".migrate-lock"))
    with lock, engine.connect() as connection:
        postgres = connection.dialect.name == "postgresql"
        if postgres:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_LOCK_KEY})
            connection.commit()
        try:
            before = current_revision(connection)
            command.upgrade(alembic_config(url, connection), revision)
            connection.commit()
            after = current_revision(connection)
        finally:
            if postgres:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_LOCK_KEY})
                connection.commit()
    if before != after:
        log.info("database upgraded from %s to %s", before or "empty", after)
    else:
        log.debug("database already at %s", after)
    if revision == "head":
        with _upgraded_lock:
            _upgraded.add(url)
    return after
