"""The target-side fence with real processes (issue 10, part 6): a worker running a copying ALTER
on a ``mysql`` target is frozen (SIGSTOP) mid-ALTER and reclaimed; the new holder finds the
frozen worker's tagged statement still running on the target, waits for it instead of starting
the same ALTER beside it (which used to end in "Duplicate column name"), finds the column made
and completes. The column exists once, and the frozen worker, woken, writes nothing.

How long the earlier ALTER runs is the test's to decide, not the machine's speed: a transaction
the test holds open on the table keeps the copied ALTER waiting for its metadata lock (in the
process list, "Waiting for table metadata lock") until the test lets it finish. Redis + MariaDB
only, the stack a production deployment runs; the fence itself is proved on every store by
``tests/contract/test_target_outage.py``.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, text

from tests.conftest import scratch_mysql_database
from tests.e2e.helpers import (
    RECLAIM_INTERVAL,
    RESULT_TIMEOUT,
    SLACK,
    STALE_AFTER,
    Cluster,
    assert_completed_once,
    assert_epochs_non_decreasing,
    describe,
    events,
    freeze,
    kill_group,
    logs,
    owner_worker,
    reclaimed_from,
    row,
    submit_task,
    wait_for,
    wait_log,
    wait_log_event,
    wait_state,
)
from tests.support import new_database

# Redis + MariaDB only. On the embedded default a worker frozen at the wrong moment can hold the
# SQLite write lock (freeze() in helpers.py), which is not what this test is about.
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("stack", ["redis"], indirect=True)]

ALTER = "ALTER TABLE big ADD COLUMN extra INT, ALGORITHM=COPY"
DOUBLINGS = 16  # 65536 rows: a real copy, built in well under a second


@pytest.fixture
def target_url() -> Iterator[str]:
    with scratch_mysql_database("leasehold_fence_e2e") as url:
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text("CREATE TABLE big (id INT AUTO_INCREMENT PRIMARY KEY, pad VARCHAR(100))")
                )
                conn.execute(text("INSERT INTO big (pad) VALUES (REPEAT('x', 100))"))
                for _ in range(DOUBLINGS):
                    conn.execute(text("INSERT INTO big (pad) SELECT pad FROM big"))
        finally:
            engine.dispose()
        yield url


def _query(url: str, sql: str) -> Any:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()
    finally:
        engine.dispose()


def _tagged_alters(url: str, apply_id: int, *, waiting: bool = False) -> int:
    state = " AND STATE LIKE 'Waiting for table metadata lock'" if waiting else ""
    return int(
        _query(
            url,
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE "
            f"'/* leasehold apply={apply_id:d} %ALTER TABLE big%'{state}",
        )
    )


def _columns(url: str) -> int:
    return int(
        _query(
            url,
            "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_NAME = 'big' AND COLUMN_NAME = 'extra'",
        )
    )


class MetadataLock:
    """A transaction that read ``big``: a copying ALTER of it cannot swap its copy in until the
    transaction ends."""

    def __init__(self, url: str) -> None:
        self._engine = create_engine(url)
        self._conn: Connection | None = self._engine.connect()
        self._conn.execute(text("SELECT COUNT(*) FROM big")).scalar()

    def release(self) -> None:
        if self._conn is not None:
            self._conn.rollback()
            self._conn.close()
            self._conn = None
            self._engine.dispose()


def test_a_frozen_workers_alter_is_waited_for_by_the_new_holder(
    cluster: Cluster, target_url: str, timing: list[str]
) -> None:
    stack, db = cluster.stack, cluster.stack.db
    name = new_database()
    procs = cluster.workers(2, env={"LEASEHOLD_TARGETS": json.dumps({name: target_url})})
    cluster.beats(1)
    payload = {
        "database": name,
        "environment": "e2e",
        "engine": "mysql",
        "tasks": [{"table": "big", "ddl": ALTER, "options": {}}],
    }
    lock = MetadataLock(target_url)
    try:
        apply_id = submit_task(stack, payload)
        wait_for(
            "the first holder's ALTER, copied and waiting for the metadata lock",
            lambda: _tagged_alters(target_url, apply_id, waiting=True),
            timeout=RESULT_TIMEOUT,
            diagnose=lambda: describe(db, apply_id),
        )
        first = row(db, apply_id)
        victim = owner_worker(first["lease_owner"], procs)
        freeze(stack, victim, apply_id)  # mid-ALTER: its statement goes on on the target
        frozen_at = time.monotonic()
        waiting = wait_log_event(
            db,
            apply_id,
            "target_waiting_earlier",
            min_epoch=int(first["lease_epoch"]) + 1,
            timeout=STALE_AFTER + RECLAIM_INTERVAL + SLACK + RESULT_TIMEOUT,
        )
        took_over = time.monotonic() - frozen_at
        assert reclaimed_from(db, apply_id) == [int(first["lease_epoch"])]
        assert f"statement of epoch {first['lease_epoch']} " in waiting.message, waiting.message
        # The new holder runs nothing beside it: one ALTER on the target, the frozen one's.
        assert _tagged_alters(target_url, apply_id) == 1
        assert row(db, apply_id)["state"] == "running"
    finally:
        lock.release()  # the earlier ALTER swaps its copy in and ends
    released = time.monotonic()
    done = wait_state(db, apply_id, "completed", "failed", timeout=RESULT_TIMEOUT)
    finished = time.monotonic() - released
    assert done["state"] == "completed", describe(db, apply_id)
    assert _columns(target_url) == 1
    after = [event for epoch, event in events(db, apply_id) if epoch > int(first["lease_epoch"])]
    assert "task_skipped" in after, describe(db, apply_id)  # made by the earlier ALTER
    assert not {"failed", "task_already_there"} & set(after), describe(db, apply_id)
    assert_completed_once(db, apply_id)

    # The frozen worker wakes to a lost lease: it writes nothing, and runs no second ALTER.
    written = logs(db, apply_id)
    kill_group(victim, signal.SIGCONT)
    wait_log(victim, "lease lost, stopping without further writes")
    assert logs(db, apply_id) == written
    assert_epochs_non_decreasing(db, apply_id)
    assert _columns(target_url) == 1
    assert _tagged_alters(target_url, apply_id) == 0
    timing.append(
        f"target fence: frozen mid-ALTER -> new holder waiting for it {took_over:.1f} s; "
        f"completed {finished:.1f} s after the earlier ALTER could end"
    )
