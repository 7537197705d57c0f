"""The lease lifecycle: dispatch, redeem, heartbeat, check, hand back, release; submission."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from leases import (
    Lease,
    check,
    dispatch,
    fence,
    heartbeat,
    mint_token,
    reclaim,
    redeem,
)
from storage import applies as applies_repo
from storage import fenced, open_database
from storage.database import Database
from storage.errors import (
    ApplyNotFound,
    InvalidTransition,
    LeaseLost,
    StorageError,
    StorageUnavailable,
)
from storage.states import ApplyState
from storage.tables import apply_logs
from tests import support
from tests.support import hand_back, release

# --- dispatch ------------------------------------------------------------------------------------


def test_dispatch_from_queued(db: Database) -> None:
    apply_id = support.new_apply(db)
    assert support.lease_of(db, apply_id) == ("queued", 0, None, None)
    lease = dispatch(db, apply_id)
    row = applies_repo.get(db, apply_id)
    assert (lease.apply_id, lease.epoch) == (apply_id, 1)
    assert (row["state"], row["lease_epoch"], row["lease_token"]) == ("dispatched", 1, lease.token)
    assert row["lease_owner"] is None
    assert row["lease_acquired_at"] is None
    assert row["heartbeat_at"] is not None
    assert -1 < row["heartbeat_age"] < 5  # julianday arithmetic is not exact to the ms
    assert support.log_events(db, apply_id) == [(1, "dispatched")]


def test_every_dispatch_mints_a_new_token(db: Database) -> None:
    tokens = {dispatch(db, support.new_apply(db)).token for _ in range(5)}
    assert len(tokens) == 5


@pytest.mark.parametrize("state", ["dispatched", "running", "completed", "failed", "cancelled"])
def test_dispatch_refuses_applies_not_pending_or_stopped(db: Database, state: str) -> None:
    lease = dispatch(db, support.new_apply(db))
    if state != "dispatched":
        redeem(db, lease, "worker-1")
    if state in ("completed", "failed", "cancelled"):
        release(db, lease, to_state=ApplyState(state), reason="tests")
    before = support.snapshot(db)
    with pytest.raises(InvalidTransition) as caught:
        dispatch(db, lease.apply_id)
    assert caught.value.state == state
    assert support.snapshot(db) == before


def test_dispatch_unknown_apply(db: Database) -> None:
    before = support.snapshot(db)
    with pytest.raises(ApplyNotFound):
        dispatch(db, 10**9)
    assert support.snapshot(db) == before


# --- redeem --------------------------------------------------------------------------------------


def test_redeem_once(db: Database) -> None:
    lease = dispatch(db, support.new_apply(db))
    redeem(db, lease, "worker-7")
    row = applies_repo.get(db, lease.apply_id)
    assert (row["state"], row["lease_epoch"], row["lease_owner"]) == ("running", 1, "worker-7")
    assert row["lease_acquired_at"] is not None
    assert support.log_events(db, lease.apply_id)[-1] == (1, "redeemed")


def test_second_redeem_is_already_redeemed(db: Database) -> None:
    lease = dispatch(db, support.new_apply(db))
    redeem(db, lease, "worker-1")
    before = support.snapshot(db)
    for owner in ("worker-1", "worker-2"):  # the same worker again, or a duplicated message
        with pytest.raises(LeaseLost, match="already redeemed"):
            redeem(db, lease, owner)
    assert support.snapshot(db) == before
    assert support.lease_of(db, lease.apply_id)[3] == "worker-1"


def test_redeem_of_a_stale_lease(db: Database) -> None:
    old = dispatch(db, support.new_apply(db))
    redeem(db, old, "worker-1")
    new = hand_back(db, old, reason="tests")
    before = support.snapshot(db)
    with pytest.raises(LeaseLost) as caught:
        redeem(db, old, "worker-2")
    assert caught.value.current_epoch == new.epoch
    assert support.snapshot(db) == before
    redeem(db, new, "worker-2")


def test_redeem_of_a_lease_never_issued(db: Database) -> None:
    lease = dispatch(db, support.new_apply(db))
    before = support.snapshot(db)
    for future in (
        Lease(lease.apply_id, lease.epoch + 1, mint_token()),
        Lease(lease.apply_id, 99, lease.token),
    ):
        with pytest.raises(LeaseLost, match="never issued"):
            redeem(db, future, "worker-1")
    # Right epoch, forged token.
    with pytest.raises(LeaseLost):
        redeem(db, Lease(lease.apply_id, lease.epoch, mint_token()), "worker-1")
    assert support.snapshot(db) == before
    redeem(db, lease, "worker-1")


def test_redeem_of_a_pending_apply(db: Database) -> None:
    apply_id = support.new_apply(db)
    before = support.snapshot(db)
    with pytest.raises(LeaseLost, match="never issued"):
        redeem(db, Lease(apply_id, 1, mint_token()), "worker-1")
    assert support.snapshot(db) == before


def test_redeem_unknown_apply(db: Database) -> None:
    before = support.snapshot(db)
    with pytest.raises(ApplyNotFound):
        redeem(db, Lease(10**9, 1, mint_token()), "worker-1")
    assert support.snapshot(db) == before


# --- heartbeat and check -------------------------------------------------------------------------


def test_heartbeat_moves_heartbeat_at_by_the_db_clock(db: Database) -> None:
    lease = support.running_lease(db)
    support.age_heartbeat(db, lease.apply_id, 3600)
    aged = applies_repo.get(db, lease.apply_id)
    assert 3590 < aged["heartbeat_age"] < 3660
    heartbeat(db, lease)
    fresh = applies_repo.get(db, lease.apply_id)
    assert -1 < fresh["heartbeat_age"] < 5
    assert fresh["heartbeat_at"] > aged["heartbeat_at"]
    # Only liveness moved: the lease itself is untouched.
    assert (fresh["lease_epoch"], fresh["lease_token"], fresh["lease_owner"]) == (
        aged["lease_epoch"],
        aged["lease_token"],
        aged["lease_owner"],
    )


def test_repeated_heartbeats_are_not_lost_leases(db: Database) -> None:
    lease = support.running_lease(db)
    for _ in range(20):  # several may land in the same clock tick: matched rows, not changed
        heartbeat(db, lease)


@pytest.mark.parametrize("how", ["hand_back", "release", "reclaim"])
def test_heartbeat_after_rotation_is_lease_lost(db: Database, how: str) -> None:
    lease = support.running_lease(db)
    if how == "hand_back":
        hand_back(db, lease, reason="tests")
    elif how == "release":
        release(db, lease, reason="tests")
    else:
        support.age_heartbeat(db, lease.apply_id, 100)
        assert len(reclaim(db, support.reclaim_policy(stale_after=10))) == 1
    before = support.snapshot(db)
    with pytest.raises(LeaseLost):
        heartbeat(db, lease)
    with pytest.raises(LeaseLost):
        check(db, lease)
    assert support.snapshot(db) == before


def test_heartbeat_of_a_dispatched_lease_is_lease_lost(db: Database) -> None:
    lease = dispatch(db, support.new_apply(db))
    before = support.snapshot(db)
    with pytest.raises(LeaseLost, match="dispatched"):
        heartbeat(db, lease)
    assert support.snapshot(db) == before


def test_heartbeat_of_a_lease_never_issued_is_lease_lost(db: Database) -> None:
    """Every epoch has exactly one token: a heartbeat with the current epoch and another token, or
    with the current token and another epoch, renews nothing (``heartbeat_at`` stays old)."""
    lease = hand_back(db, support.running_lease(db), reason="tests")  # epoch 2: one below too
    redeem(db, lease, "worker-2")
    support.age_heartbeat(db, lease.apply_id, 40)
    before = support.snapshot(db)
    for forged in (
        Lease(lease.apply_id, lease.epoch, mint_token()),
        Lease(lease.apply_id, lease.epoch + 1, lease.token),
        Lease(lease.apply_id, lease.epoch - 1, lease.token),
    ):
        with pytest.raises(LeaseLost):
            heartbeat(db, forged)
    assert support.snapshot(db) == before
    heartbeat(db, lease)
    assert applies_repo.get(db, lease.apply_id)["heartbeat_age"] < 40


def test_heartbeat_unknown_apply(db: Database) -> None:
    with pytest.raises(ApplyNotFound):
        heartbeat(db, Lease(10**9, 1, mint_token()))


def test_check_is_non_mutating(db: Database) -> None:
    lease = support.running_lease(db)
    support.age_heartbeat(db, lease.apply_id, 50)
    before = support.snapshot(db)
    check(db, lease)
    check(db, lease)
    assert support.snapshot(db) == before
    forged = Lease(lease.apply_id, lease.epoch, mint_token())
    with pytest.raises(LeaseLost):
        check(db, forged)
    with pytest.raises(ApplyNotFound):
        check(db, Lease(10**9, 1, mint_token()))
    assert support.snapshot(db) == before


# --- hand back and release -----------------------------------------------------------------------


def test_hand_back_rotates_to_a_dispatched_lease(db: Database) -> None:
    old = support.running_lease(db)
    new = hand_back(db, old, reason="worker shutting down")
    assert (new.apply_id, new.epoch) == (old.apply_id, old.epoch + 1)
    assert new.token != old.token
    state, epoch, token, owner = support.lease_of(db, old.apply_id)
    assert (state, epoch, token, owner) == ("dispatched", new.epoch, new.token, None)
    assert support.log_events(db, old.apply_id)[-1] == (new.epoch, "handed_back")
    before = support.snapshot(db)
    with pytest.raises(LeaseLost), fence(db, old) as fx:
        fenced.append_log(fx, "stale", "must not land")
    with pytest.raises(LeaseLost):
        hand_back(db, old, reason="again")
    assert support.snapshot(db) == before
    redeem(db, new, "worker-2")
    with fence(db, new) as fx:
        fenced.append_log(fx, "resumed", "by worker-2")


def test_release_to_stopped_then_resume(db: Database) -> None:
    lease = support.running_lease(db)
    epoch = release(db, lease, reason="stop requested")
    assert epoch == lease.epoch + 1
    state, stored_epoch, token, owner = support.lease_of(db, lease.apply_id)
    assert (state, stored_epoch, owner) == ("stopped", epoch, None)
    assert token not in (None, lease.token)  # rotated to a token nobody holds
    with pytest.raises(LeaseLost):
        heartbeat(db, lease)
    resumed = dispatch(db, lease.apply_id)
    assert resumed.epoch == epoch + 1
    redeem(db, resumed, "worker-2")
    assert support.lease_of(db, lease.apply_id)[:2] == ("running", resumed.epoch)
    events = [e for _, e in support.log_events(db, lease.apply_id)]
    assert events == ["dispatched", "redeemed", "released", "dispatched", "redeemed"]


@pytest.mark.parametrize("state", [ApplyState.COMPLETED, ApplyState.FAILED, ApplyState.CANCELLED])
def test_release_to_a_terminal_state(db: Database, state: ApplyState) -> None:
    lease = support.running_lease(db)
    error = None if state == ApplyState.COMPLETED else f"{state} for a reason"
    epoch = release(db, lease, to_state=state, event=str(state), reason="done", error=error)
    row = applies_repo.get(db, lease.apply_id)
    assert (row["state"], row["lease_epoch"], row["lease_owner"]) == (state, epoch, None)
    assert row["finished_at"] is not None
    assert row["error"] == error
    assert support.log_events(db, lease.apply_id)[-1] == (epoch, str(state))
    before = support.snapshot(db)
    with pytest.raises(InvalidTransition):
        dispatch(db, lease.apply_id)
    with pytest.raises(LeaseLost):
        release(db, lease, reason="twice")
    assert support.snapshot(db) == before


def test_release_of_a_forged_lease(db: Database) -> None:
    lease = support.running_lease(db)
    before = support.snapshot(db)
    with pytest.raises(LeaseLost):
        release(db, Lease(lease.apply_id, lease.epoch, mint_token()), reason="forged")
    with pytest.raises(ApplyNotFound):
        release(db, Lease(10**9, 1, mint_token()), reason="unknown")
    assert support.snapshot(db) == before


# --- a connection error is not a lost lease -------------------------------------------------------


UNREACHABLE = {
    "mysql_closed_port": "mysql+mysqldb://root@127.0.0.1:1/leasehold",
    "sqlite_missing_dir": "sqlite:///{tmp}/missing/dir/x.sqlite3",
}

CONNECTED_OPERATIONS: dict[str, Callable[[Database, Lease], object]] = {
    "heartbeat": heartbeat,
    "check": check,
    "redeem": lambda db, lease: redeem(db, lease, "w"),
    "dispatch": lambda db, lease: dispatch(db, lease.apply_id),
    "hand_back": lambda db, lease: hand_back(db, lease, reason="r"),
    "release": lambda db, lease: release(db, lease, reason="r"),
    "fence": lambda db, lease: _enter_fence(db, lease),
}


def _enter_fence(db: Database, lease: Lease) -> None:
    with fence(db, lease):
        pass


@pytest.mark.parametrize("op", list(CONNECTED_OPERATIONS))
@pytest.mark.parametrize("where", list(UNREACHABLE))
def test_connection_error_is_storage_unavailable_not_lease_lost(
    tmp_path: Path, where: str, op: str
) -> None:
    db = open_database(UNREACHABLE[where].format(tmp=tmp_path))
    try:
        with pytest.raises(StorageUnavailable) as caught:
            CONNECTED_OPERATIONS[op](db, Lease(1, 1, mint_token()))
        assert not isinstance(caught.value, LeaseLost)
    finally:
        db.dispose()


def test_killed_connection_is_not_a_lost_lease(mysql_server: str) -> None:
    """The server drops the worker's pooled connection: the next heartbeat reconnects
    (pool_pre_ping) and succeeds; at worst it is StorageUnavailable, never LeaseLost."""
    db = open_database(mysql_server, pool_size=1)
    admin = open_database(mysql_server)
    try:
        support.wipe(db)
        lease = support.running_lease(db)
        with db.transaction() as conn:
            conn_id = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
        with admin.transaction() as conn:
            conn.exec_driver_sql(f"KILL CONNECTION {int(conn_id)}")
        heartbeat(db, lease)
        check(db, lease)
    finally:
        support.wipe(admin)
        db.dispose()
        admin.dispose()


# --- submission ----------------------------------------------------------------------------------


def _new(request_id: str | None = None, tasks: int = 3) -> applies_repo.NewApply:
    return applies_repo.NewApply(
        database_name=support.new_database(),
        environment="production",
        engine="sleep",
        repository="acme/shop",
        pull_request=12,
        head_sha="a" * 40,
        request_id=request_id,
        tasks=[
            applies_repo.NewTask(f"t{i}", f"ALTER TABLE t{i} ADD c{i} INT", {"i": i, "x": [1]})
            for i in range(tasks)
        ],
    )


def test_create_inserts_the_apply_and_its_tasks(db: Database) -> None:
    created = applies_repo.create(db, _new())
    assert created.created
    row = applies_repo.get(db, created.apply_id)
    assert (row["state"], row["lease_epoch"], row["lease_token"], row["reclaim_count"]) == (
        "queued",
        0,
        None,
        0,
    )
    assert (row["repository"], row["pull_request"], row["head_sha"]) == ("acme/shop", 12, "a" * 40)
    tasks = applies_repo.tasks(db, created.apply_id)
    assert [(t["position"], t["table_name"], t["state"], t["progress"]) for t in tasks] == [
        (i, f"t{i}", "pending", 0) for i in range(3)
    ]
    assert [t["options"] for t in tasks] == [{"i": i, "x": [1]} for i in range(3)]
    assert support.snapshot(db)["apply_logs"] == []


def test_create_is_one_transaction(db: Database) -> None:
    """The tasks insert fails after the apply insert ran: no half-created apply remains."""
    bad = applies_repo.NewApply(
        database_name="shop",
        environment="staging",
        engine="sleep",
        tasks=[applies_repo.NewTask("t0", None)],  # type: ignore[arg-type]
    )
    before = support.snapshot(db)
    with pytest.raises(StorageError):
        applies_repo.create(db, bad)
    after = support.snapshot(db)
    # The line's first apply made the line's row first, in a transaction of its own; it stays.
    assert [row[:2] for row in after.pop("apply_lines")] == [("shop", "staging")]
    before.pop("apply_lines")
    assert after == before


def test_repeated_request_id_returns_the_same_apply(db: Database) -> None:
    first = applies_repo.create(db, _new("req-1"))
    before = support.snapshot(db)
    again = applies_repo.create(db, _new("req-1", tasks=5))
    assert (again.apply_id, again.created) == (first.apply_id, False)
    assert support.snapshot(db) == before
    other = applies_repo.create(db, _new("req-2"))
    assert other.created
    assert other.apply_id != first.apply_id
    # Without a request_id every submission is a new apply.
    assert applies_repo.create(db, _new()).apply_id != applies_repo.create(db, _new()).apply_id


def test_get_unknown_apply(db: Database) -> None:
    with pytest.raises(ApplyNotFound):
        applies_repo.get(db, 10**9)


# --- invariant 5: log epochs never go down --------------------------------------------------------


def _stale_attempt(db: Database, stale: Lease, rng: random.Random, step: int) -> None:
    if rng.random() < 0.5:
        with fence(db, stale) as fx:
            fenced.append_log(fx, "stale", f"step {step}")
    else:
        heartbeat(db, stale)


@dataclass
class Model:
    """What the test believes about one apply."""

    apply_id: int
    lease: Lease | None  # the current lease if somebody may hold it; None when stopped
    phase: str  # dispatched | running | stopped
    old: list[Lease] = field(default_factory=list)


def test_log_epochs_never_decrease_over_a_mixed_run(db: Database) -> None:
    rng = random.Random(20261126)
    policy = support.reclaim_policy(stale_after=30, dispatch_timeout=600, max_reclaims=1000)
    models = [
        Model(a.apply_id, a, "running") for a in (support.running_lease(db) for _ in range(3))
    ]
    rejected = 0
    for step in range(200):
        m = rng.choice(models)
        if m.phase == "running":
            assert m.lease is not None
            op = rng.choice(
                [
                    "write",
                    "write",
                    "write",
                    "heartbeat",
                    "stale",
                    "hand_back",
                    "release",
                    "reclaim",
                    "redeem_again",
                ]
            )
        elif m.phase == "dispatched":
            op = rng.choice(["redeem", "redeem", "stale", "reclaim_dispatched"])
        else:
            op = rng.choice(["dispatch", "stale"])

        if op == "stale":
            if not m.old:
                continue
            stale = rng.choice(m.old)
            logs_before = len(applies_repo.logs(db, m.apply_id))
            with pytest.raises(LeaseLost):
                _stale_attempt(db, stale, rng, step)
            assert len(applies_repo.logs(db, m.apply_id)) == logs_before
            rejected += 1
        elif op == "write":
            assert m.lease is not None
            task = rng.choice(support.task_ids(db, m.apply_id))
            with fence(db, m.lease) as fx:
                fenced.append_log(fx, "progress", f"step {step}")
                fenced.update_task(fx, task, progress=rng.randint(0, 100))
        elif op == "heartbeat":
            assert m.lease is not None
            heartbeat(db, m.lease)
        elif op == "redeem_again":
            assert m.lease is not None
            with pytest.raises(LeaseLost):
                redeem(db, m.lease, "duplicate")
            rejected += 1
        elif op == "hand_back":
            assert m.lease is not None
            m.old.append(m.lease)
            m.lease, m.phase = hand_back(db, m.lease, reason=f"step {step}"), "dispatched"
        elif op == "release":
            assert m.lease is not None
            m.old.append(m.lease)
            release(db, m.lease, reason=f"step {step}")
            m.lease, m.phase = None, "stopped"
        elif op in ("reclaim", "reclaim_dispatched"):
            assert m.lease is not None
            support.age_heartbeat(db, m.apply_id, 700)
            (done,) = reclaim(db, policy)
            assert done.apply_id == m.apply_id
            assert done.lease is not None
            m.old.append(m.lease)
            m.lease, m.phase = done.lease, "dispatched"
        elif op == "redeem":
            assert m.lease is not None
            redeem(db, m.lease, f"worker-{step}")
            m.phase = "running"
        elif op == "dispatch":
            m.lease, m.phase = dispatch(db, m.apply_id), "dispatched"

    assert rejected > 10
    for m in models:
        with db.transaction() as conn:
            epochs = list(
                conn.execute(
                    select(apply_logs.c.lease_epoch)
                    .where(apply_logs.c.apply_id == m.apply_id)
                    .order_by(apply_logs.c.id)
                ).scalars()
            )
        assert epochs == sorted(epochs)
        assert len(set(epochs)) > 3, "the run should have rotated every apply several times"
        state, epoch, _, _ = support.lease_of(db, m.apply_id)
        assert epochs[-1] == epoch
        assert state == m.phase
