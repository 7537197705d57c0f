"""Each condition and lock of the lease statements, shown to matter on its own.

The race tests (``test_races.py``) show that the fence, redemption, heartbeats and rotations
hold together; several of their clauses are nevertheless redundant *there*: a foreign key's
shared lock can do the fence's job, every rotation clears the owner that redemption checks, every
epoch has one token. The tests here force, for each clause, the one interleaving (or plant the one
row) where it alone decides, so that breaking it fails a test every time, on every backend and
isolation level (``make mutants`` breaks each one in a scratch copy and runs these;
``scripts/mutants.py`` lists them).

Interleavings are forced with the machinery of ``tests/races.py``: a hook on the fencing engine
starts a rotation at exactly the point where a check-then-act fence would be open to it, and the
test proves that the rotation *waits* (InnoDB's ``LOCK WAIT`` on MySQL/MariaDB, SQLite's busy
handler inside ``BEGIN IMMEDIATE``) rather than timing anything. Corrupt or impossible rows are
planted with direct SQL, which tests may write and the product never does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, RowMapping, delete, event, select, update

import leases
from leases import Lease, mint_token
from storage import _leasing as leasing
from storage import applies as applies_repo
from storage import fenced
from storage.database import Database
from storage.errors import LeaseLost
from storage.states import ApplyState
from storage.tables import applies, apply_logs, apply_tasks
from tests import support
from tests.races import (
    ISOLATIONS,
    JOIN,
    POLL,
    SETTLE,
    Spawn,
    Tap,
    Worker,
    holder_id,
    in_driver_call,
    prove_blocked,
    raw_connection_id,
    waits_for,
)

OpenDb = Callable[..., Database]


def logs(db: Database, apply_id: int) -> list[RowMapping]:
    return applies_repo.logs(db, apply_id, limit=100_000)


def only(rows: list[RowMapping], event_name: str) -> RowMapping:
    found = [r for r in rows if r["event"] == event_name]
    assert len(found) == 1, f"expected one {event_name!r} log, found {len(found)}"
    return found[0]


def epochs(rows: list[RowMapping]) -> list[int]:
    return [int(r["lease_epoch"]) for r in rows]


def task_row(db: Database, apply_id: int, task_id: int) -> RowMapping:
    (row,) = [r for r in applies_repo.tasks(db, apply_id) if r["id"] == task_id]
    return row


# --- redemption: "nobody has claimed it yet" is its own condition --------------------------------


def test_redeem_refuses_a_dispatched_lease_that_already_has_an_owner(db: Database) -> None:
    """Every rotation clears ``lease_owner``, so a dispatched apply with an owner cannot arise
    today: the condition ``lease_owner IS NULL`` only decides on a row where it is the *only*
    thing wrong. Planted: the current token, the current epoch, ``dispatched``, and an owner."""
    lease = leases.dispatch(db, support.new_apply(db))
    with db.transaction() as conn:
        conn.execute(
            update(applies).where(applies.c.id == lease.apply_id).values(lease_owner="worker-1")
        )
    before = support.snapshot(db)
    for owner in ("worker-2", "worker-1"):
        with pytest.raises(LeaseLost):
            leases.redeem(db, lease, owner)
    assert support.snapshot(db) == before
    assert support.lease_of(db, lease.apply_id) == (
        ApplyState.DISPATCHED,
        lease.epoch,
        lease.token,
        "worker-1",
    )


# --- the fence is one transaction that holds the row from its check to its commit ----------------


def _is_fence(statement: str) -> bool:
    """The fence's SELECT (``statements.fence``), whatever its conditions and lock clause: the
    fencing engine runs no other statement that reads ``lease_epoch`` alone."""
    return statement.lstrip().startswith("SELECT applies.lease_epoch")


class RotateBetweenCheckAndWrite:
    """Starts a rotation the moment a fence's SELECT has returned, and holds the fencing thread
    before its next statement until the rotation is either *blocked by the fencing connection's
    open transaction* or *committed*, recording which (``outcome``).

    With the real fence the next statement is the fenced write, in the transaction whose SELECT
    locked the row, so the rotation can only be blocked. With a fence whose check commits before
    the write (check-then-act), the next statement opens the second transaction (SQLite: its
    ``BEGIN IMMEDIATE``; MySQL: the write), and nothing holds the row any more: the rotation
    commits first. With a fence whose SELECT takes no lock (MySQL), likewise. Nothing is timed: the
    hook waits for one of the two states, each proved from the server or the driver."""

    def __init__(
        self, fencing: Database, rotating: Database, observer: Database, rotator: Worker[Any]
    ) -> None:
        self.observer = observer
        self.rotator = rotator
        self.tap = Tap(rotating)
        self.outcome: str | None = None
        self._lock = threading.Lock()
        event.listen(fencing.engine, "after_cursor_execute", self._after)
        event.listen(fencing.engine, "before_cursor_execute", self._before)

    @property
    def started(self) -> bool:
        return self.rotator.thread.ident is not None

    def _after(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        with self._lock:
            if not self.started and _is_fence(statement):
                self.rotator.start()

    def _before(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        with self._lock:
            if not self.started or self.outcome is not None:
                return
            self.outcome = self._settle(conn)

    def _blocked_by(self, conn: Connection) -> bool:
        if self.observer.is_sqlite:
            raw = conn.connection.dbapi_connection
            holding = bool(getattr(raw, "in_transaction", False))
            return holding and in_driver_call(self.rotator.thread, "BEGIN IMMEDIATE")
        holder = raw_connection_id(conn)
        return waits_for(
            self.observer, holder, self.tap.connection_ids(self.rotator.thread), "applies"
        )

    def _settle(self, conn: Connection) -> str:
        deadline = time.monotonic() + POLL
        while True:
            if not self.rotator.thread.is_alive():
                return "the rotation committed before the fenced write"
            if self._blocked_by(conn):
                if self.rotator.finished_within(SETTLE):
                    return "the rotation finished although it was seen blocked"
                return "blocked"
            if time.monotonic() > deadline:
                return f"neither blocked nor committed after {POLL:g}s"
            time.sleep(0.005)


def rotation(spawn: Spawn, rotating: Database, apply_id: int, task_id: int) -> Worker[Any]:
    """Another party's rotation of the apply's lease (as control of an apply, or reclaim, makes
    one: lock the row, compare-and-swap, log), which also reports what its transaction saw of the
    task row after rotating: a write that committed before it, or not."""

    def rotate() -> tuple[int, int]:
        with rotating.transaction() as conn:
            row = leasing.lock(conn, apply_id)
            epoch = leasing.rotate(
                conn,
                row,
                new_token=mint_token(),
                to_state=ApplyState.DISPATCHED,
                event="test-rotation",
                reason="rotated between the fence's check and its write",
            )
            seen = conn.execute(
                select(apply_tasks.c.progress).where(apply_tasks.c.id == task_id)
            ).scalar_one()
        return epoch, int(seen)

    return spawn("rotation", rotate)


WRITES: dict[str, Callable[[fenced.Fenced, int], None]] = {
    # An UPDATE of apply_tasks' own columns takes no lock on the applies row: only the fence's
    # lock can hold a rotation back.
    "update_task": lambda fx, task: fenced.update_task(fx, task, progress=77),
    # An INSERT into apply_logs share-locks the applies row through its foreign key, but only once
    # it runs: the rotation is started, and must be blocked, before that.
    "append_log": lambda fx, task: fenced.append_log(fx, "fenced-write", "between check and write"),
}


@ISOLATIONS
@pytest.mark.parametrize("write", list(WRITES))
def test_a_rotation_started_between_the_fence_check_and_its_write_waits_for_the_commit(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None, write: str
) -> None:
    """The interleaving a check-then-act fence loses, forced: another party's rotation starts
    right after the fence's check and before its write. The fence holds the row from the one to
    the other, so the rotation waits and commits after the write. A fence that commits its check
    before writing, or whose check locks nothing, lets the rotation commit first and the stale
    write land after it: the rotation then never saw the write, or its log line precedes the
    write's."""
    lease = support.running_lease(db)
    task = support.task_ids(db, lease.apply_id)[0]
    fencing, rotating = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    rotator = rotation(spawn, rotating, lease.apply_id, task)
    hook = RotateBetweenCheckAndWrite(fencing, rotating, db, rotator)

    with leases.fence(fencing, lease) as fx:
        WRITES[write](fx, task)

    assert hook.started, "the fence's SELECT was never executed on the fencing engine"
    new_epoch, seen = rotator.result()
    assert new_epoch == lease.epoch + 1
    # What was committed, in which order. The rotation's transaction saw the fenced write, so the
    # write committed first; and no line of the old epoch follows the rotation's.
    rows = logs(db, lease.apply_id)
    rotated = only(rows, "test-rotation")
    assert rotated["lease_epoch"] == new_epoch
    if write == "update_task":
        # PostgreSQL's REPEATABLE READ fixes the rotation's snapshot at its first statement,
        # the lock it then waited on, so it cannot see a write committed during that wait; the
        # order is proved there by the rotation seen blocked behind the open fence (below).
        if not (db.dialect == "postgresql" and isolation == "REPEATABLE READ"):
            assert seen == 77, "the rotation committed before the fenced write, which landed after"
        row = task_row(db, lease.apply_id, task)
        assert (row["progress"], row["lease_epoch"]) == (77, lease.epoch)
    else:
        written = only(rows, "fenced-write")
        assert written["id"] < rotated["id"], "the fenced write landed after the rotation"
        assert written["lease_epoch"] == lease.epoch
    assert epochs(rows) == sorted(epochs(rows)), f"lease_epoch decreases: {epochs(rows)}"
    # And why: the rotation was blocked by the fenced transaction between check and write.
    assert hook.outcome == "blocked", hook.outcome
    stored = applies_repo.get(db, lease.apply_id)
    assert (stored["state"], stored["lease_epoch"]) == (ApplyState.DISPATCHED, new_epoch)


# --- the token, not the epoch: one epoch minted twice -------------------------------------------


def restore_to_before_dispatch(db: Database, apply_id: int) -> None:
    """What restoring the store from a backup taken before the apply's dispatch leaves (or a
    failover to a replica that missed it): the apply queued at epoch 0 without a lease, and none
    of the later log lines. Its next dispatch mints the same epoch again, with another token."""
    with db.transaction() as conn:
        conn.execute(delete(apply_logs).where(apply_logs.c.apply_id == apply_id))
        conn.execute(
            update(applies)
            .where(applies.c.id == apply_id)
            .values(
                state=ApplyState.QUEUED,
                lease_epoch=0,
                lease_token=None,
                lease_owner=None,
                lease_acquired_at=None,
                heartbeat_at=None,
            )
        )


def two_holders_of_one_epoch(db: Database) -> tuple[Lease, Lease]:
    """(lost, current): worker-a redeemed epoch 1 in a timeline the store lost; the apply was then
    dispatched again and worker-b redeemed epoch 1 with another token. Only the token tells them
    apart, so only the token conditions can refuse worker-a."""
    apply_id = support.new_apply(db)
    lost = leases.dispatch(db, apply_id)
    leases.redeem(db, lost, "worker-a")
    restore_to_before_dispatch(db, apply_id)
    current = leases.dispatch(db, apply_id)
    leases.redeem(db, current, "worker-b")
    assert (lost.epoch, lost.apply_id) == (current.epoch, current.apply_id)
    assert lost.token != current.token
    return lost, current


@ISOLATIONS
def test_a_holder_of_the_same_epoch_with_another_token_waits_for_the_fence_then_is_refused(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """Two workers hold epoch 1 of one apply, and write at once: the current holder inside its
    fence, the other one (from the lost timeline) trying to enter its own. The second fence waits
    for the first (same row), and then refuses, because its token is not the row's: its epoch is.
    Nothing of it is written; everything of the current holder is."""
    lost, current = two_holders_of_one_epoch(db)
    task = support.task_ids(db, current.apply_id)[0]
    holding, other = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(other)
    entered = threading.Event()

    def lost_write() -> None:
        with leases.fence(other, lost) as fx:
            entered.set()
            fenced.update_task(fx, task, progress=13)
            fenced.append_log(fx, "lost-timeline", "written by the holder the store forgot")

    intruder = spawn("lost-timeline-writer", lost_write)
    with leases.fence(holding, current) as fx:
        holder = holder_id(holding, support.fence_connection(fx))
        intruder.start()
        if db.dialect == "postgresql":
            # PostgreSQL tests the WHERE clause on the newest committed row before it locks: a
            # row whose token is not the lease's is no match, so the fence refuses at once,
            # without waiting, while the current holder's fence is still open.
            assert intruder.finished_within(JOIN), "the lost timeline's fence did not return"
        else:
            prove_blocked(db, intruder, tap, holder=holder, what="the lost timeline's fence")
        fenced.update_task(fx, task, progress=40)
        fenced.append_log(fx, "current", "written by the current holder")

    refused = intruder.error()
    assert isinstance(refused, LeaseLost), repr(refused)
    assert not entered.is_set(), "the fence admitted a lease whose token is not current"
    row = task_row(db, current.apply_id, task)
    assert (row["progress"], row["lease_epoch"]) == (40, current.epoch)
    events = [r["event"] for r in logs(db, current.apply_id)]
    assert "lost-timeline" not in events
    assert events[-1] == "current"
    # The current holder keeps its lease.
    with leases.fence(db, current) as fx:
        fenced.update_task(fx, task, progress=41)


def test_every_lease_operation_of_the_same_epoch_with_another_token_fails_closed(
    db: Database,
) -> None:
    """The lost timeline's holder shares the current epoch: the fence, the heartbeat, the check,
    redemption and a rotation from its lease must each refuse it on the token alone, writing
    nothing, while the current holder's work goes on."""
    lost, current = two_holders_of_one_epoch(db)
    task = support.task_ids(db, current.apply_id)[0]
    support.age_heartbeat(db, current.apply_id, 20)
    before = support.snapshot(db)

    entered: list[bool] = []

    def write() -> None:
        with leases.fence(db, lost) as fx:
            entered.append(True)
            fenced.update_task(fx, task, progress=13)

    with pytest.raises(LeaseLost):
        write()
    assert not entered
    with pytest.raises(LeaseLost):
        leases.heartbeat(db, lost)
    with pytest.raises(LeaseLost):
        leases.check(db, lost)
    with pytest.raises(LeaseLost):
        leases.redeem(db, lost, "worker-a")
    row = leasing.LeaseRow(lost.apply_id, ApplyState.RUNNING, lost.epoch, lost.token)
    with pytest.raises(LeaseLost), db.transaction() as conn:
        leasing.rotate(
            conn,
            row,
            new_token=mint_token(),
            to_state=ApplyState.STOPPED,
            event="lost-timeline-stop",
            reason="the forgotten holder stops",
        )
    assert support.snapshot(db) == before  # heartbeat_at included: it stayed 20 s old

    leases.heartbeat(db, current)
    with leases.fence(db, current) as fx:
        fenced.update_task(fx, task, progress=40)
    assert task_row(db, current.apply_id, task)["progress"] == 40


# --- a rotation is a compare-and-swap, even from a row read without a lock ----------------------


def test_a_rotation_from_a_row_read_before_another_rotation_matches_nothing(db: Database) -> None:
    """Every rotation in the product locks the row before it reads it, so the CAS in the UPDATE
    never decides there. It decides for a rotation made from a row read without the lock (a
    check-then-act rotation): another rotation commits in between, the apply runs again under a
    new holder (same state), and only the epoch and token in the WHERE clause refuse the late
    one."""
    lease = support.running_lease(db)
    with db.transaction() as conn:
        seen = leasing.read(conn, lease.apply_id)  # not locked: committed with this transaction
    new = support.hand_back(db, lease, reason="rotated after the late rotation read the row")
    leases.redeem(db, new, "worker-2")
    before = support.snapshot(db)
    with pytest.raises(LeaseLost) as caught, db.transaction() as conn:
        leasing.rotate(
            conn,
            seen,
            new_token=mint_token(),
            to_state=ApplyState.STOPPED,
            event="late-rotation",
            reason="a rotation from a stale read",
        )
    assert caught.value.current_epoch == new.epoch
    assert support.snapshot(db) == before
    assert support.lease_of(db, lease.apply_id) == (
        ApplyState.RUNNING,
        new.epoch,
        new.token,
        "worker-2",
    )
