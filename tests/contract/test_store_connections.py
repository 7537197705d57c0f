"""A worker's store connections (issue 13): its apply slots share ``LEASEHOLD_DATABASE_CONNECTIONS``
of them and wait for a free one, while the heartbeat and the control plane have their own.

On MariaDB and PostgreSQL, the stores whose pools are capped (SQLite runs one write at a time
whatever its pool). The interleavings are held, not slept: the test itself takes the slots' only
connection and keeps its transaction open while it checks what must still go through.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from leases import dispatch
from storage import applies, open_database
from storage.database import Database
from storage.errors import StorageBusy
from tasks import runtime
from tasks.app import app
from tests import support
from tests.celery_fixtures import inprocess_worker, sleep_apply, wait_until
from tests.conftest import STORE_FIXTURES

SERVERS = [name for name in STORE_FIXTURES if name != "sqlite"]
RESULT_TIMEOUT = 20.0


@pytest.fixture(params=SERVERS)
def server_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(STORE_FIXTURES[request.param]))


def test_a_capped_pool_makes_a_transaction_wait_then_fail_busy(server_url: str) -> None:
    db = open_database(server_url, max_connections=1, pool_timeout=0.2)
    try:
        with db.transaction() as held:
            held.exec_driver_sql("SELECT 1")
            began = time.monotonic()
            with pytest.raises(StorageBusy, match="no free connection"), db.transaction():
                pytest.fail("a second connection was opened past the cap")
            assert time.monotonic() - began >= 0.2  # it waited for the held one first
        with db.transaction() as conn:  # given back: the next one is served at once
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    finally:
        db.dispose()


@pytest.fixture(scope="module", params=SERVERS)
def one_connection_worker(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An in-process worker whose two apply slots share one store connection."""
    url = str(request.getfixturevalue(STORE_FIXTURES[request.param]))
    overrides = {
        "leasehold_worker_concurrency": 2,
        "leasehold_database_connections": 1,
        "leasehold_heartbeat_interval": 0.1,
    }
    with inprocess_worker(url, overrides=overrides, concurrency=2) as started:
        started.test_url = url
        yield started


def test_the_heartbeat_and_the_brake_never_wait_for_the_runs_connections(
    one_connection_worker: Any,
) -> None:
    db = open_database(one_connection_worker.test_url)
    try:
        support.wipe(db)
        running = _send(db, sleep_apply(db, (30.0,)))
        wait_until(lambda: _row(db, running)["state"] == "running", what="the first apply to run")
        assert runtime.settings().database_connections == 1

        with runtime.runs_database().transaction() as held:  # the slots' only connection
            held.exec_driver_sql("SELECT 1")
            # A second apply has a free slot but no connection: it waits, unredeemed.
            waiting = _send(db, sleep_apply(db, (0.05,)))
            # The heartbeat still renews the running apply's lease, on its own connection.
            before = _row(db, running)["heartbeat_at"]
            wait_until(lambda: _row(db, running)["heartbeat_at"] > before, what="a heartbeat")
            # The brake goes through: the request is stored and read by the heartbeat.
            answer = app.send_task(
                "leasehold.control_apply", kwargs={"apply_id": running, "action": "stop"}
            ).get(timeout=RESULT_TIMEOUT)
            assert (answer["request_state"], answer["apply_state"]) == ("pending", "running")
            assert _row(db, waiting)["state"] == "dispatched"
            assert support.log_events(db, waiting) == [(1, "dispatched")]

        # Given back: the stop is acted on, and the waiting apply redeems and runs.
        wait_until(lambda: _row(db, running)["state"] == "stopped", what="the stop")
        wait_until(lambda: _row(db, waiting)["state"] == "completed", what="the waiting apply")
        wait_until(lambda: not runtime._runs, timeout=RESULT_TIMEOUT, what="runs to end")
    finally:
        db.dispose()


def _send(db: Database, apply_id: int) -> int:
    lease = dispatch(db, apply_id)
    app.send_task("leasehold.run_apply", kwargs={"apply_id": apply_id, "lease": lease.to_json()})
    return apply_id


def _row(db: Database, apply_id: int) -> Any:
    return applies.get(db, apply_id)
