"""Bad input: malformed lease JSON, wrong types, unknown applies, tokens never issued, bad values
for owned writes and settings. Each is one clear, named error, and nothing is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from leases import Lease, ReclaimPolicy, check, dispatch, fence, heartbeat, mint_token, redeem
from storage import fenced, open_database
from storage.database import Database, redact
from storage.errors import (
    ApplyNotFound,
    ConfigurationError,
    InvalidInput,
    InvalidLease,
    LeaseholdError,
    LeaseLost,
    StorageError,
)
from tests import support
from tests.support import hand_back, release

Operation = Callable[[Database, Lease], object]


def _fenced_write(db: Database, lease: Lease) -> None:
    with fence(db, lease) as fx:
        fenced.append_log(fx, "bad", "must not land")


OPERATIONS: dict[str, Operation] = {
    "redeem": lambda db, lease: redeem(db, lease, "worker-9"),
    "heartbeat": heartbeat,
    "check": check,
    "hand_back": lambda db, lease: hand_back(db, lease, reason="bad input"),
    "release": lambda db, lease: release(db, lease, reason="bad input"),
    "fence": _fenced_write,
}

MALFORMED_MESSAGES = [
    '{"apply_id": 1, "epoch": 1}',
    '{"apply_id": 1, "epoch": 1, "token": "abc"}',
    '{"apply_id": "1", "epoch": 1, "token": "0123456789abcdef0123456789abcdef"}',
    '{"apply_id": 1, "epoch": true, "token": "0123456789abcdef0123456789abcdef"}',
    '{"apply_id": 1, "epoch": 0, "token": "0123456789abcdef0123456789abcdef"}',
    '{"apply_id": 1, "epoch": 1, "token": "0123456789ABCDEF0123456789ABCDEF"}',
    '{"apply_id": 1, "epoch": 1, "token": "0123456789abcdef0123456789abcdef", "x": 1}',
    '[1, 1, "0123456789abcdef0123456789abcdef"]',
    '"0123456789abcdef0123456789abcdef"',
    "null",
]


@pytest.mark.parametrize("message", MALFORMED_MESSAGES)
def test_malformed_lease_message_is_refused_before_the_database(db: Database, message: str) -> None:
    lease = support.running_lease(db)
    before = support.snapshot(db)
    payload = json.loads(message.replace('"apply_id": 1', f'"apply_id": {lease.apply_id}'))
    with pytest.raises(InvalidLease):
        heartbeat(db, Lease.from_json(payload))
    assert support.snapshot(db) == before


def test_message_that_is_not_json_at_all() -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads('{"apply_id": 1, "epoch": 1, "token": ')
    # ... and the wire JSON is exactly the three keys.
    lease = Lease(1, 1, mint_token())
    assert set(json.loads(json.dumps(lease.to_json()))) == {"apply_id", "epoch", "token"}


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_unknown_apply_id(db: Database, op: str) -> None:
    support.running_lease(db)
    before = support.snapshot(db)
    for apply_id in (10**9, 2**63 - 1):
        with pytest.raises(ApplyNotFound) as caught:
            OPERATIONS[op](db, Lease(apply_id, 1, mint_token()))
        assert caught.value.apply_id == apply_id
        assert str(apply_id) in str(caught.value)
    assert support.snapshot(db) == before


def test_dispatch_unknown_apply_id(db: Database) -> None:
    before = support.snapshot(db)
    with pytest.raises(ApplyNotFound):
        dispatch(db, 10**9)
    assert support.snapshot(db) == before


@pytest.mark.parametrize("op", list(OPERATIONS))
@pytest.mark.parametrize("phase", ["pending", "dispatched", "running", "stopped"])
def test_token_of_the_right_shape_never_issued(db: Database, op: str, phase: str) -> None:
    apply_id = support.new_apply(db)
    epoch = 0
    if phase != "pending":
        lease = dispatch(db, apply_id)
        epoch = lease.epoch
        if phase in ("running", "stopped"):
            redeem(db, lease, "worker-1")
        if phase == "stopped":
            epoch = release(db, lease, reason="tests")
    before = support.snapshot(db)
    for forged_epoch in {max(epoch, 1), epoch + 1, 2**31 - 1}:
        forged = Lease(apply_id, forged_epoch, mint_token())
        with pytest.raises(LeaseLost):
            OPERATIONS[op](db, forged)
    assert support.snapshot(db) == before


def test_current_token_with_a_wrong_epoch_is_refused_by_the_fence(db: Database) -> None:
    lease = support.running_lease(db)
    before = support.snapshot(db)
    for epoch in (lease.epoch + 1, 2**31 - 1):
        with pytest.raises(LeaseLost), fence(db, Lease(lease.apply_id, epoch, lease.token)) as fx:
            fenced.append_log(fx, "bad", "must not land")
    assert support.snapshot(db) == before


def _log_then_update(db: Database, lease: Lease, task: int, values: dict[str, Any]) -> None:
    with fence(db, lease) as fx:
        fenced.append_log(fx, "before", "the bad write")
        fenced.update_task(fx, task, **values)


# --- owned writes with bad values -----------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"progress": 101},
        {"progress": -1},
        {"progress": "50"},
        {"progress": 50.0},
        {"progress": True},
        {"progress": None},
        {"state": "exploded"},
        {"state": None},
        {"lease_epoch": 99},
        {"apply_id": 2},
        {"id": 5},
        {"bogus": 1},
    ],
    ids=repr,
)
def test_update_task_rejects_bad_values(db: Database, values: dict[str, Any]) -> None:
    lease = support.running_lease(db)
    (task, _) = support.task_ids(db, lease.apply_id)
    before = support.snapshot(db)
    with pytest.raises(InvalidInput):
        _log_then_update(db, lease, task, values)
    assert support.snapshot(db) == before


def test_unserializable_checkpoint_writes_nothing(db: Database) -> None:
    lease = support.running_lease(db)
    (task, _) = support.task_ids(db, lease.apply_id)
    before = support.snapshot(db)
    with pytest.raises(LeaseholdError):
        _log_then_update(db, lease, task, {"checkpoint": {"not json": object()}})
    assert support.snapshot(db) == before


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stale_after": 0},
        {"stale_after": -1},
        {"dispatch_timeout": 0},
        {"max_reclaims": -1},
        {"batch_size": 0},
    ],
    ids=repr,
)
def test_reclaim_policy_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    valid = {"stale_after": 30.0, "dispatch_timeout": 600.0, "max_reclaims": 5}
    with pytest.raises(ValueError, match=r"must be"):
        ReclaimPolicy(**{**valid, **kwargs})


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        ("not a url", {}),
        ("oracle://u@localhost/db", {}),
        ("postgresql+psycopg2://u@localhost/db", {}),  # psycopg 3 only
        ("postgresql+psycopg://u@localhost/db", {"isolation_level": "chaos"}),
        ("mysql+mysqldb://root@127.0.0.1:3306/x", {"isolation_level": "READ UNCOMMITTED"}),
        ("mysql+mysqldb://root@127.0.0.1:3306/x", {"isolation_level": "chaos"}),
    ],
)
def test_database_settings_are_configuration_errors(url: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        open_database(url, **kwargs)


def test_database_urls_are_redacted() -> None:
    shown = redact("mysql+mysqldb://app:s3cret@db.internal:3306/leasehold")
    assert "s3cret" not in shown
    assert "db.internal" in shown
    db = open_database("mysql+mysqldb://app:s3cret@127.0.0.1:1/leasehold")
    try:
        assert "s3cret" not in repr(db)
        with pytest.raises(StorageError) as caught:
            heartbeat(db, Lease(1, 1, mint_token()))
        assert "s3cret" not in str(caught.value)
    finally:
        db.dispose()
