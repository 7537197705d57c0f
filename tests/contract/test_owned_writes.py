"""Every owned write in storage.fenced: lands with the current lease, fails closed otherwise.

"Fails closed" means the exact error class and not one row of any table changed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import select, text, update

from leases import Lease, fence, mint_token, reclaim, redeem
from storage import applies as applies_repo
from storage import control, fenced, open_database
from storage.database import Database
from storage.errors import ApplyNotFound, FenceClosed, LeaseholdError, LeaseLost, RowNotFound
from storage.fenced import Fenced
from storage.states import ApplyState, ControlState, TaskState
from storage.tables import apply_logs, apply_tasks, metadata
from tests import support
from tests.support import hand_back, release


@dataclass(frozen=True)
class Target:
    """What one owned write aims at: the apply's first task and its pending control request."""

    task_id: int
    request_id: int


Write = Callable[[Fenced, Target], object]

WRITES: dict[str, Write] = {
    "set_apply_state": lambda fx, t: fenced.set_apply_state(
        fx, ApplyState.FAILED, error="engine crashed"
    ),
    "update_task": lambda fx, t: fenced.update_task(
        fx, t.task_id, state="running", progress=55, checkpoint={"row": 10}
    ),
    "append_log": lambda fx, t: fenced.append_log(fx, "progress", "55% done"),
    "finish_control_request": lambda fx, t: fenced.finish_control_request(
        fx, t.request_id, state=ControlState.COMPLETED
    ),
    "start_task": lambda fx, t: fenced.start_task(fx, t.task_id),
    "finish_task": lambda fx, t: fenced.finish_task(fx, t.task_id, TaskState.COMPLETED),
    "cancel_unfinished_tasks": lambda fx, t: fenced.cancel_unfinished_tasks(fx),
    # Last: it rotates the lease away and closes the handle.
    "end_lease": lambda fx, t: fenced.end_lease(
        fx, new_token=mint_token(), to_state=ApplyState.STOPPED, event="stopped", reason="tests"
    ),
}


def bound(write: Write, target: Target) -> Callable[[Fenced], object]:
    return lambda fx: write(fx, target)


def in_fence(db: Database, lease: Lease, *writes: Callable[[Fenced], object]) -> None:
    """Run ``writes`` in order in one fenced transaction."""
    with fence(db, lease) as fx:
        for write in writes:
            write(fx)


def _target(db: Database, apply_id: int) -> Target:
    return Target(
        task_id=support.task_ids(db, apply_id)[0],
        request_id=support.insert_control_request(db, apply_id, action="stop"),
    )


def _forged(lease: Lease) -> Lease:
    return Lease(lease.apply_id, lease.epoch, mint_token())


def _after_hand_back(db: Database, lease: Lease) -> Lease:
    hand_back(db, lease, reason="tests")
    return lease


def _after_hand_back_and_redeem(db: Database, lease: Lease) -> Lease:
    # The apply is running again, under another worker: only the token tells the two apart.
    redeem(db, hand_back(db, lease, reason="tests"), "worker-2")
    return lease


def _after_release(db: Database, lease: Lease) -> Lease:
    release(db, lease, reason="tests")
    return lease


def _after_reclaim(db: Database, lease: Lease) -> Lease:
    support.age_heartbeat(db, lease.apply_id, 120)
    (done,) = reclaim(db, support.reclaim_policy(stale_after=60))
    assert done.apply_id == lease.apply_id
    return lease


def _forged_token(db: Database, lease: Lease) -> Lease:
    return _forged(lease)


def _forged_next_epoch(db: Database, lease: Lease) -> Lease:
    return Lease(lease.apply_id, lease.epoch + 1, mint_token())


def _forged_epoch_current_token(db: Database, lease: Lease) -> Lease:
    # The fence's SELECT matches (token, running); only its comparison of epochs refuses this.
    return Lease(lease.apply_id, lease.epoch + 1, lease.token)


def _unknown_apply(db: Database, lease: Lease) -> Lease:
    return Lease(lease.apply_id + 10_000, lease.epoch, mint_token())


STALE: dict[str, tuple[Callable[[Database, Lease], Lease], type[LeaseholdError]]] = {
    "hand_back": (_after_hand_back, LeaseLost),
    "hand_back+redeem": (_after_hand_back_and_redeem, LeaseLost),
    "release": (_after_release, LeaseLost),
    "reclaim": (_after_reclaim, LeaseLost),
    "forged_token": (_forged_token, LeaseLost),
    "forged_next_epoch": (_forged_next_epoch, LeaseLost),
    "forged_epoch_current_token": (_forged_epoch_current_token, LeaseLost),
    "unknown_apply": (_unknown_apply, ApplyNotFound),
}


@pytest.mark.parametrize("how", list(STALE))
@pytest.mark.parametrize("write", list(WRITES))
def test_write_fails_closed(db: Database, write: str, how: str) -> None:
    lease = support.running_lease(db)
    target = _target(db, lease.apply_id)
    make_stale, expected = STALE[how]
    stale = make_stale(db, lease)
    before = support.snapshot(db)
    entered = False

    def attempt() -> None:
        nonlocal entered
        with fence(db, stale) as fx:
            entered = True
            WRITES[write](fx, target)

    with pytest.raises(LeaseholdError) as caught:
        attempt()

    assert type(caught.value) is expected
    assert not entered, "the block must not run under a lease that is not current"
    assert support.snapshot(db) == before


@pytest.mark.parametrize("write", list(WRITES))
def test_write_fails_closed_on_a_dispatched_lease_nobody_redeemed(db: Database, write: str) -> None:
    """The fence admits running applies only: a dispatched lease must be redeemed first."""
    lease = support.running_lease(db)
    target = _target(db, lease.apply_id)
    new = hand_back(db, lease, reason="tests")
    before = support.snapshot(db)
    with pytest.raises(LeaseLost), fence(db, new) as fx:
        WRITES[write](fx, target)
    assert support.snapshot(db) == before


class _Set:
    """Matches any value but None: a time the database set, an id it assigned."""

    def __eq__(self, other: object) -> bool:
        return other is not None

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "<set>"


class _Other:
    """Matches any value but None and ``value``: a newly minted token."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return other is not None and other != self.value

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<not {self.value!r}>"


SET: Any = _Set()

Rows = dict[str, dict[tuple[Any, ...], dict[str, Any]]]


def rows_by_key(db: Database) -> Rows:
    """Every row of every leasehold table as a dict, by primary key."""
    out: Rows = {}
    with db.transaction() as conn:
        for name in support.TABLES:
            table = metadata.tables[name]
            key = [c.name for c in table.primary_key.columns]
            out[name] = {
                tuple(r[k] for k in key): dict(r) for r in conn.execute(select(table)).mappings()
            }
    return out


@dataclass(frozen=True)
class Effect:
    """What one owned write must do, and nothing else: the rows it updates (by primary key, the
    columns it sets and their values; every other column keeps its value) and the rows it adds."""

    updated: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    added: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def assert_effect(before: Rows, after: Rows, effect: Effect) -> None:
    for name in support.TABLES:
        old, new = before[name], after[name]
        assert [key for key in old if key not in new] == [], f"{name}: rows removed"
        added = [row for key, row in new.items() if key not in old]
        assert added == effect.added.get(name, []), f"{name}: rows added"
        changed = {
            key: {column for column, value in row.items() if old[key][column] != value}
            for key, row in new.items()
            if key in old and row != old[key]
        }
        wanted = effect.updated.get(name, {})
        assert sorted(changed) == sorted(wanted), f"{name}: rows updated"
        for key, values in wanted.items():
            beyond = changed[key] - set(values)
            assert not beyond, f"{name} {key}: columns changed besides {sorted(values)}: {beyond}"
            assert {column: new[key][column] for column in values} == values, f"{name} {key}"


def expected_effect(write: str, lease: Lease, target: Target, tasks: list[int]) -> Effect:
    apply, epoch = (lease.apply_id,), lease.epoch
    task = (target.task_id,)
    log = {"id": SET, "apply_id": lease.apply_id, "level": "info", "created_at": SET}
    effects = {
        "set_apply_state": Effect(
            updated={
                "applies": {
                    apply: {
                        "state": "failed",
                        "error": "engine crashed",
                        "finished_at": SET,
                        "updated_at": SET,
                    }
                }
            }
        ),
        "update_task": Effect(
            updated={
                "apply_tasks": {
                    task: {
                        "state": "running",
                        "progress": 55,
                        "checkpoint": {"row": 10},
                        "lease_epoch": epoch,
                    }
                }
            }
        ),
        "append_log": Effect(
            added={
                "apply_logs": [
                    {**log, "lease_epoch": epoch, "event": "progress", "message": "55% done"}
                ]
            }
        ),
        "finish_control_request": Effect(
            updated={
                "control_requests": {
                    (target.request_id,): {
                        "state": "completed",
                        "completed_at": SET,
                        "error": None,
                        "pending_action": None,
                    }
                }
            }
        ),
        "start_task": Effect(
            updated={
                "apply_tasks": {task: {"state": "running", "lease_epoch": epoch, "started_at": SET}}
            }
        ),
        "finish_task": Effect(
            updated={
                "apply_tasks": {
                    task: {
                        "state": "completed",
                        "progress": 100,
                        "lease_epoch": epoch,
                        "finished_at": SET,
                    }
                }
            }
        ),
        "cancel_unfinished_tasks": Effect(
            updated={
                "apply_tasks": {
                    (t,): {"state": "cancelled", "lease_epoch": epoch, "finished_at": SET}
                    for t in tasks
                }
            }
        ),
        # A rotation away (not terminal: the pending stop request is left for whoever acts on it).
        "end_lease": Effect(
            updated={
                "applies": {
                    apply: {
                        "state": "stopped",
                        "lease_epoch": epoch + 1,
                        "lease_token": _Other(lease.token),
                        "lease_owner": None,
                        "lease_acquired_at": None,
                        "heartbeat_at": SET,
                        "updated_at": SET,
                    }
                }
            },
            added={
                "apply_logs": [
                    {
                        **log,
                        "lease_epoch": epoch + 1,
                        "event": "stopped",
                        "message": f"epoch {epoch + 1}: tests",
                    }
                ]
            },
        ),
    }
    assert set(effects) == set(WRITES)
    return effects[write]


@pytest.mark.parametrize("write", list(WRITES))
def test_write_lands_with_the_current_lease(db: Database, write: str) -> None:
    """Each owned write, under the current lease, does exactly its own change: the rows and
    columns it names, at the lease's epoch, and nothing else in any table: not a row of another
    running apply with the same kinds of rows either."""
    lease = support.running_lease(db)
    target = _target(db, lease.apply_id)
    bystander = support.running_lease(db, owner="worker-2")
    _target(db, bystander.apply_id)
    before = rows_by_key(db)
    with fence(db, lease) as fx:
        WRITES[write](fx, target)
    effect = expected_effect(write, lease, target, support.task_ids(db, lease.apply_id))
    assert_effect(before, rows_by_key(db), effect)


def test_writes_are_stamped_with_the_lease_epoch(db: Database) -> None:
    first = support.running_lease(db)
    lease = hand_back(db, first, reason="tests")
    redeem(db, lease, "worker-2")
    target = _target(db, lease.apply_id)
    for name in ("update_task", "append_log"):
        with fence(db, lease) as fx:
            WRITES[name](fx, target)
    with fence(db, lease) as fx:
        WRITES["finish_control_request"](fx, target)
    apply_id = lease.apply_id
    task = applies_repo.tasks(db, apply_id)[0]
    assert (task["state"], task["progress"], task["checkpoint"]) == ("running", 55, {"row": 10})
    assert task["lease_epoch"] == lease.epoch
    assert support.log_events(db, apply_id)[-1] == (lease.epoch, "progress")
    with db.transaction() as conn:
        request_row = conn.execute(
            text("SELECT state, completed_at, pending_action FROM control_requests")
        ).one()
    assert request_row[0] == "completed"
    assert request_row[1] is not None
    assert request_row[2] is None  # no longer counted as the pending request of its action


def test_set_apply_state_ends_the_lease_rights(db: Database) -> None:
    lease = support.running_lease(db)
    with fence(db, lease) as fx:
        fenced.set_apply_state(fx, ApplyState.COMPLETED)
    row = applies_repo.get(db, lease.apply_id)
    assert row["state"] == "completed"
    assert row["finished_at"] is not None
    before = support.snapshot(db)
    with pytest.raises(LeaseLost, match="completed"), fence(db, lease) as fx:
        fenced.append_log(fx, "late", "must not land")
    assert support.snapshot(db) == before


def test_finishing_a_control_request_twice_is_row_not_found(db: Database) -> None:
    lease = support.running_lease(db)
    request_id = support.insert_control_request(db, lease.apply_id, action="cancel")
    with fence(db, lease) as fx:
        fenced.finish_control_request(fx, request_id, state=ControlState.FAILED, error="nope")
    before = support.snapshot(db)
    with pytest.raises(RowNotFound), fence(db, lease) as fx:
        fenced.finish_control_request(fx, request_id, state=ControlState.COMPLETED)
    assert support.snapshot(db) == before


# --- writes aimed at rows of another apply ------------------------------------------------------


def test_task_of_another_apply_is_row_not_found_and_rolls_back(db: Database) -> None:
    lease = support.running_lease(db)
    other = support.running_lease(db, owner="worker-2")
    (foreign_task, _) = support.task_ids(db, other.apply_id)
    (own_task, _) = support.task_ids(db, lease.apply_id)
    before = support.snapshot(db)
    with pytest.raises(RowNotFound):
        # Writes that would land, then the bad one: the whole transaction must go.
        in_fence(
            db,
            lease,
            lambda fx: fenced.append_log(fx, "progress", "before the bad write"),
            lambda fx: fenced.update_task(fx, own_task, progress=10),
            lambda fx: fenced.update_task(fx, foreign_task, progress=99),
        )
    assert support.snapshot(db) == before


def test_unknown_task_id_is_row_not_found(db: Database) -> None:
    lease = support.running_lease(db)
    before = support.snapshot(db)
    with pytest.raises(RowNotFound), fence(db, lease) as fx:
        fenced.update_task(fx, 10**9, progress=1)
    assert support.snapshot(db) == before


def test_control_request_of_another_apply_is_row_not_found(db: Database) -> None:
    lease = support.running_lease(db)
    other = support.running_lease(db, owner="worker-2")
    foreign_request = support.insert_control_request(db, other.apply_id)
    before = support.snapshot(db)
    with pytest.raises(RowNotFound):
        in_fence(
            db,
            lease,
            lambda fx: fenced.append_log(fx, "control", "finishing a request"),
            lambda fx: fenced.finish_control_request(
                fx, foreign_request, state=ControlState.COMPLETED
            ),
        )
    assert support.snapshot(db) == before


# --- idempotent writes ----------------------------------------------------------------------------


def test_same_progress_twice_is_not_a_lost_lease(db: Database) -> None:
    lease = support.running_lease(db)
    task = support.task_ids(db, lease.apply_id)[0]
    # Same values in one fence (the second UPDATE changes no column) and in separate fences.
    with fence(db, lease) as fx:
        fenced.update_task(fx, task, progress=30, state="running")
        fenced.update_task(fx, task, progress=30, state="running")
    for _ in range(2):
        with fence(db, lease) as fx:
            fenced.update_task(fx, task, progress=30, state="running", checkpoint={"k": 1})
    assert applies_repo.tasks(db, lease.apply_id)[0]["progress"] == 30


def test_same_state_twice_is_not_a_lost_lease(db: Database) -> None:
    lease = support.running_lease(db)
    for _ in range(2):
        with fence(db, lease) as fx:
            fenced.set_apply_state(fx, ApplyState.RUNNING)
            fenced.set_apply_state(fx, ApplyState.RUNNING)
    # Still the holder: the fence admits it and the lease row is untouched.
    with fence(db, lease) as fx:
        fenced.append_log(fx, "still", "held")
    assert support.lease_of(db, lease.apply_id)[:3] == ("running", lease.epoch, lease.token)


def test_noop_update_reports_one_matched_row(db: Database) -> None:
    """The rowcount the owned writes rely on counts *matched* rows on both backends."""
    lease = support.running_lease(db)
    task = support.task_ids(db, lease.apply_id)[0]
    noop = (
        update(apply_tasks)
        .where(apply_tasks.c.id == task)
        .values(progress=apply_tasks.c.progress, state=apply_tasks.c.state)
    )
    with fence(db, lease) as fx:
        assert support.fence_connection(fx).execute(noop).rowcount == 1
        assert support.fence_connection(fx).execute(noop).rowcount == 1


def test_mariadb_counts_matched_rows_only_because_of_found_rows(mysql_server: str) -> None:
    """Proof on the real server: without CLIENT_FOUND_ROWS, MariaDB reports 0 for an UPDATE that
    changes nothing, which a naive fence would read as a lost lease. The engine leasehold opens
    reports 1, so the idempotent writes above are not mistaken for loss."""
    db = open_database(mysql_server)
    bare = open_database(mysql_server, connect_args={"client_flag": 0})
    try:
        support.wipe(db)
        lease = support.running_lease(db)
        task = support.task_ids(db, lease.apply_id)[0]
        noop = update(apply_tasks).where(apply_tasks.c.id == task).values(progress=0)
        with db.transaction() as conn:
            assert conn.execute(noop).rowcount == 1
        with bare.transaction() as conn:
            assert conn.execute(noop).rowcount == 0  # "changed rows": the trap
        with fence(db, lease) as fx:
            fenced.update_task(fx, task, progress=0)  # changes nothing, still not RowNotFound
    finally:
        support.wipe(db)
        db.dispose()
        bare.dispose()


# --- the fenced block ----------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_block_that_raises_after_writing_rolls_everything_back(db: Database) -> None:
    lease = support.running_lease(db)
    target = _target(db, lease.apply_id)
    before = support.snapshot(db)

    def boom(fx: Fenced) -> None:
        raise Boom

    # Every write (set_apply_state to a state that end_lease, the last one, can rotate from).
    writes = [bound(w, target) for name, w in WRITES.items() if name != "set_apply_state"]
    writes.insert(0, lambda fx: fenced.set_apply_state(fx, ApplyState.RUNNING, error="noted"))
    with pytest.raises(Boom):
        in_fence(db, lease, *writes, boom)
    assert support.snapshot(db) == before
    # The lease survived the failed block.
    with fence(db, lease) as fx:
        fenced.append_log(fx, "after", "rollback")


def test_handle_is_closed_after_the_block(db: Database) -> None:
    lease = support.running_lease(db)
    target = _target(db, lease.apply_id)
    with fence(db, lease) as fx:
        fenced.append_log(fx, "inside", "ok")
    assert "closed" in repr(fx)
    before = support.snapshot(db)
    for write in WRITES.values():
        with pytest.raises(FenceClosed):
            write(fx, target)
    with pytest.raises(FenceClosed):
        _ = support.fence_connection(fx)
    assert support.snapshot(db) == before


def test_handle_is_closed_after_a_block_that_raised(db: Database) -> None:
    lease = support.running_lease(db)
    with pytest.raises(Boom), fence(db, lease) as fx:
        raise Boom
    with pytest.raises(FenceClosed):
        fenced.append_log(fx, "late", "write")


def test_fenced_cannot_be_constructed_directly(db: Database) -> None:
    lease = support.running_lease(db)
    before = support.snapshot(db)
    known: dict[str, Any] = {
        "conn": None,
        "apply_id": lease.apply_id,
        "epoch": lease.epoch,
        "token": lease.token,
    }
    with db.transaction() as conn:
        known["conn"] = conn
        positional = [
            known[p.name]
            for p in inspect.signature(Fenced).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        with pytest.raises(FenceClosed):
            Fenced(*positional, line=None, _proof=object())
        with pytest.raises(TypeError):
            Fenced(conn, lease.apply_id, lease.epoch)  # type: ignore[call-arg]
    assert support.snapshot(db) == before


def test_fenced_log_append_is_ordered_and_stamped(db: Database) -> None:
    lease = support.running_lease(db)
    with fence(db, lease) as fx:
        for n in range(5):
            fenced.append_log(fx, "step", f"step {n}", level="debug")
    with db.transaction() as conn:
        rows = conn.execute(
            select(apply_logs.c.message, apply_logs.c.lease_epoch, apply_logs.c.level)
            .where(apply_logs.c.apply_id == lease.apply_id, apply_logs.c.event == "step")
            .order_by(apply_logs.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [(f"step {n}", lease.epoch, "debug") for n in range(5)]


# --- apply task lifecycle and the last write ------------------------------------------------------


def test_task_lifecycle_writes(db: Database) -> None:
    lease = support.running_lease(db, tasks=3)
    first, second, third = support.task_ids(db, lease.apply_id)
    with fence(db, lease) as fx:
        fenced.start_task(fx, first)
        fenced.update_task(fx, first, progress=40)
    started = applies_repo.tasks(db, lease.apply_id)[0]["started_at"]
    assert started is not None
    new = hand_back(db, lease, reason="tests")
    redeem(db, new, "worker-2")
    with fence(db, new) as fx:
        fenced.start_task(fx, first)  # a resume keeps the first start time
        fenced.finish_task(fx, first, TaskState.COMPLETED)
        fenced.start_task(fx, second)
        fenced.finish_task(fx, second, TaskState.FAILED, error="boom")
    with fence(db, new) as fx:
        fenced.cancel_unfinished_tasks(fx)
        fenced.cancel_unfinished_tasks(fx)  # nothing left to cancel: not an error
    rows = {r["id"]: r for r in applies_repo.tasks(db, lease.apply_id)}
    assert rows[first]["started_at"] == started
    assert (rows[first]["state"], rows[first]["progress"]) == ("completed", 100)
    assert (rows[second]["state"], rows[second]["error"]) == ("failed", "boom")
    assert rows[third]["state"] == "cancelled"
    assert {r["lease_epoch"] for r in rows.values()} == {new.epoch}
    assert all(r["finished_at"] is not None for r in rows.values())


@pytest.mark.parametrize("write", ["start_task", "finish_task"])
def test_task_lifecycle_write_to_another_apply_is_row_not_found(db: Database, write: str) -> None:
    lease = support.running_lease(db)
    other = support.running_lease(db, owner="worker-2")
    foreign = Target(support.task_ids(db, other.apply_id)[0], request_id=0)
    before = support.snapshot(db)
    with pytest.raises(RowNotFound):
        in_fence(
            db,
            lease,
            lambda fx: fenced.append_log(fx, "before", "the bad write"),
            bound(WRITES[write], foreign),
        )
    assert support.snapshot(db) == before


def test_end_lease_commits_with_the_writes_before_it(db: Database) -> None:
    lease = support.running_lease(db)
    (task, _) = support.task_ids(db, lease.apply_id)
    token = mint_token()
    with fence(db, lease) as fx:
        fenced.update_task(fx, task, state=TaskState.PENDING, checkpoint={"row": 5})
        epoch = fenced.end_lease(
            fx, new_token=token, to_state=ApplyState.DISPATCHED, event="handed_back", reason="t"
        )
    assert epoch == lease.epoch + 1
    assert support.lease_of(db, lease.apply_id) == ("dispatched", epoch, token, None)
    assert applies_repo.tasks(db, lease.apply_id)[0]["checkpoint"] == {"row": 5}
    assert support.log_events(db, lease.apply_id)[-1] == (epoch, "handed_back")
    with pytest.raises(LeaseLost):
        in_fence(db, lease, lambda fx: fenced.append_log(fx, "late", "write"))
    redeem(db, Lease(lease.apply_id, epoch, token), "worker-2")


def test_no_write_after_end_lease_in_the_same_block(db: Database) -> None:
    """A write after the rotation would carry the old epoch after the rotation's log line: the
    handle is closed by end_lease, and the whole block rolls back."""
    lease = support.running_lease(db)
    before = support.snapshot(db)
    with pytest.raises(FenceClosed):
        in_fence(
            db,
            lease,
            bound(WRITES["end_lease"], Target(0, 0)),
            lambda fx: fenced.append_log(fx, "late", "after the rotation"),
        )
    assert support.snapshot(db) == before
    in_fence(db, lease, lambda fx: fenced.append_log(fx, "still", "held"))


def test_finish_ends_the_apply_and_fails_the_requests_still_pending(db: Database) -> None:
    lease = support.running_lease(db)
    stop = support.insert_control_request(db, lease.apply_id, action="stop")
    with fence(db, lease, finishing=True) as fx:
        fenced.cancel_unfinished_tasks(fx)
        finished = fenced.finish(
            fx,
            new_token=mint_token(),
            successor_token=mint_token(),
            to_state=ApplyState.FAILED,
            event="failed",
            reason="engine failed",
            error="engine failed",
        )
    epoch = finished.epoch
    row = applies_repo.get(db, lease.apply_id)
    assert (row["state"], row["lease_epoch"], row["error"]) == ("failed", epoch, "engine failed")
    assert row["finished_at"] is not None
    assert support.log_events(db, lease.apply_id)[-1][0] == epoch
    assert finished.successor is None  # alone in its line
    request = control.get(db, stop)
    assert (request.state, request.error) == (
        ControlState.FAILED,
        "apply failed before the stop took effect",
    )


@pytest.mark.parametrize("state", [ApplyState.COMPLETED, ApplyState.CANCELLED])
def test_end_lease_refuses_a_terminal_state_and_finish_needs_the_line(
    db: Database, state: ApplyState
) -> None:
    """Ending an apply passes its line's turn on, so it must go through finish() with a fence
    that holds the line: the other ways fail as programming errors, writing nothing."""
    lease = support.running_lease(db)
    before = support.snapshot(db)
    with pytest.raises(FenceClosed, match="finish"), fence(db, lease) as fx:
        fenced.end_lease(fx, new_token=mint_token(), to_state=state, event="x", reason="t")
    with pytest.raises(FenceClosed, match="finishing=True"), fence(db, lease) as fx:
        fenced.finish(
            fx,
            new_token=mint_token(),
            successor_token=mint_token(),
            to_state=state,
            event="x",
            reason="t",
        )
    with pytest.raises(FenceClosed, match="end_lease"), fence(db, lease, finishing=True) as fx:
        fenced.finish(
            fx,
            new_token=mint_token(),
            successor_token=mint_token(),
            to_state=ApplyState.STOPPED,
            event="x",
            reason="t",
        )
    assert support.snapshot(db) == before
