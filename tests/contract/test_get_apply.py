"""``leasehold.get_apply`` (issue 8): how an apply is doing, as JSON, for the callers that
enqueued it; read-only. On SQLite and MariaDB; through a worker in ``test_inprocess.py``."""

from __future__ import annotations

import json

import pytest

import leases
from leases import redeem
from storage.applies import NewApply, NewTask
from storage.database import Database
from storage.errors import ApplyNotFound, InvalidInput
from tasks import service
from tasks.engines.sleep import SleepEngine
from tasks.interrupts import Interrupts
from tasks.runner import ApplyRunner
from tests import support
from tests.celery_fixtures import RecordingReporter


def submit(db: Database, database: str, requested_by: str | None = None) -> int:
    new = NewApply(
        database_name=database,
        environment="production",
        engine="sleep",
        tasks=[
            NewTask("orders", "ALTER TABLE orders ADD c INT", {"seconds": 0.01}),
            NewTask("customers", "ALTER TABLE customers ADD c INT", {"seconds": 0.01}),
        ],
        requested_by=requested_by,
    )
    return leases.submit(db, new).apply_id


def test_a_running_apply_and_one_waiting_behind_it(db: Database) -> None:
    database = support.new_database()
    first = submit(db, database, requested_by="CN=deploy-bot (as alice)")
    view = service.get_apply(db, first)
    lease = leases.Lease(first, view["epoch"], str(support.lease_of(db, first)[2]))
    redeem(db, lease, "worker-1")
    second = submit(db, database)

    running = service.get_apply(db, first)
    assert running == {
        "apply_id": first,
        "state": "running",
        "error": None,
        "epoch": 1,
        "reclaim_count": 0,
        "database": database,
        "environment": "production",
        "requested_by": "CN=deploy-bot (as alice)",
        "position": None,
        "waiting_behind": None,
        "heartbeat_age": running["heartbeat_age"],
        "tasks": [
            {"table": "orders", "state": "pending", "progress": 0},
            {"table": "customers", "state": "pending", "progress": 0},
        ],
        "notification": None,
    }
    assert 0 <= running["heartbeat_age"] < 60
    waiting = service.get_apply(db, second)
    assert (waiting["state"], waiting["position"], waiting["waiting_behind"]) == (
        "queued",
        2,
        first,
    )
    assert waiting["epoch"] == 0
    assert waiting["requested_by"] is None  # nobody said: recorded as nobody

    ApplyRunner(db, lease, SleepEngine(), Interrupts(), RecordingReporter()).run()
    done = service.get_apply(db, first)
    assert (done["state"], done["epoch"], done["heartbeat_age"], done["position"]) == (
        "completed",
        2,
        None,
        None,
    )
    assert [t["state"] for t in done["tasks"]] == ["completed", "completed"]
    assert [t["progress"] for t in done["tasks"]] == [100, 100]
    assert service.get_apply(db, second)["state"] == "dispatched"  # its turn came
    json.dumps(done)  # JSON, as the result backend stores it


def test_it_changes_nothing_and_refuses_bad_ids(db: Database) -> None:
    apply_id = submit(db, support.new_database())
    before = support.snapshot(db)
    service.get_apply(db, apply_id)
    assert support.snapshot(db) == before
    with pytest.raises(ApplyNotFound, match="apply 987654 does not exist"):
        service.get_apply(db, 987654)
    for bad in ("7", 0, -1, True, None, 7.0, [7]):
        with pytest.raises(InvalidInput, match="apply_id must be a positive integer"):
            service.get_apply(db, bad)
    assert support.snapshot(db) == before
