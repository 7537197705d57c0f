"""The mysql engine against a real MariaDB/MySQL target database (created and dropped here): it runs
DDL, recognises what is already applied, fails clearly, and kills its statement when cancelled or
when the lease is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from storage.errors import LeaseLost
from tasks.engines import (
    EngineCancelled,
    EngineContext,
    EngineError,
)
from tasks.engines.mysql import MySQLEngine
from tests.celery_fixtures import wait_until
from tests.conftest import scratch_mysql_database, unavailable
from tests.engine_doubles import Recorder, Running, spec


@pytest.fixture(scope="module")
def target_url() -> Iterator[str]:
    """A scratch target database on the MariaDB/MySQL server; dropped at the end."""
    with scratch_mysql_database("leasehold_target") as url:
        yield url


@pytest.fixture
def target(target_url: str) -> Iterator[str]:
    """The target database with one small table ``items``; emptied after the test."""
    engine = create_engine(target_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(20))"))
        conn.execute(text("INSERT INTO items VALUES (1, 'a'), (2, 'b')"))
    try:
        yield target_url
    finally:
        with engine.begin() as conn:
            tables = conn.execute(text("SHOW TABLES")).scalars().all()
            for table in tables:
                conn.execute(text(f"DROP TABLE `{table}`"))
        engine.dispose()


def _mysql(url: str) -> MySQLEngine:
    return MySQLEngine({"target": url})


def _scalar(url: str, sql: str) -> Any:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()
    finally:
        engine.dispose()


def _running_statements(url: str, like: str) -> int:
    return int(
        _scalar(
            url,
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            f"WHERE INFO LIKE '{like}' AND ID <> CONNECTION_ID()",
        )
    )


@pytest.mark.mysql
def test_mysql_runs_add_column_then_knows_it_is_applied(target: str) -> None:
    engine = _mysql(target)
    task = spec("ALTER TABLE items ADD COLUMN note VARCHAR(40) NULL", table="items")
    assert engine.already_applied(task) is False
    progress = Recorder()
    engine.run(task, EngineContext(progress=progress))
    assert progress.percents[0] == 0
    assert progress.percents[-1] == 100
    assert engine.already_applied(task) is True
    count = _scalar(
        target,
        "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
        "AND TABLE_NAME = 'items' AND COLUMN_NAME = 'note'",
    )
    assert count == 1


@pytest.mark.mysql
@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TABLE items ADD INDEX ix_name (name)",
        "ALTER TABLE items ADD UNIQUE KEY uq_name (name)",
        "CREATE INDEX ix_name_id ON items (name, id)",
        "CREATE UNIQUE INDEX `uq_n` ON `items` (name)",
        "CREATE TABLE orders (id INT PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS `orders` (id INT PRIMARY KEY)",
        "ALTER TABLE items DROP COLUMN name",
        "ALTER TABLE `items` DROP `name`;",
        "alter table items add n2 int",
        "ALTER TABLE `items` ADD COLUMN `n3` BIGINT NOT NULL DEFAULT 0",
    ],
)
def test_mysql_recognises_applied_shapes(target: str, ddl: str) -> None:
    engine = _mysql(target)
    task = spec(ddl, table="items")
    assert engine.already_applied(task) is False
    engine.run(task, EngineContext(progress=Recorder()))
    assert engine.already_applied(task) is True


@pytest.mark.mysql
@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TABLE items MODIFY name VARCHAR(80)",
        "ALTER TABLE items ENGINE=InnoDB",
        "RENAME TABLE items TO items_old",
        "ALTER TABLE items CHANGE name title VARCHAR(20)",
    ],
)
def test_mysql_unknown_shapes_are_never_already_applied(target: str, ddl: str) -> None:
    engine = _mysql(target)
    task = spec(ddl, table="items")
    assert engine.already_applied(task) is False
    engine.run(task, EngineContext(progress=Recorder()))
    assert engine.already_applied(task) is False  # unsure means run it; the DDL decides


@pytest.mark.mysql
@pytest.mark.parametrize(
    ("ddl", "message"),
    [
        ("ALTER TABLE missing ADD COLUMN c INT", "doesn't exist"),
        ("ALTER TABLE items ADD COLUMN id INT", "Duplicate column"),
        ("ALTER TABLE items ADDD COLUMN c INT", "SQL syntax"),
    ],
)
def test_mysql_failing_ddl_raises_engine_error(target: str, ddl: str, message: str) -> None:
    progress = Recorder()
    with pytest.raises(EngineError, match=message) as failed:
        _mysql(target).run(spec(ddl, table="items"), EngineContext(progress=progress))
    assert str(failed.value).startswith("DDL on items failed: ")
    assert 100 not in progress.percents


@pytest.mark.mysql
def test_mysql_kill_query_interrupts_a_long_statement(target: str) -> None:
    progress = Recorder()
    ctx = EngineContext(progress=progress)
    running = Running(_mysql(target), spec("DO SLEEP(30)", table="items"), ctx)
    wait_until(lambda: progress.calls, what="the statement to start")
    wait_until(lambda: _running_statements(target, "DO SLEEP(30)"), what="DO SLEEP on the server")
    cancelled_at = time.monotonic()
    ctx.cancelled.set()
    assert isinstance(running.join(20), EngineCancelled)
    assert running.ended_at is not None
    assert running.ended_at - cancelled_at < 20  # killed: the statement itself sleeps 30 s
    assert _running_statements(target, "DO SLEEP(30)") == 0


@pytest.mark.mysql
def test_mysql_kill_query_interrupts_a_long_alter(target: str) -> None:
    """A real table-copying ALTER, killed: the change is not there afterwards."""
    has_sequence = _scalar(
        target,
        "SELECT COUNT(*) FROM information_schema.ENGINES "
        "WHERE ENGINE = 'SEQUENCE' AND SUPPORT IN ('YES', 'DEFAULT')",
    )
    if not has_sequence:
        # MariaDB has had it since 10.0 (CI's is 10.11); MySQL never has: there, a skip locally
        # and a failure under CI, like any other service this suite needs and cannot find.
        unavailable("the MariaDB/MySQL server has no SEQUENCE engine (MariaDB's), needed here")
    engine = create_engine(target)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE big AS SELECT seq AS id, REPEAT('x', 200) AS pad FROM seq_1_to_300000"
            )
        )
    engine.dispose()
    task = spec("ALTER TABLE big ADD COLUMN c INT, ALGORITHM=COPY", table="big")
    progress = Recorder()
    ctx = EngineContext(progress=progress)
    mysql = _mysql(target)
    running = Running(mysql, task, ctx)
    wait_until(lambda: _running_statements(target, "ALTER TABLE big%"), what="the ALTER to run")
    cancelled_at = time.monotonic()
    ctx.cancelled.set()
    assert isinstance(running.join(30), EngineCancelled)
    assert running.ended_at is not None
    assert running.ended_at - cancelled_at < 30  # generous: the kill, not the time, is tested
    assert mysql.already_applied(task) is False  # the ALTER was killed, not completed


@pytest.mark.mysql
def test_mysql_a_lost_lease_during_the_statement_kills_it(target: str) -> None:
    """``LeaseLost`` from ``ctx.progress`` propagates, and the DDL is not left running."""
    progress = Recorder(raise_on_call=0)
    with pytest.raises(LeaseLost):
        _mysql(target).run(spec("DO SLEEP(31)", table="items"), EngineContext(progress=progress))
    wait_until(
        lambda: _running_statements(target, "DO SLEEP(31)") == 0,
        timeout=5,
        what="the orphaned statement to be killed",
    )
