"""Migrations: Alembic takes an empty database to head (idempotently), the result is exactly
``storage.tables.metadata``, foreign databases are refused untouched, and an unreachable server is
StorageUnavailable. On fresh SQLite files and fresh MariaDB databases made (and dropped) here."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from storage import open_database
from storage.engine import Database
from storage.errors import SchemaError, StorageIntegrityError, StorageUnavailable
from storage.migrate import VERSION_TABLE, current_revision, head_revision, upgrade
from storage.tables import metadata
from tests import support
from tests.conftest import scratch_mysql_database

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "mysql"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database on each backend; a MariaDB one is dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
        return
    with scratch_mysql_database("leasehold_scratch") as url:
        yield url


@pytest.fixture
def fresh_db(fresh: str) -> Iterator[Database]:
    db = open_database(fresh)
    yield db
    db.dispose()


def _contents(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of the database with all its rows: 'untouched' means this is unchanged."""
    with db.engine.connect() as conn:
        names = sorted(inspect(conn).get_table_names())
        return {
            name: sorted(tuple(r) for r in conn.execute(text(f"SELECT * FROM {name}")))
            for name in names
        }


def test_upgrade_goes_from_empty_to_head_and_is_idempotent(fresh_db: Database) -> None:
    head = head_revision()
    assert current_revision(fresh_db) is None
    assert upgrade(fresh_db) == (None, head)
    assert current_revision(fresh_db) == head
    assert upgrade(fresh_db) == (head, head)
    assert upgrade(fresh_db) == (head, head)
    with fresh_db.engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
    assert tables == set(metadata.tables) | {VERSION_TABLE}


def test_migrated_schema_matches_the_tables_module(fresh_db: Database) -> None:
    upgrade(fresh_db)
    with fresh_db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diff = compare_metadata(context, metadata)
    # Nothing needs ignoring: the migration writes out the same names (naming convention),
    # types (dialect variants), server defaults, indexes, unique and foreign keys.
    assert diff == []


def test_migrated_schema_has_the_reclaim_index_and_constraints(fresh_db: Database) -> None:
    upgrade(fresh_db)
    with fresh_db.engine.connect() as conn:
        inspector = inspect(conn)
        indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes("applies")}
        assert indexes["ix_applies_state_heartbeat_at"] == ["state", "heartbeat_at"]
        uniques = {
            tuple(u["column_names"]) for u in inspector.get_unique_constraints("control_requests")
        }
        assert ("apply_id", "pending_action") in uniques
        fks = inspector.get_foreign_keys("apply_logs")
        assert [(f["referred_table"], f["constrained_columns"]) for f in fks] == [
            ("applies", ["apply_id"])
        ]


def test_at_most_one_pending_control_request_per_action(db: Database) -> None:
    apply_id = support.new_apply(db)
    support.insert_control_request(db, apply_id, action="stop")
    support.insert_control_request(db, apply_id, action="cancel")
    before = support.snapshot(db)
    with pytest.raises(StorageIntegrityError):
        support.insert_control_request(db, apply_id, action="stop")
    assert support.snapshot(db) == before
    # Finished requests no longer count: a new pending one of the same action is fine.
    support.insert_control_request(db, apply_id, action="stop", state="completed")
    support.insert_control_request(db, apply_id, action="resume", state="failed")
    support.insert_control_request(db, apply_id, action="resume", state="failed")
    support.insert_control_request(db, apply_id, action="resume")


def _foreign(db: Database, table: str) -> None:
    with db.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(20))"))
        conn.execute(text(f"INSERT INTO {table} (id, name) VALUES (1, 'keep me')"))


@pytest.mark.parametrize("table", ["customers", "applies"])
def test_upgrade_refuses_a_foreign_database_and_leaves_it_untouched(
    fresh_db: Database, table: str
) -> None:
    _foreign(fresh_db, table)
    before = _contents(fresh_db)
    with pytest.raises(SchemaError, match="foreign database") as caught:
        upgrade(fresh_db)
    assert table in str(caught.value) or "none of leasehold's" in str(caught.value)
    assert _contents(fresh_db) == before
    assert VERSION_TABLE not in before


def test_upgrade_refuses_a_revision_it_does_not_know(fresh_db: Database) -> None:
    upgrade(fresh_db)
    with fresh_db.engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'f00dfacecafe'"))
    before = _contents(fresh_db)
    with pytest.raises(SchemaError, match="f00dfacecafe"):
        upgrade(fresh_db)
    assert _contents(fresh_db) == before


@pytest.mark.parametrize(
    "url",
    [
        "mysql+mysqldb://root:s3cret@127.0.0.1:1/leasehold",
        "sqlite:///{tmp}/no/such/dir/leasehold.sqlite3",
    ],
    ids=["mysql_closed_port", "sqlite_missing_dir"],
)
def test_unreachable_database_is_storage_unavailable(tmp_path: Path, url: str) -> None:
    db = open_database(url.format(tmp=tmp_path))
    try:
        with pytest.raises(StorageUnavailable) as caught:
            upgrade(db)
        assert "s3cret" not in str(caught.value)
        with pytest.raises(StorageUnavailable):
            current_revision(db)
    finally:
        db.dispose()
    assert not (tmp_path / "no").exists()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASEHOLD_")}
    env.update(extra)
    return env


def test_alembic_upgrade_head_from_the_repo_root(fresh: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=_clean_env(LEASEHOLD_DATABASE_URL=fresh),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    db = open_database(fresh)
    try:
        head = head_revision()
        assert current_revision(db) == head
        assert upgrade(db) == (head, head)  # leasehold migrate agrees it is done
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        db.dispose()
