"""Migrations: Alembic takes an empty database to head (idempotently), the result is exactly
``storage.tables.metadata``, foreign databases are refused untouched, and an unreachable server is
StorageUnavailable. Concurrent ``leasehold migrate`` processes take turns under the store's
migration lock (SQLite's write lock, MariaDB's ``GET_LOCK``) and all succeed; ``require_head``
says exactly what is wrong with a store that is not at head. On fresh SQLite files and fresh
MariaDB databases made (and dropped) here."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, inspect, text
from sqlalchemy.engine import make_url

from storage import applies, open_database
from storage.audit import audit
from storage.database import Database, redact
from storage.errors import (
    ConfigurationError,
    SchemaError,
    StorageIntegrityError,
    StorageUnavailable,
)
from storage.migrate import (
    LOCK_PREFIX,
    VERSION_TABLE,
    advisory_lock_key,
    alembic_config,
    current_revision,
    head_revision,
    migration_lock_name,
    require_head,
    upgrade,
)
from storage.tables import metadata
from tests import support
from tests.celery_fixtures import unreachable, wait_until
from tests.conftest import scratch_mysql_database, scratch_postgres_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "mysql", "postgres"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database on each backend; a server's is dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
        return
    scratch = scratch_postgres_database if request.param == "postgres" else scratch_mysql_database
    with scratch("leasehold_scratch") as url:
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


def _schema_diff(db: Database) -> list[Any]:
    """How the database's schema differs from ``storage.tables.metadata`` (Alembic's view)."""
    with db.engine.connect() as conn, warnings.catch_warnings():
        if db.dialect == "postgresql":
            # PostgreSQL keeps a generated column's expression in its own normal form, which
            # Alembic cannot compare with ours and only warns about; _generated_expression
            # checks it instead.
            warnings.filterwarnings("ignore", "Computed default on .* cannot be modified")
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, metadata))


def _generated_expression(db: Database) -> str:
    """PostgreSQL's expression of ``control_requests.pending_action``."""
    with db.engine.connect() as conn:
        return str(
            conn.execute(
                text(
                    "SELECT generation_expression FROM information_schema.columns "
                    "WHERE table_name = 'control_requests' AND column_name = 'pending_action'"
                )
            ).scalar_one()
        )


def test_migrated_schema_matches_the_tables_module(fresh_db: Database) -> None:
    upgrade(fresh_db)
    # Nothing needs ignoring: the migration writes out the same names (naming convention),
    # types (dialect variants), server defaults, indexes, unique and foreign keys.
    assert _schema_diff(fresh_db) == []
    if fresh_db.dialect == "postgresql":
        expression = _generated_expression(fresh_db)
        for part in ("CASE", "'pending'", "action"):
            assert part in expression, expression


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


# --- the migration lock: concurrent `leasehold migrate` take turns ------------------------------

MIGRATE = [sys.executable, "-m", "tasks.cli", "migrate"]
GRACE = 1.0  # SQLite: how long a waiting migrate must stay waiting (a bound, never a sync point)


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


# PostgreSQL's migration lock: the advisory lock ``leasehold migrate`` takes (storage/migrate.py).
_PG_LOCK = advisory_lock_key(LOCK_PREFIX + "store")


def _lock_name(url: str) -> str:
    database = make_url(url).database
    assert database
    return migration_lock_name(database)


@pytest.fixture
def migrate_procs(tmp_path: Path) -> Iterator[Any]:
    """Start ``leasehold migrate`` processes on a URL (only LEASEHOLD_DATABASE_URL set, cwd a tmp
    dir); any still running at teardown is killed."""
    started: list[subprocess.Popen[str]] = []
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def start(url: str) -> subprocess.Popen[str]:
        env = _clean_env(LEASEHOLD_DATABASE_URL=url, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            MIGRATE, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _finish(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@contextmanager
def _holding_the_lock(url: str) -> Iterator[Connection]:
    """Hold the store's migration lock the way ``leasehold migrate`` takes it, on a connection of
    the test's own; released when the block ends. SQLite: an open ``BEGIN IMMEDIATE`` (the
    engine's) on the file, already in WAL mode. MariaDB: ``GET_LOCK`` with the same name."""
    holder = open_database(url)
    try:
        with holder.engine.connect() as conn:
            if holder.is_sqlite:
                with conn.begin():
                    yield conn
                return
            if holder.dialect == "postgresql":
                assert conn.execute(
                    text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_LOCK}
                ).scalar()
                conn.commit()
                try:
                    yield conn
                finally:
                    conn.rollback()
                    unlocked = conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK})
                    assert unlocked.scalar()
                    conn.commit()
                return
            name = _lock_name(url)
            assert conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar() == 1
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                assert conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name}).scalar() == 1
                conn.commit()
    finally:
        holder.dispose()


def _lock_is_free(url: str) -> bool:
    if _is_sqlite(url):
        raw = sqlite3.connect(make_url(url).database or "", timeout=0, isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            raw.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            raw.close()
    db = open_database(url)
    try:
        with db.engine.connect() as conn:
            if _is_postgres(url):
                free = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_LOCK})
                if free.scalar():
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK})
                    return True
                return False
            name = _lock_name(url)
            got = conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar()
            if got == 1:
                conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name})
            return bool(got == 1)
    finally:
        db.dispose()


def _migrate_to(conn: Connection, revision: str) -> None:
    """Run Alembic to ``revision`` on ``conn``, the way ``upgrade()`` passes its connection."""
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, revision)


def _tables(url: str) -> set[str]:
    """The store's tables, read without taking any lock (SQLite: a plain WAL reader)."""
    if _is_sqlite(url):
        raw = sqlite3.connect(make_url(url).database or "", isolation_level=None)
        try:
            rows = raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            return {row[0] for row in rows}
        finally:
            raw.close()
    observer = open_database(url)
    try:
        with observer.engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        observer.dispose()


def _waiting_in_get_lock(conn: Connection, name: str) -> bool:
    """MariaDB: some session is running ``SELECT GET_LOCK('<name>', ...)`` now."""
    infos = conn.execute(
        text("SELECT INFO FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT GET_LOCK(%'")
    ).scalars()
    conn.rollback()
    return any(f"'{name}'" in str(info) for info in infos)


def _waiting_in_advisory_lock(conn: Connection) -> bool:
    """PostgreSQL: some session of this database waits for an advisory lock now."""
    waiting = conn.execute(
        text(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND NOT l.granted AND a.datname = current_database()"
        )
    ).scalar()
    conn.rollback()
    return bool(waiting)


def _has_open(pid: int, path: str) -> bool:
    """Linux: process ``pid`` has ``path`` open."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == path:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def _prove_waiting(url: str, proc: subprocess.Popen[str]) -> None:
    """``proc`` (a ``leasehold migrate``) is blocked on the lock the test holds."""

    def running() -> bool:
        if proc.poll() is not None:
            rc, out, err = _finish(proc)
            raise AssertionError(f"migrate did not wait: exit {rc}\n{out}\n{err}")
        return True

    if _is_sqlite(url):
        path = os.path.realpath(make_url(url).database or "")
        if Path(f"/proc/{proc.pid}/fd").is_dir():  # Linux: it has opened the store
            wait_until(lambda: running() and _has_open(proc.pid, path), timeout=60, what="the open")
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=GRACE)  # and stays blocked in SQLite's busy handler
    else:
        observer = open_database(url)
        if _is_postgres(url):
            waiting: Callable[[Connection], bool] = _waiting_in_advisory_lock
        else:
            waiting = partial(_waiting_in_get_lock, name=_lock_name(url))
        try:
            with observer.engine.connect() as conn:
                wait_until(
                    lambda: running() and waiting(conn),
                    timeout=60,
                    interval=0.05,
                    what="its wait for the migration lock",
                )
        finally:
            observer.dispose()
    assert running()
    assert _tables(url) == set(), "nothing may be migrated while the test holds the lock"


@pytest.mark.slow
def test_concurrent_migrate_processes_all_succeed(fresh: str, migrate_procs: Any) -> None:
    procs = [migrate_procs(fresh) for _ in range(5)]  # all started before any is waited for
    results = [_finish(proc) for proc in procs]
    head = head_revision()
    where = redact(fresh)
    for rc, out, err in results:
        assert rc == 0, f"{out}\n{err}"
    outputs = sorted(out.strip() for _, out, _ in results)
    # They took turns: the first migrated from empty, each later one found the store at head.
    assert outputs == sorted(
        [f"{where}: migrated empty -> {head}"] + [f"{where}: already at revision {head}"] * 4
    )
    db = open_database(fresh)
    try:
        assert current_revision(db) == head
        assert require_head(db) == head
        assert _schema_diff(db) == []
    finally:
        db.dispose()
    assert _lock_is_free(fresh)


@pytest.mark.slow
@pytest.mark.parametrize("meanwhile", ["nothing", "the_holder_migrates"])
def test_migrate_waits_for_the_lock_then_reads_the_revision(
    fresh: str, migrate_procs: Any, meanwhile: str
) -> None:
    """A ``leasehold migrate`` started while the lock is held waits for it, and reads the
    revision only once it has it: if the holder migrated meanwhile, it finds the holder's tables
    at head (never 'foreign', never 'table already exists')."""
    head = head_revision()
    if _is_sqlite(fresh):
        _wal(fresh)
    with _holding_the_lock(fresh) as holder:
        proc = migrate_procs(fresh)
        _prove_waiting(fresh, proc)
        if meanwhile == "the_holder_migrates":
            if holder.in_transaction():  # SQLite: inside the held BEGIN IMMEDIATE
                _migrate_to(holder, "head")
            else:
                with holder.begin():
                    _migrate_to(holder, "head")
        assert proc.poll() is None
    rc, out, err = _finish(proc)
    assert rc == 0, f"{out}\n{err}"
    expected = "already at revision" if meanwhile == "the_holder_migrates" else "migrated empty ->"
    assert f"{redact(fresh)}: {expected}" in out
    db = open_database(fresh)
    try:
        assert require_head(db) == head
        assert _schema_diff(db) == []
    finally:
        db.dispose()


def _wal(url: str) -> None:
    """Put a fresh SQLite file in WAL mode (the engine's first connection does), so the test's
    held write lock is the only thing a migrate can wait for."""
    db = open_database(url)
    try:
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        db.dispose()


def test_upgrade_gives_up_clearly_when_the_lock_stays_held(fresh: str, fresh_db: Database) -> None:
    if _is_sqlite(fresh):
        _wal(fresh)
    with _holding_the_lock(fresh):
        started = time.monotonic()
        with pytest.raises(SchemaError) as caught:
            upgrade(fresh_db, lock_timeout=0.3)
        waited = time.monotonic() - started
    message = str(caught.value)
    assert "timed out after 0.3 seconds" in message
    assert "another `leasehold migrate`" in message
    assert redact(fresh) in message
    if not _is_sqlite(fresh) and not _is_postgres(fresh):
        assert repr(_lock_name(fresh)) in message
    assert 0.25 <= waited < 15
    assert _tables(fresh) == set()  # nothing was migrated
    assert current_revision(fresh_db) is None
    # The attempt left nothing behind: the lock is free at once and the store migrates.
    assert upgrade(fresh_db, lock_timeout=0) == (None, head_revision())


@pytest.mark.parametrize("outcome", ["migrated", "refused"])
def test_upgrade_releases_the_lock_and_restores_the_connection(
    fresh: str, fresh_db: Database, outcome: str
) -> None:
    usual = _busy_timeout(fresh_db)
    if outcome == "refused":
        _foreign(fresh_db, "customers")
        with pytest.raises(SchemaError, match="foreign database"):
            upgrade(fresh_db)
    else:
        upgrade(fresh_db)
    # fresh_db's pool still holds the connection that migrated: its session keeps no lock ...
    assert _lock_is_free(fresh)
    # ... and on SQLite it has the engine's busy timeout back.
    assert _busy_timeout(fresh_db) == usual


def _busy_timeout(db: Database) -> int | None:
    if not db.is_sqlite:
        return None
    with db.engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        return int(raw.execute("PRAGMA busy_timeout").fetchone()[0])


def test_sqlite_upgrade_is_one_write_transaction(tmp_path: Path) -> None:
    """The revision read and every revision's DDL run in one BEGIN IMMEDIATE, committed once."""
    db = open_database(f"sqlite:///{tmp_path / 'one.sqlite3'}")
    seen: list[str] = []
    for name in ("begin", "commit", "rollback"):
        event.listen(db.engine, name, lambda conn, name=name: seen.append(name))
    try:
        assert upgrade(db) == (None, head_revision())
        assert seen == ["begin", "commit"]
        seen.clear()
        assert upgrade(db) == (head_revision(), head_revision())
        assert seen == ["begin", "commit"]
    finally:
        db.dispose()


def test_migration_lock_names_fit_mysql() -> None:
    assert migration_lock_name("shop") == "leasehold_migrate:shop"
    longest = "d" * 64  # the longest MySQL database name
    name = migration_lock_name(longest)
    assert len(name) <= 64
    assert name == migration_lock_name(longest)
    assert name != migration_lock_name("d" * 63 + "e")
    assert all(len(migration_lock_name("x" * n)) <= 64 for n in range(1, 65))


def test_upgrade_refuses_a_dialect_it_has_no_lock_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'other.sqlite3'}")
    try:
        monkeypatch.setattr(db.engine.dialect, "name", "oracle")
        with pytest.raises(ConfigurationError, match="no migration lock for the 'oracle'"):
            upgrade(db)
        monkeypatch.undo()
        assert current_revision(db) is None
    finally:
        db.dispose()


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_upgrade_refuses_a_bad_lock_timeout(tmp_path: Path, timeout: float) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'never.sqlite3'}")
    try:
        with pytest.raises(ConfigurationError, match="lock_timeout"):
            upgrade(db, lock_timeout=timeout)
    finally:
        db.dispose()
    assert not (tmp_path / "never.sqlite3").exists()  # refused before connecting


# --- require_head: what workers, beat and the CLI check before using a store ---------------------


def _revisions_oldest_first() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


def test_require_head_names_what_to_do_at_every_revision(fresh: str, fresh_db: Database) -> None:
    head = head_revision()
    where = redact(fresh)
    with pytest.raises(SchemaError) as caught:
        require_head(fresh_db)
    assert str(caught.value) == (
        f"the store {where} is not migrated: this leasehold needs revision {head}: "
        "run `leasehold migrate`"
    )
    revisions = _revisions_oldest_first()
    assert revisions[-1] == head
    for behind in revisions[:-1]:  # the first revision, ..., the one just before head
        with fresh_db.transaction() as conn:
            _migrate_to(conn, behind)
        assert current_revision(fresh_db) == behind
        with pytest.raises(SchemaError) as caught:
            require_head(fresh_db)
        assert str(caught.value) == (
            f"the store {where} is at revision {behind}, this leasehold needs {head}: "
            "run `leasehold migrate`"
        )
    assert upgrade(fresh_db)[1] == head
    assert require_head(fresh_db) == head


def test_require_head_refuses_a_store_a_newer_leasehold_migrated(
    fresh: str, fresh_db: Database
) -> None:
    upgrade(fresh_db)
    with fresh_db.engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'f00dfacecafe'"))
    with pytest.raises(SchemaError) as caught:
        require_head(fresh_db)
    assert str(caught.value) == (
        f"the store {redact(fresh)} is at revision f00dfacecafe, which this leasehold does not "
        f"know (its newest is {head_revision()}): a newer leasehold migrated it; run that "
        "version, or upgrade this one"
    )


@pytest.mark.parametrize("dialect", ["sqlite", "mysql", "postgresql"])
def test_require_head_on_an_unreachable_store_is_storage_unavailable(
    tmp_path: Path, dialect: str
) -> None:
    db = unreachable(dialect, tmp_path)
    try:
        with pytest.raises(StorageUnavailable) as caught:
            require_head(db)
        assert redact(str(db.engine.url)) in str(caught.value)
    finally:
        db.dispose()


def test_upgrade_from_0004_keeps_every_row_and_old_applies_stay_readable(
    fresh_db: Database,
) -> None:
    """Revision 0005 adds columns to ``applies`` (on SQLite by rebuilding the table, which other
    tables reference) and the ``publications`` outbox: a store with applies, their tasks, logs,
    GitHub records, control requests and notifications upgrades with nothing lost."""
    with fresh_db.engine.begin() as conn:
        _migrate_to(conn, "0004")
    now = "2026-11-01 12:00:00"
    with fresh_db.transaction() as conn:
        conn.execute(
            text(
                "INSERT INTO applies (id, state, database_name, environment, engine, repository, "
                "pull_request, head_sha, lease_epoch, lease_token, created_at, updated_at, "
                "finished_at) VALUES (1, 'completed', 'shop', 'prod', 'sleep', 'acme/shop', 7, "
                f"'{'0' * 40}', 3, NULL, '{now}', '{now}', '{now}'), "
                "(2, 'stopped', 'shop2', 'prod', 'sleep', NULL, NULL, NULL, 2, "
                f"'{'a' * 32}', '{now}', '{now}', NULL)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO apply_tasks (apply_id, position, table_name, ddl, options, state, "
                "progress, lease_epoch, finished_at) VALUES "
                f"(1, 0, 't', 'ALTER TABLE t ADD c INT', '{{}}', 'completed', 100, 2, '{now}')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO apply_logs (apply_id, lease_epoch, level, event, message, created_at)"
                f" VALUES (1, 3, 'info', 'completed', 'done', '{now}')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO checks (apply_id, github_check_run_id, status, conclusion, "
                f"last_epoch, updated_at) VALUES (1, 9, 'completed', 'success', 3, '{now}')"
            )
        )
    before = _contents(fresh_db)
    upgrade(fresh_db)
    after = _contents(fresh_db)
    assert current_revision(fresh_db) == head_revision()
    for table, rows in before.items():
        if table == VERSION_TABLE:
            continue
        if (
            table == "applies"
        ):  # the same rows, with the new columns (0005's three, 0006's one) empty
            assert [r[: len(rows[0])] for r in after[table]] == rows
            assert all(r[len(rows[0]) :] == (None,) * 4 for r in after[table])
        else:
            assert after[table] == rows, table
    assert after["publications"] == []
    old = applies.get(fresh_db, 1)
    assert (old["state"], old["lease_epoch"], old["effect_until"]) == ("completed", 3, None)
    assert [t["state"] for t in applies.tasks(fresh_db, 1)] == ["completed"]
    assert audit(fresh_db) == []


def _downgrade_to(conn: Connection, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.downgrade(cfg, revision)


def _applies_columns(db: Database) -> list[str]:
    with db.engine.connect() as conn:
        return [c["name"] for c in inspect(conn).get_columns("applies")]


def test_0006_adds_requested_by_and_its_downgrade_takes_it_away(fresh_db: Database) -> None:
    """Revision 0006 adds ``applies.requested_by`` (older applies: NULL, and still audit clean);
    its downgrade drops it again keeping every row, and upgrading once more gets back to the
    tables module exactly."""
    with fresh_db.engine.begin() as conn:
        _migrate_to(conn, "0005")
    assert "requested_by" not in _applies_columns(fresh_db)
    now = "2026-12-01 12:00:00"
    with fresh_db.transaction() as conn:
        conn.execute(
            text(
                "INSERT INTO applies (state, database_name, environment, engine, lease_epoch, "
                f"created_at, updated_at) VALUES ('queued', 'shop', 'prod', 'sleep', 0, '{now}', "
                f"'{now}')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO control_requests (apply_id, action, state, requested_by, created_at) "
                f"SELECT id, 'stop', 'failed', 'ops', '{now}' FROM applies"
            )
        )
    upgrade(fresh_db)
    assert current_revision(fresh_db) == head_revision() == "0006"
    assert _schema_diff(fresh_db) == []
    (old,) = [int(row[0]) for row in _contents(fresh_db)["applies"]]
    assert applies.get(fresh_db, old)["requested_by"] is None  # submitted before: nobody said
    assert audit(fresh_db) == []
    named = applies.create(
        fresh_db,
        applies.NewApply("shop", "test", "sleep", [applies.NewTask("t", "ALTER TABLE t ADD c INT")],
                         requested_by="CN=deploy-bot (as alice)"),
    ).apply_id  # fmt: skip
    assert applies.get(fresh_db, named)["requested_by"] == "CN=deploy-bot (as alice)"
    before = _contents(fresh_db)

    with fresh_db.engine.begin() as conn:
        _downgrade_to(conn, "0005")

    assert current_revision(fresh_db) == "0005"
    assert "requested_by" not in _applies_columns(fresh_db)
    after = _contents(fresh_db)
    at = list(metadata.tables["applies"].columns.keys()).index("requested_by")
    for table, rows in before.items():
        if table == "applies":  # every row, without the column
            assert after[table] == [r[:at] + r[at + 1 :] for r in rows]
        elif table != VERSION_TABLE:
            assert after[table] == rows, table

    assert upgrade(fresh_db) == ("0005", "0006")
    assert _schema_diff(fresh_db) == []
    assert applies.get(fresh_db, named)["requested_by"] is None  # the downgrade dropped it
