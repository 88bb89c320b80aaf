"""Alembic migrations: in-code config, idempotent and concurrent upgrades, no drift."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from shared.db.migrations import alembic_config, current_revision, head_revision, upgrade_database
from shared.db.models import Base
from shared.db.session import get_engine

REPO_ROOT = Path(__file__).resolve().parents[2]


def schema_drift(url: str) -> list:
    """Differences between the migrated database and the models (empty = none)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_head_is_a_single_revision():
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    assert heads == [head_revision()]


def test_upgrade_creates_the_schema_of_the_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.sqlite3'}"
    assert upgrade_database(url) == head_revision()
    assert "jobs" in inspect(get_engine(url)).get_table_names()
    assert schema_drift(url) == [], "models changed without a migration: add one in shared/db/migrations/versions"


def test_upgrade_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'b.sqlite3'}"
    upgrade_database(url)
    with get_engine(url).begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, status, model, config, image_sha256, image_width, image_height, "
            "image_filename, progress_iteration, progress_total, cancel_requested, created_at, attempts) "
            "VALUES ('0123456789abcdef0123456789abcdef', 'queued', 'm', '{}', 'x', 1, 1, 'f', 0, 1, 0, "
            "'2024-01-01 00:00:00', 0)"))
    assert upgrade_database(url, force=True) == head_revision()
    assert upgrade_database(url) == head_revision()  # cached
    with get_engine(url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 1
        assert current_revision(conn) == head_revision()


def test_downgrade_to_base_and_back(tmp_path):
    from alembic import command

    url = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    upgrade_database(url)
    command.downgrade(alembic_config(url), "base")
    assert "jobs" not in inspect(get_engine(url)).get_table_names()
    upgrade_database(url, force=True)
    assert "jobs" in inspect(get_engine(url)).get_table_names()


def test_concurrent_upgrades_from_fresh_processes(tmp_path):
    """Several processes starting together on one new SQLite file: all succeed."""
    url = f"sqlite:///{tmp_path / 'race.sqlite3'}"
    env = {**os.environ, "DATABASE_URL": url}
    procs = [
        subprocess.Popen([sys.executable, "-m", "shared.cli", "db", "upgrade"], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert all(f"revision {head_revision()}" in out for out in outputs), outputs
    assert schema_drift(url) == []


def test_cli_db_commands_work_from_any_directory(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    env = {**os.environ, "DATABASE_URL": url}
    behind = subprocess.run([sys.executable, "-m", "shared.cli", "db", "current"], env=env, cwd="/",
                            capture_output=True, text=True, timeout=120)
    assert behind.returncode == 1 and "(empty)" in behind.stdout
    up = subprocess.run([sys.executable, "-m", "shared.cli", "db", "upgrade"], env=env, cwd="/",
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    current = subprocess.run([sys.executable, "-m", "shared.cli", "db", "current"], env=env, cwd="/",
                             capture_output=True, text=True, timeout=120)
    assert current.returncode == 0 and f"current: {head_revision()}" in current.stdout


def test_migrations_ship_with_the_package():
    folder = Path(alembic_config("sqlite://").get_main_option("script_location"))
    assert (folder / "env.py").is_file() and (folder / "script.py.mako").is_file()
    assert list((folder / "versions").glob("0001_*.py"))


@pytest.mark.parametrize("argv", [["db"], []])
def test_cli_requires_a_subcommand(argv):
    from shared.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)

