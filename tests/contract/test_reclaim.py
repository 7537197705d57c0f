"""Reclaim: stale heartbeats (by the database clock) and overdue dispatches are rotated and
re-dispatched; after max_reclaims the apply fails as abandoned; the old holder is fenced."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from leases import Lease, check, dispatch, fence, heartbeat, reclaim, redeem
from storage import applies as applies_repo
from storage import fenced
from storage.database import Database
from storage.errors import LeaseLost, StorageError
from storage.states import ApplyState
from tests import support
from tests.support import hand_back, release

POLICY = support.reclaim_policy(
    stale_after=30, dispatch_timeout=120, max_reclaims=3, batch_size=100
)


def _rows(db: Database, apply_id: int) -> dict[str, list[tuple[object, ...]]]:
    """Every row that belongs to one apply (the applies row, its tasks, its logs)."""
    snap = support.snapshot(db)
    return {
        "applies": [r for r in snap["applies"] if r[0] == apply_id],
        "apply_tasks": [r for r in snap["apply_tasks"] if r[1] == apply_id],
        "apply_logs": [r for r in snap["apply_logs"] if r[1] == apply_id],
    }


# --- staleness by the database clock -------------------------------------------------------------


def test_running_heartbeat_just_inside_stale_after_is_kept(db: Database) -> None:
    lease = support.running_lease(db)
    support.age_heartbeat(db, lease.apply_id, POLICY.stale_after - 1)
    before = support.snapshot(db)
    assert reclaim(db, POLICY) == []
    assert support.snapshot(db) == before
    heartbeat(db, lease)


def test_running_heartbeat_just_outside_stale_after_is_reclaimed(db: Database) -> None:
    lease = support.running_lease(db)
    support.age_heartbeat(db, lease.apply_id, POLICY.stale_after + 1)
    (done,) = reclaim(db, POLICY)
    assert (done.apply_id, done.previous_epoch, done.from_state) == (
        lease.apply_id,
        lease.epoch,
        "running",
    )
    assert done.lease is not None
    assert (done.lease.apply_id, done.lease.epoch) == (lease.apply_id, lease.epoch + 1)
    assert done.lease.token != lease.token


def test_dispatched_apply_is_redispatched_only_after_dispatch_timeout(db: Database) -> None:
    lease = dispatch(db, support.new_apply(db))
    support.age_heartbeat(db, lease.apply_id, POLICY.dispatch_timeout - 1)
    before = support.snapshot(db)
    assert reclaim(db, POLICY) == []
    assert support.snapshot(db) == before

    support.age_heartbeat(db, lease.apply_id, POLICY.dispatch_timeout + 1)
    (done,) = reclaim(db, POLICY)
    assert (done.from_state, done.previous_epoch) == ("dispatched", lease.epoch)
    assert done.lease is not None
    row = applies_repo.get(db, lease.apply_id)
    assert (row["state"], row["lease_epoch"], row["lease_token"]) == (
        "dispatched",
        lease.epoch + 1,
        done.lease.token,
    )
    assert row["reclaim_count"] == 1
    assert row["heartbeat_age"] < 5
    # The lost message, if the broker delivers it after all, can no longer be redeemed.
    with pytest.raises(LeaseLost):
        redeem(db, lease, "late-worker")
    redeem(db, done.lease, "worker-2")


def test_a_running_apply_is_not_reclaimed_by_the_dispatch_timeout(db: Database) -> None:
    """A running apply goes by stale_after only, even if its heartbeat is just under it."""
    lease = support.running_lease(db)
    policy = support.reclaim_policy(stale_after=300, dispatch_timeout=10)
    support.age_heartbeat(db, lease.apply_id, 100)
    assert reclaim(db, policy) == []


def test_reclaim_rotates_running_to_dispatched_and_logs_in_the_same_transaction(
    db: Database,
) -> None:
    lease = support.running_lease(db)
    support.age_heartbeat(db, lease.apply_id, 600)
    (done,) = reclaim(db, POLICY)
    assert done.lease is not None
    row = applies_repo.get(db, lease.apply_id)
    assert (row["state"], row["lease_epoch"], row["lease_owner"], row["reclaim_count"]) == (
        "dispatched",
        lease.epoch + 1,
        None,
        1,
    )
    assert row["lease_acquired_at"] is None
    assert row["heartbeat_age"] < 5
    assert row["finished_at"] is None
    assert support.log_events(db, lease.apply_id)[-1] == (done.lease.epoch, "reclaimed")


@contextmanager
def refuse_log_event(db: Database, event: str) -> Iterator[None]:
    """A trigger that makes the database refuse one kind of log line: a real failure between the
    rotation and its log, without mocks."""
    drop = ["DROP TRIGGER IF EXISTS refuse_log"]
    if db.is_sqlite:
        create = [
            "CREATE TRIGGER refuse_log BEFORE INSERT ON apply_logs "
            f"WHEN NEW.event = '{event}' BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
        ]
    elif db.dialect == "postgresql":
        create = [
            "CREATE FUNCTION refuse_log() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.event = '{event}' THEN RAISE EXCEPTION 'refused by test'; END IF; "
            "RETURN NEW; END $$",
            "CREATE TRIGGER refuse_log BEFORE INSERT ON apply_logs FOR EACH ROW "
            "EXECUTE FUNCTION refuse_log()",
        ]
        drop = ["DROP TRIGGER IF EXISTS refuse_log ON apply_logs", "DROP FUNCTION refuse_log()"]
    else:
        create = [
            "CREATE TRIGGER refuse_log BEFORE INSERT ON apply_logs FOR EACH ROW BEGIN "
            f"IF NEW.event = '{event}' THEN "
            "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by test'; END IF; END"
        ]
    with db.transaction() as conn:
        for statement in create:
            conn.exec_driver_sql(statement)
    try:
        yield
    finally:
        with db.transaction() as conn:
            for statement in drop:
                conn.exec_driver_sql(statement)


def test_rotation_and_its_log_commit_together(db: Database) -> None:
    lease = support.running_lease(db)
    support.age_heartbeat(db, lease.apply_id, 600)
    before = support.snapshot(db)
    with refuse_log_event(db, "reclaimed"), pytest.raises(StorageError, match="refused by test"):
        reclaim(db, POLICY)
    assert support.snapshot(db) == before  # the rotation did not commit without its log
    (done,) = reclaim(db, POLICY)
    assert done.apply_id == lease.apply_id


# --- max_reclaims ---------------------------------------------------------------------------------


def test_apply_fails_as_abandoned_after_max_reclaims(db: Database) -> None:
    policy = support.reclaim_policy(stale_after=30, dispatch_timeout=120, max_reclaims=2)
    lease = support.running_lease(db)
    for n in (1, 2):
        support.age_heartbeat(db, lease.apply_id, 60)
        (done,) = reclaim(db, policy)
        assert done.lease is not None
        assert applies_repo.get(db, lease.apply_id)["reclaim_count"] == n
        lease = done.lease
        redeem(db, lease, f"worker-{n + 1}")
    support.age_heartbeat(db, lease.apply_id, 60)
    (done,) = reclaim(db, policy)
    assert (done.apply_id, done.previous_epoch, done.lease) == (lease.apply_id, lease.epoch, None)
    row = applies_repo.get(db, lease.apply_id)
    assert (row["state"], row["lease_epoch"], row["lease_owner"]) == (
        "failed",
        lease.epoch + 1,
        None,
    )
    assert row["reclaim_count"] == 2  # the abandonment is not a reclaim
    assert row["finished_at"] is not None
    assert "abandoned" in row["error"]
    (last,) = applies_repo.logs(db, lease.apply_id)[-1:]
    assert (last["event"], last["lease_epoch"], last["level"]) == (
        "abandoned",
        lease.epoch + 1,
        "error",
    )
    with pytest.raises(LeaseLost):
        heartbeat(db, lease)
    before = support.snapshot(db)
    support.age_heartbeat(db, lease.apply_id, 10_000)
    aged = support.snapshot(db)
    assert reclaim(db, policy) == []  # failed is final
    assert support.snapshot(db) == aged
    assert aged != before


def test_max_reclaims_zero_abandons_a_never_redeemed_dispatch(db: Database) -> None:
    policy = support.reclaim_policy(stale_after=30, dispatch_timeout=120, max_reclaims=0)
    lease = dispatch(db, support.new_apply(db))
    support.age_heartbeat(db, lease.apply_id, 121)
    (done,) = reclaim(db, policy)
    assert done.lease is None
    assert done.from_state == "dispatched"
    row = applies_repo.get(db, lease.apply_id)
    assert row["state"] == "failed"
    assert "dispatch" in row["error"]
    with pytest.raises(LeaseLost):
        redeem(db, lease, "worker-1")


# --- batching and what is never touched --------------------------------------------------------


def test_batches_reclaim_every_stale_apply(db: Database) -> None:
    policy = support.reclaim_policy(stale_after=30, dispatch_timeout=120, batch_size=2)
    running = [support.running_lease(db) for _ in range(5)]
    dispatched = [dispatch(db, support.new_apply(db)) for _ in range(3)]
    fresh = support.running_lease(db)
    for lease in running:
        support.age_heartbeat(db, lease.apply_id, 31)
    for lease in dispatched:
        support.age_heartbeat(db, lease.apply_id, 121)
    fresh_rows = _rows(db, fresh.apply_id)
    done = reclaim(db, policy)
    assert sorted(d.apply_id for d in done) == sorted(
        lease.apply_id for lease in running + dispatched
    )
    assert len(done) == 8  # each exactly once
    for d in done:
        assert d.lease is not None
        assert support.lease_of(db, d.apply_id)[:3] == ("dispatched", d.lease.epoch, d.lease.token)
    assert _rows(db, fresh.apply_id) == fresh_rows
    assert reclaim(db, policy) == []  # a second pass finds nothing: heartbeats were renewed


def test_exact_multiple_of_the_batch_size(db: Database) -> None:
    policy = support.reclaim_policy(stale_after=30, batch_size=2)
    leases = [support.running_lease(db) for _ in range(4)]
    for lease in leases:
        support.age_heartbeat(db, lease.apply_id, 31)
    assert len(reclaim(db, policy)) == 4


@pytest.mark.parametrize(
    "state",
    [ApplyState.COMPLETED, ApplyState.FAILED, ApplyState.CANCELLED, ApplyState.STOPPED],
)
def test_finished_and_stopped_applies_are_never_touched(db: Database, state: ApplyState) -> None:
    lease = support.running_lease(db)
    release(db, lease, to_state=state, reason="tests")
    pending = support.new_apply(db)
    support.age_heartbeat(db, lease.apply_id, 10**6)
    support.age_heartbeat(db, pending, 10**6)  # a pending apply with a heartbeat set by hand
    before = support.snapshot(db)
    assert reclaim(db, support.reclaim_policy(stale_after=1, dispatch_timeout=1)) == []
    assert support.snapshot(db) == before


# --- the old holder after a reclaim ---------------------------------------------------------------


def test_old_holder_is_fenced_after_reclaim(db: Database) -> None:
    old = support.running_lease(db)
    (task, _) = support.task_ids(db, old.apply_id)
    support.age_heartbeat(db, old.apply_id, 31)
    (done,) = reclaim(db, POLICY)
    assert done.lease is not None
    for redeemed in (False, True):
        if redeemed:
            redeem(db, done.lease, "worker-2")
        before = support.snapshot(db)
        with pytest.raises(LeaseLost):
            heartbeat(db, old)
        with pytest.raises(LeaseLost):
            check(db, old)
        with pytest.raises(LeaseLost), fence(db, old) as fx:
            fenced.update_task(fx, task, progress=99)
        with pytest.raises(LeaseLost):
            hand_back(db, old, reason="old holder")
        with pytest.raises(LeaseLost):
            release(db, old, reason="old holder")
        with pytest.raises(LeaseLost):
            redeem(db, old, "worker-1")
        assert support.snapshot(db) == before
    with fence(db, done.lease) as fx:
        fenced.update_task(fx, task, progress=50)


def test_reclaimed_lease_round_trip(db: Database) -> None:
    lease = support.running_lease(db)
    support.age_heartbeat(db, lease.apply_id, 31)
    (done,) = reclaim(db, POLICY)
    assert done.lease is not None
    again = Lease.from_json(done.lease.to_json())
    redeem(db, again, "worker-2")
    heartbeat(db, again)
