"""Races, forced rather than hoped for (DESIGN.md invariants 1, 2 and 5; issue 2).

Every interleaving here is made, not waited for: one connection holds its transaction open while
another acts, and the test proves the second one is *blocked* before letting the first commit.

- MySQL/MariaDB: the server says so. ``SHOW ENGINE INNODB STATUS`` must show the transaction
  of the acting connection (its ``CONNECTION_ID()``, reported by a hook on its engine just
  before each statement) in ``LOCK WAIT`` for a lock on the test database's ``applies`` table,
  while the holder's transaction (whose ``CONNECTION_ID()`` the holder reads inside it) is open.
  The scratch database is private to the test session, so nothing else can hold that lock.
- SQLite: every transaction begins with ``BEGIN IMMEDIATE``, which cannot return while another
  connection holds the write lock. The test proves the acting thread is *inside* the driver call
  executing that ``BEGIN IMMEDIATE`` (its innermost Python frame, read with
  ``sys._current_frames()``), while the holder's transaction is open, so it is in SQLite's busy
  handler.

A short ``join`` afterwards is only the negative check that the blocked thread has not finished;
the decisive assertions are the outcomes after the holder commits. Nothing sleeps to synchronize:
polls have deadlines, joins have timeouts, so a bug fails a test instead of hanging it.

Where the holder is a fence, the acting party starts (and is proved blocked) before the fenced
block writes anything: a log line's foreign key share-locks the applies row, which would hold a
rotation back as well and hide a fence that locks nothing. Where reclaim must skip a locked row
(MySQL), seeing it in a lock wait fails the test at once. ``test_fence_shapes.py`` proves each
clause of the lease statements on its own; ``make mutants`` (``scripts/mutants.py``) breaks each
one and checks that these tests notice.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from sqlalchemy import Connection, RowMapping, exists

import leases
from leases import Lease, Reclaimed, mint_token
from storage import _leasing as leasing
from storage import _statements as statements
from storage import applies as applies_repo
from storage import fenced
from storage.database import Database
from storage.errors import LeaseLost
from storage.states import ApplyState
from storage.tables import applies, apply_tasks
from tests import support
from tests.races import (
    ISOLATIONS,
    JOIN,
    POLL,
    PauseBeforeCommit,
    Spawn,
    Tap,
    connection_id,
    holder_id,
    prove_blocked,
    returned_without_waiting,
)

T = TypeVar("T")
OpenDb = Callable[..., Database]

THREADS = 16


# --- reading what was written ---------------------------------------------------------------------


def logs(db: Database, apply_id: int) -> list[RowMapping]:
    return applies_repo.logs(db, apply_id, limit=100_000)


def assert_epochs_non_decreasing(rows: Sequence[RowMapping]) -> None:
    ids = [int(r["id"]) for r in rows]
    assert ids == sorted(ids)
    epochs = [int(r["lease_epoch"]) for r in rows]
    assert epochs == sorted(epochs), f"lease_epoch decreases along apply_logs: {epochs}"


def only(rows: Sequence[RowMapping], event_name: str) -> RowMapping:
    found = [r for r in rows if r["event"] == event_name]
    assert len(found) == 1, f"expected one {event_name!r} log, found {len(found)}"
    return found[0]


def stored_lease(db: Database, apply_id: int) -> RowMapping:
    return applies_repo.get(db, apply_id)


# --- 1. a rotation in flight blocks an owned write, which then fails ------------------------------


@ISOLATIONS
def test_rotation_in_flight_blocks_an_owned_write_which_then_fails(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    lease = support.running_lease(db)
    task = support.task_ids(db, lease.apply_id)[0]
    before = support.snapshot(db)
    logs_before = logs(db, lease.apply_id)
    rotating, writing = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(writing)
    body_ran = threading.Event()

    def stale_write() -> None:
        with leases.fence(writing, lease) as fx:
            body_ran.set()
            fenced.append_log(fx, "stale-write", "written under the old epoch")
            fenced.update_task(fx, task, progress=77)

    writer = spawn("stale-writer", stale_write)
    with rotating.transaction() as conn:
        holder = holder_id(rotating, conn)
        row = leasing.lock(conn, lease.apply_id)
        new_epoch = leasing.rotate(
            conn,
            row,
            new_token=mint_token(),
            to_state=ApplyState.DISPATCHED,
            event="test-rotation",
            reason="rotated while a write is attempted",
        )
        writer.start()
        prove_blocked(db, writer, tap, holder=holder, what="the fenced write")
        assert not body_ran.is_set()

    lost = writer.error()
    assert isinstance(lost, LeaseLost), repr(lost)
    assert lost.current_epoch == new_epoch == lease.epoch + 1
    assert not body_ran.is_set()
    after = support.snapshot(db)
    for table in ("apply_tasks", "apply_comments", "checks", "control_requests"):
        assert after[table] == before[table], table
    rows = logs(db, lease.apply_id)
    assert rows[: len(logs_before)] == logs_before
    assert [(r["event"], r["lease_epoch"]) for r in rows[len(logs_before) :]] == [
        ("test-rotation", new_epoch)
    ]
    assert_epochs_non_decreasing(rows)


# --- 2. the mirror: a fenced write in flight makes a rotation wait --------------------------------


@ISOLATIONS
def test_fenced_write_in_flight_makes_hand_back_wait(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    lease = support.running_lease(db)
    task = support.task_ids(db, lease.apply_id)[0]
    writing, rotating = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(rotating)
    rotator = spawn(
        "hand-back", lambda: support.hand_back(rotating, lease, reason="handover mid-write")
    )

    with leases.fence(writing, lease) as fx:
        holder = holder_id(writing, support.fence_connection(fx))
        # Blocked before the block writes anything: by the fence's own lock, not by the shared
        # lock that the log line's foreign key takes on the applies row.
        rotator.start()
        prove_blocked(db, rotator, tap, holder=holder, what="hand_back")
        fenced.append_log(fx, "in-flight", "written before the rotation")
        fenced.update_task(fx, task, progress=50)

    new = rotator.result()
    assert new.epoch == lease.epoch + 1
    rows = logs(db, lease.apply_id)
    written, rotated = only(rows, "in-flight"), only(rows, "handed_back")
    assert written["id"] < rotated["id"]
    assert (written["lease_epoch"], rotated["lease_epoch"]) == (lease.epoch, new.epoch)
    assert_epochs_non_decreasing(rows)
    (row,) = [r for r in applies_repo.tasks(db, lease.apply_id) if r["id"] == task]
    assert (row["progress"], row["lease_epoch"]) == (50, lease.epoch)
    stored = stored_lease(db, lease.apply_id)
    assert (stored["state"], stored["lease_epoch"], stored["lease_token"]) == (
        ApplyState.DISPATCHED,
        new.epoch,
        new.token,
    )


@ISOLATIONS
def test_reclaim_skips_a_fenced_write_in_flight_and_rotates_after_it(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """MySQL: reclaim's ``FOR UPDATE SKIP LOCKED`` skips the fenced row and returns at once, never
    waiting; the next pass rotates it. SQLite: the pass waits for the write lock, then rotates."""
    lease = support.running_lease(db)
    support.age_heartbeat(db, lease.apply_id, 120)
    policy = support.reclaim_policy(stale_after=60)
    writing, reclaiming = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(reclaiming)
    reclaimer = spawn("reclaim", lambda: leases.reclaim(reclaiming, policy))

    with leases.fence(writing, lease) as fx:
        holder = holder_id(writing, support.fence_connection(fx))
        # The pass starts before the block writes anything: only the fence's own lock is held.
        reclaimer.start()
        if db.is_sqlite:
            prove_blocked(db, reclaimer, tap, holder=holder, what="the reclaim pass")
        else:
            # Returned while the fenced transaction is still open, never seen in a lock wait: it
            # skipped the row, it did not wait for it.
            assert returned_without_waiting(db, reclaimer, tap, what="the reclaim pass") == []
            assert support.fence_connection(fx).execute(
                statements.current_epoch(lease.apply_id)
            ).scalar_one() == (lease.epoch)
        fenced.append_log(fx, "in-flight", "written before the reclaim")

    reclaimed = reclaimer.result() if db.is_sqlite else leases.reclaim(reclaiming, policy)
    assert [(r.apply_id, r.previous_epoch) for r in reclaimed] == [(lease.apply_id, lease.epoch)]
    new = reclaimed[0].lease
    assert new is not None
    assert new.epoch == lease.epoch + 1
    rows = logs(db, lease.apply_id)
    written, rotated = only(rows, "in-flight"), only(rows, "reclaimed")
    assert written["id"] < rotated["id"]
    assert (written["lease_epoch"], rotated["lease_epoch"]) == (lease.epoch, new.epoch)
    assert_epochs_non_decreasing(rows)
    assert stored_lease(db, lease.apply_id)["reclaim_count"] == 1


@ISOLATIONS
def test_heartbeat_waiting_on_a_fence_does_not_deadlock_its_closing_rotation(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """A worker's heartbeat thread beats while its main loop is inside a fence that ends the lease
    (stop, hand back, a terminal state: ``fenced.end_lease``, rotating as the fence's last write).
    The heartbeat must wait for the fence and then fail with ``LeaseLost``; the fence must commit.

    Regression: with few applies rows, MariaDB's optimizer ran the lease UPDATEs (heartbeat,
    rotate, redeem) as a range scan of ``ix_applies_state_heartbeat_at`` (``state`` is in their
    WHERE clause). The waiting heartbeat then held that index's entry while it waited for the
    fenced row, and the fence's rotation, needing the same entry, closed a cycle: InnoDB broke it
    with a deadlock error, under READ COMMITTED and REPEATABLE READ."""
    lease = support.running_lease(db)
    fencing, beating = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(beating)
    heartbeat = spawn("heartbeat", lambda: leases.heartbeat(beating, lease))

    with leases.fence(fencing, lease) as fx:
        holder = holder_id(fencing, support.fence_connection(fx))
        heartbeat.start()  # before any write: the fence's own lock is what it waits for
        prove_blocked(db, heartbeat, tap, holder=holder, what="the heartbeat")
        fenced.append_log(fx, "in-flight", "the last write before stopping")
        new_epoch = fenced.end_lease(
            fx,
            new_token=mint_token(),
            to_state=ApplyState.STOPPED,
            event="stopped",
            reason="stopped while the heartbeat waits",
        )

    lost = heartbeat.error()
    assert isinstance(lost, LeaseLost), repr(lost)
    stored = stored_lease(db, lease.apply_id)
    assert (stored["state"], stored["lease_epoch"]) == (ApplyState.STOPPED, new_epoch)
    rows = logs(db, lease.apply_id)
    assert only(rows, "in-flight")["id"] < only(rows, "stopped")["id"]
    assert_epochs_non_decreasing(rows)


# --- 3. the fence's shape matters: check-then-act and a non-locking predicate are not fences ------


def unfenced_progress(conn: Connection, apply_id: int, task_id: int, *, epoch: int) -> int:
    """The naive owned write: the same statement the fence guards, with no fence around it."""
    return int(
        conn.execute(
            statements.update_task(apply_id, task_id, epoch=epoch, values={"progress": 99})
        ).rowcount
    )


def exists_predicated_progress(conn: Connection, lease: Lease, task_id: int) -> int:
    """``UPDATE apply_tasks ... WHERE EXISTS (SELECT ... FROM applies WHERE lease_token = ?)``: the
    common shape DESIGN.md measures as *not fenced* under READ COMMITTED."""
    current = exists().where(
        applies.c.id == lease.apply_id,
        applies.c.lease_token == lease.token,
        applies.c.state == ApplyState.RUNNING,
    )
    stmt = (
        apply_tasks.update()
        .where(apply_tasks.c.id == task_id, apply_tasks.c.apply_id == lease.apply_id, current)
        .values(progress=99, lease_epoch=lease.epoch)
    )
    return int(conn.execute(stmt).rowcount)


def task_row(db: Database, apply_id: int, task_id: int) -> RowMapping:
    (row,) = [r for r in applies_repo.tasks(db, apply_id) if r["id"] == task_id]
    return row


@pytest.mark.parametrize(
    ("backend_url", "isolation"),
    [pytest.param("mysql", "READ COMMITTED", id="mysql-RC")],
    indirect=["backend_url"],
)
def test_check_then_act_lets_a_stale_write_land_where_the_fence_does_not(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str
) -> None:
    """One rotation held open; two stale writers of the old lease. The naive one checks the lease
    (not blocked: a plain read sees the committed old token), writes without a lock (not blocked
    either), and commits after the rotation: its stale write lands. The fenced one blocks on the
    apply row and fails with ``LeaseLost``, writing nothing."""
    lease = support.running_lease(db)
    naive_task, fenced_task = support.task_ids(db, lease.apply_id)
    rotating = open_db(isolation_level=isolation)
    naive_db, fenced_db = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(fenced_db)
    wrote, rotation_committed = threading.Event(), threading.Event()

    def naive() -> int:
        leases.check(naive_db, lease)  # advisory: passes
        with naive_db.transaction() as conn:
            count = unfenced_progress(conn, lease.apply_id, naive_task, epoch=lease.epoch)
            wrote.set()
            assert rotation_committed.wait(JOIN)
        return count

    def fenced_write() -> None:
        with leases.fence(fenced_db, lease) as fx:
            fenced.update_task(fx, fenced_task, progress=99)

    naive_worker = spawn("naive", naive)
    fenced_worker = spawn("fenced", fenced_write)
    with rotating.transaction() as conn:
        holder = connection_id(conn)
        leasing.rotate(
            conn,
            leasing.lock(conn, lease.apply_id),
            new_token=mint_token(),
            to_state=ApplyState.DISPATCHED,
            event="test-rotation",
            reason="rotated under two stale writers",
        )
        naive_worker.start()
        fenced_worker.start()
        # The naive writer checked and wrote while the rotation was in flight, never blocked.
        assert wrote.wait(POLL), "the naive check-then-write blocked"
        prove_blocked(db, fenced_worker, tap, holder=holder, what="the fenced write")
    rotation_committed.set()

    assert naive_worker.result() == 1
    assert isinstance(fenced_worker.error(), LeaseLost)
    stored = stored_lease(db, lease.apply_id)
    assert stored["lease_epoch"] == lease.epoch + 1
    # The stale write landed, stamped with an epoch that was no longer current when it committed.
    row = task_row(db, lease.apply_id, naive_task)
    assert (row["progress"], row["lease_epoch"]) == (99, lease.epoch)
    assert task_row(db, lease.apply_id, fenced_task)["progress"] == 0


@pytest.mark.parametrize(
    ("backend_url", "isolation"),
    [
        pytest.param("mysql", "READ COMMITTED", id="mysql-RC"),
        pytest.param("mysql", "REPEATABLE READ", id="mysql-RR"),
    ],
    indirect=["backend_url"],
)
def test_exists_predicate_is_a_fence_only_under_repeatable_read(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str
) -> None:
    """DESIGN.md's table, reproduced: ``UPDATE child WHERE EXISTS (SELECT ... applies WHERE
    lease_token)`` against a rotation held open. READ COMMITTED reads the subquery without a lock:
    the write lands at once and commits after the rotation (stale). REPEATABLE READ share-locks
    the subquery's row: the write waits, then matches nothing."""
    lease = support.running_lease(db)
    task = support.task_ids(db, lease.apply_id)[0]
    rotating, writing = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(writing)
    wrote, rotation_committed = threading.Event(), threading.Event()

    def write() -> int:
        with writing.transaction() as conn:
            count = exists_predicated_progress(conn, lease, task)
            wrote.set()
            assert rotation_committed.wait(JOIN)
        return count

    writer = spawn("exists-writer", write)
    with rotating.transaction() as conn:
        holder = connection_id(conn)
        leasing.rotate(
            conn,
            leasing.lock(conn, lease.apply_id),
            new_token=mint_token(),
            to_state=ApplyState.DISPATCHED,
            event="test-rotation",
            reason="rotated under an EXISTS-predicated write",
        )
        writer.start()
        if isolation == "READ COMMITTED":
            assert wrote.wait(POLL), "the EXISTS-predicated write blocked under READ COMMITTED"
        else:
            prove_blocked(db, writer, tap, holder=holder, what="the EXISTS-predicated write")
            assert not wrote.is_set()
    rotation_committed.set()

    count = writer.result()
    row = task_row(db, lease.apply_id, task)
    if isolation == "READ COMMITTED":
        assert count == 1
        assert (row["progress"], row["lease_epoch"]) == (99, lease.epoch)  # stale, yet committed
    else:
        assert count == 0
        assert (row["progress"], row["lease_epoch"]) == (0, 0)
    assert stored_lease(db, lease.apply_id)["lease_epoch"] == lease.epoch + 1


def test_check_then_act_is_advisory_only(db: Database) -> None:
    """On every backend, without concurrency: a check passes, a rotation commits, and the naive
    write that follows lands; the fence in its place raises ``LeaseLost``."""
    lease = support.running_lease(db)
    naive_task, fenced_task = support.task_ids(db, lease.apply_id)
    leases.check(db, lease)
    new = support.hand_back(db, lease, reason="rotated between check and act")
    with db.transaction() as conn:
        assert unfenced_progress(conn, lease.apply_id, naive_task, epoch=lease.epoch) == 1
    with pytest.raises(LeaseLost), leases.fence(db, lease) as fx:
        fenced.update_task(fx, fenced_task, progress=99)
    assert task_row(db, lease.apply_id, naive_task)["lease_epoch"] == lease.epoch < new.epoch
    assert task_row(db, lease.apply_id, fenced_task)["progress"] == 0


# --- 4. sixteen rotations (and redemptions) of one lease at once: exactly one wins ----------------


def racers(open_db: OpenDb, isolation: str | None) -> list[Database]:
    """One Database (own engine, own connection) per thread, connected before the race starts."""
    dbs = [open_db(isolation_level=isolation) for _ in range(THREADS)]
    for each in dbs:
        with each.engine.connect():
            pass
    return dbs


def race(spawn: Spawn, name: str, fns: Sequence[Callable[[], T]]) -> list[T | BaseException]:
    """Run ``fns`` on their own threads, released together by a barrier; their outcomes."""
    barrier = threading.Barrier(len(fns), timeout=JOIN)

    def released(fn: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            barrier.wait()
            return fn()

        return run

    workers = [spawn(f"{name}-{i}", released(fn)).start() for i, fn in enumerate(fns)]
    return [w.outcome() for w in workers]


@ISOLATIONS
def test_sixteen_rotations_of_one_lease_exactly_one_wins(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    lease = support.running_lease(db)
    dbs = racers(open_db, isolation)

    def rotate(each: Database, i: int) -> Callable[[], Lease]:
        return lambda: support.hand_back(each, lease, reason=f"racer {i}")

    outcomes = race(spawn, "rotate", [rotate(each, i) for i, each in enumerate(dbs)])

    winners = [o for o in outcomes if isinstance(o, Lease)]
    lost = [o for o in outcomes if isinstance(o, LeaseLost)]
    assert len(winners) == 1, outcomes
    assert len(lost) == THREADS - 1, [o for o in outcomes if not isinstance(o, Lease | LeaseLost)]
    (won,) = winners
    assert won.epoch == lease.epoch + 1
    assert all(e.current_epoch == won.epoch for e in lost)
    stored = stored_lease(db, lease.apply_id)
    assert (stored["lease_epoch"], stored["lease_token"], stored["state"]) == (
        won.epoch,
        won.token,
        ApplyState.DISPATCHED,
    )
    rows = logs(db, lease.apply_id)
    assert only(rows, "handed_back")["lease_epoch"] == won.epoch
    assert_epochs_non_decreasing(rows)


@ISOLATIONS
def test_sixteen_redemptions_of_one_dispatched_lease_exactly_one_redeems(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    lease = leases.dispatch(db, support.new_apply(db))
    dbs = racers(open_db, isolation)

    def redeem(each: Database, i: int) -> Callable[[], str]:
        def run() -> str:
            leases.redeem(each, lease, f"worker-{i}")
            return f"worker-{i}"

        return run

    outcomes = race(spawn, "redeem", [redeem(each, i) for i, each in enumerate(dbs)])

    winners = [o for o in outcomes if isinstance(o, str)]
    lost = [o for o in outcomes if isinstance(o, LeaseLost)]
    assert len(winners) == 1, outcomes
    assert len(lost) == THREADS - 1, [o for o in outcomes if not isinstance(o, str | LeaseLost)]
    stored = stored_lease(db, lease.apply_id)
    assert (stored["state"], stored["lease_epoch"], stored["lease_token"]) == (
        ApplyState.RUNNING,
        lease.epoch,
        lease.token,
    )
    assert stored["lease_owner"] == winners[0]
    rows = logs(db, lease.apply_id)
    assert winners[0] in only(rows, "redeemed")["message"]
    assert_epochs_non_decreasing(rows)


# --- 5. two reclaim passes at once: each stale apply is rotated exactly once ----------------------

STALE = 30


def stale_applies(db: Database, count: int = STALE) -> dict[int, Lease]:
    """``count`` running applies whose heartbeats are 2 to 3 minutes old, each a different age."""
    held = [support.running_lease(db, tasks=1, owner=f"silent-{i}") for i in range(count)]
    for i, lease in enumerate(held):
        support.age_heartbeat(db, lease.apply_id, 120 + i)
    return {lease.apply_id: lease for lease in held}


def assert_each_rotated_once(
    db: Database, held: dict[int, Lease], reclaimed: Sequence[Reclaimed]
) -> None:
    ids = [r.apply_id for r in reclaimed]
    assert len(ids) == len(set(ids)), "an apply was reclaimed twice"
    assert set(ids) == set(held)
    for r in reclaimed:
        assert r.previous_epoch == held[r.apply_id].epoch
        assert r.lease is not None
        assert r.lease.epoch == r.previous_epoch + 1
    for apply_id, lease in held.items():
        stored = stored_lease(db, apply_id)
        assert (stored["state"], stored["lease_epoch"], stored["reclaim_count"]) == (
            ApplyState.DISPATCHED,
            lease.epoch + 1,
            1,
        ), apply_id
        rows = logs(db, apply_id)
        assert only(rows, "reclaimed")["lease_epoch"] == lease.epoch + 1
        assert_epochs_non_decreasing(rows)


@ISOLATIONS
def test_two_reclaim_passes_at_once_rotate_each_stale_apply_once(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    held = stale_applies(db)
    # Small batches, so that the two passes interleave batch by batch.
    policy = support.reclaim_policy(stale_after=60, batch_size=7)
    first, second = open_db(isolation_level=isolation), open_db(isolation_level=isolation)

    def reclaim(each: Database) -> Callable[[], list[Reclaimed]]:
        return lambda: leases.reclaim(each, policy)

    outcomes = race(spawn, "reclaim", [reclaim(first), reclaim(second)])

    passes = [o for o in outcomes if isinstance(o, list)]
    assert len(passes) == 2, outcomes
    assert_each_rotated_once(db, held, passes[0] + passes[1])


@ISOLATIONS
def test_reclaim_pass_beside_a_batch_held_open_never_rotates_twice(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """One reclaim pass is held before committing its first batch (10 applies, locked and
    rotated); another pass runs. MySQL: the second skips the locked rows and finishes while that
    batch is still open (also on an engine at REPEATABLE READ, whose gap locks SKIP LOCKED would
    not skip: reclaim batches run at READ COMMITTED). SQLite: the second pass waits."""
    held = stale_applies(db)
    holding, other = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    pause, tap = PauseBeforeCommit(holding), Tap(other)
    first = spawn(
        "first-pass",
        lambda: leases.reclaim(holding, support.reclaim_policy(stale_after=60, batch_size=10)),
    )
    second = spawn(
        "second-pass",
        lambda: leases.reclaim(other, support.reclaim_policy(stale_after=60, batch_size=7)),
    )

    try:
        first.start()
        assert pause.paused.wait(POLL), "the first pass never reached its commit"
        second.start()
        if db.is_sqlite:
            prove_blocked(db, second, tap, holder=None, what="the second reclaim pass")
        else:
            # Finished while the first batch is still open, never seen in a lock wait: its
            # locked rows were skipped.
            second_pass = returned_without_waiting(db, second, tap, what="the second reclaim pass")
            assert len(second_pass) == STALE - 10
        assert first.thread.is_alive()
    finally:
        pause.release.set()

    assert_each_rotated_once(db, held, first.result() + second.result())


# --- 6. fenced writes and heartbeats hammering one lease while it is rotated once -----------------


@dataclass
class Attempts:
    """What one hammering thread did: attempts that committed, and those that lost the lease,
    each tagged with whether it started after the rotation had committed."""

    committed: list[tuple[str, bool]] = field(default_factory=list)
    lost: list[tuple[str, bool]] = field(default_factory=list)


@ISOLATIONS
def test_hammered_lease_rotated_once_keeps_every_write_on_its_side(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """Four threads make fenced writes (a log line and a task update each) and two heartbeat (one
    alone, one as a worker's batch does), all on the same lease, each with its own connection,
    until they lose it; a seventh hands the lease back once they have committed
    ``before_rotation`` writes.

    Once the rotation starts, each hammering thread makes at most ``overlap`` more attempts and
    then waits for the rotation to commit before its next one. So attempts are in flight around
    the rotation (on MySQL they queue behind it on the row lock), and SQLite's
    busy handler (which is not fair: a thread that just committed usually wins the lock again)
    cannot starve the rotator for long."""
    writers, heartbeaters, before_rotation, overlap = 4, 2, 40, 5
    lease = support.running_lease(db, tasks=writers)
    tasks = support.task_ids(db, lease.apply_id)
    enough, rotating, rotated, stop = (threading.Event() for _ in range(4))
    count_lock = threading.Lock()
    committed_total = [0]

    def tally() -> None:
        with count_lock:
            committed_total[0] += 1
            if committed_total[0] >= before_rotation:
                enough.set()

    def hammer(name: str, act: Callable[[Database, str], None]) -> Callable[[], Attempts]:
        own = open_db(isolation_level=isolation)

        def run() -> Attempts:
            done, since_rotating = Attempts(), 0
            for i in itertools.count():
                if stop.is_set():
                    return done
                if rotating.is_set():
                    since_rotating += 1
                    if since_rotating > overlap and not rotated.wait(JOIN):
                        return done
                tag = f"{name}-{i}"
                after = rotated.is_set()
                try:
                    act(own, tag)
                except LeaseLost:
                    done.lost.append((tag, after))
                    return done
                done.committed.append((tag, after))
                tally()
            raise AssertionError("unreachable")

        return run

    def write(task: int) -> Callable[[Database, str], None]:
        def act(own: Database, tag: str) -> None:
            with leases.fence(own, lease) as fx:
                fenced.append_log(fx, "hammer", tag)
                fenced.update_task(fx, task, progress=int(tag.rsplit("-", 1)[1]) % 101)

        return act

    def beat(own: Database, tag: str) -> None:
        leases.heartbeat(own, lease)

    def beat_in_a_batch(own: Database, tag: str) -> None:
        """A worker's batched heartbeat holding this lease alone."""
        while True:
            renewal = leases.heartbeat_all(own, [lease])
            if lease.apply_id in renewal.lost:
                raise renewal.lost[lease.apply_id]
            if lease.apply_id in renewal.renewed:
                return
            # Skipped: a writer's fence holds the row. Not an attempt that committed: again.

    rotating_db = open_db(isolation_level=isolation)

    def rotate() -> Lease:
        assert enough.wait(JOIN), "the hammering threads committed too little"
        rotating.set()
        new = support.hand_back(rotating_db, lease, reason="rotated under load")
        rotated.set()
        return new

    hammers = [spawn(f"writer-{i}", hammer(f"w{i}", write(tasks[i]))) for i in range(writers)]
    beats = [beat, beat_in_a_batch]
    hammers += [spawn(f"heartbeat-{i}", hammer(f"h{i}", beats[i % 2])) for i in range(heartbeaters)]
    rotator = spawn("rotator", rotate)
    try:
        for w in [*hammers, rotator]:
            w.start()
        new = rotator.result()
        done = [w.result() for w in hammers]
    finally:
        stop.set()  # on failure, let the hammering threads end at once

    assert new.epoch == lease.epoch + 1
    for d in done:
        # Each thread ended by losing the lease; no attempt started after the rotation committed.
        assert len(d.lost) == 1
        assert not [tag for tag, after in d.committed if after]
    # And any attempt from now on fails too.
    with pytest.raises(LeaseLost), leases.fence(db, lease) as fx:
        fenced.append_log(fx, "hammer", "late")
    with pytest.raises(LeaseLost):
        leases.heartbeat(db, lease)
    assert sum(len(d.committed) for d in done) >= before_rotation
    rows = logs(db, lease.apply_id)
    rotation = only(rows, "handed_back")
    assert rotation["lease_epoch"] == new.epoch
    hammered = [r for r in rows if r["event"] == "hammer"]
    written = sorted(tag for d in done[:writers] for tag, _ in d.committed)
    assert sorted(r["message"] for r in hammered) == written  # the committed ones, only them
    assert all(r["lease_epoch"] == lease.epoch for r in hammered)
    assert all(r["id"] < rotation["id"] for r in hammered)
    assert_epochs_non_decreasing(rows)
    for task, d in zip(tasks, done[:writers], strict=True):
        row = task_row(db, lease.apply_id, task)
        if d.committed:  # the task shows this thread's last committed write, at the old epoch
            last = int(d.committed[-1][0].rsplit("-", 1)[1]) % 101
            assert (row["progress"], row["lease_epoch"]) == (last, lease.epoch)
        else:
            assert (row["progress"], row["lease_epoch"]) == (0, 0)
    stored = stored_lease(db, lease.apply_id)
    assert (stored["state"], stored["lease_epoch"]) == (ApplyState.DISPATCHED, new.epoch)
