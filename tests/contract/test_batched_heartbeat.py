"""A worker's batched heartbeat (``leases.heartbeat_all``, ``tasks.heartbeat.Heartbeats``), on every
store: one transaction of a fixed number of statements renews every lease a worker holds, and each
lease keeps the guarantees of a heartbeat of its own.

- renewed by the database clock while current and running; proven lost, per lease, only by its row
  read under the lock; a row another transaction holds is skipped (neither renewed nor lost);
- the others of the batch are renewed in the same transaction whatever happens to one;
- races are forced, not hoped for (``tests/races.py``): one apply of a batch is reclaimed while the
  batch renews, in both orders, on SQLite and on each server under READ COMMITTED and REPEATABLE
  READ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Connection, event

import leases
from leases import Lease, mint_token
from storage import _leasing as leasing
from storage import applies, control
from storage.database import Database
from storage.errors import LeaseLost
from storage.states import ApplyState, ControlAction
from tasks.heartbeat import Heartbeats
from tasks.interrupts import Interrupts, Reason
from tests import support
from tests.celery_fixtures import FakeClock, unreachable, wait_until
from tests.races import (
    ISOLATIONS,
    POLL,
    PauseBeforeCommit,
    Spawn,
    Tap,
    holder_id,
    prove_blocked,
    returned_without_waiting,
)

OpenDb = Callable[..., Database]
STALE_AFTER = 30.0


def _age(db: Database, apply_id: int) -> float:
    return float(applies.get(db, apply_id)["heartbeat_age"])


@contextmanager
def _counting(db: Database) -> Iterator[list[str]]:
    """The first word of every statement ``db``'s engine sends while the block runs, but for
    SQLite's explicit BEGIN IMMEDIATE (the other stores begin implicitly; commits are not sent
    as statements on any of them)."""
    sent: list[str] = []

    def before(conn: Connection, cursor: object, statement: str, *args: object) -> None:
        word = statement.split(None, 1)[0].upper()
        if word != "BEGIN":
            sent.append(word)

    event.listen(db.engine, "before_cursor_execute", before)
    try:
        yield sent
    finally:
        event.remove(db.engine, "before_cursor_execute", before)


# --- leases.heartbeat_all ---------------------------------------------------------------------


def test_a_batch_renews_every_lease_by_the_database_clock(db: Database) -> None:
    held = [support.running_lease(db) for _ in range(5)]
    for lease in held:
        support.age_heartbeat(db, lease.apply_id, 120)
    renewal = leases.heartbeat_all(db, held)
    assert renewal.renewed == {lease.apply_id for lease in held}
    assert (renewal.lost, renewal.busy, renewal.requests) == ({}, frozenset(), {})
    for lease in held:
        assert _age(db, lease.apply_id) < 5
        assert support.lease_of(db, lease.apply_id)[:3] == ("running", lease.epoch, lease.token)


def test_the_cost_of_a_batch_does_not_grow_with_its_size(db: Database) -> None:
    """Three statements (lock and read the rows, renew them, read pending control requests),
    whether the worker holds one lease or forty."""
    held = [support.running_lease(db, tasks=1) for _ in range(40)]
    with _counting(db) as one:
        leases.heartbeat_all(db, held[:1])
    with _counting(db) as forty:
        renewal = leases.heartbeat_all(db, held)
    assert len(renewal.renewed) == 40
    assert one == forty == ["SELECT", "UPDATE", "SELECT"], (one, forty)


def test_an_empty_batch_sends_nothing(db: Database) -> None:
    with _counting(db) as sent:
        renewal = leases.heartbeat_all(db, [])
    assert sent == []
    assert renewal.renewed == frozenset()


def test_each_lease_of_a_batch_is_lost_only_by_its_own_row(db: Database) -> None:
    """A rotated lease, a lease whose apply left running, one of the current epoch with another
    token, one nobody redeemed and one of an apply that does not exist are lost, each with the
    reason its row gives; nothing of theirs is written; the rest of the batch is renewed."""
    kept = [support.running_lease(db) for _ in range(2)]
    rotated = support.running_lease(db)
    new = support.hand_back(db, rotated, reason="test rotation")
    released = support.running_lease(db)
    support.release(db, released, reason="stopped elsewhere")
    running = support.running_lease(db)
    other_token = Lease(running.apply_id, running.epoch, mint_token())
    unredeemed = leases.dispatch(db, support.new_apply(db))
    forged = Lease(kept[0].apply_id + 1000, 1, mint_token())
    losers = (rotated.apply_id, released.apply_id, running.apply_id, unredeemed.apply_id)
    for apply_id in (*losers, *(lease.apply_id for lease in kept)):
        support.age_heartbeat(db, apply_id, 120)
    before = {a: support.lease_of(db, a) for a in losers}

    renewal = leases.heartbeat_all(db, [*kept, rotated, released, other_token, unredeemed, forged])

    assert renewal.renewed == {lease.apply_id for lease in kept}
    assert set(renewal.lost) == {*losers, forged.apply_id}
    assert renewal.lost[rotated.apply_id].current_epoch == new.epoch
    assert renewal.lost[running.apply_id].current_epoch == running.epoch
    assert "stopped" in str(renewal.lost[released.apply_id])
    assert "dispatched" in str(renewal.lost[unredeemed.apply_id])
    assert "does not exist" in str(renewal.lost[forged.apply_id])
    assert all(isinstance(e, LeaseLost) for e in renewal.lost.values())
    for apply_id, row in before.items():
        assert support.lease_of(db, apply_id) == row
        assert _age(db, apply_id) >= 119  # not renewed
    for lease in kept:
        assert _age(db, lease.apply_id) < 5


def test_a_batch_reads_the_control_requests_of_the_leases_it_renewed(db: Database) -> None:
    stopped, cancelled, quiet = (support.running_lease(db) for _ in range(3))
    stop, _ = control.request(db, stopped.apply_id, ControlAction.STOP, requested_by="ops")
    cancel, _ = control.request(db, cancelled.apply_id, ControlAction.CANCEL, requested_by="ops")
    renewal = leases.heartbeat_all(db, [stopped, cancelled, quiet])
    assert {a: [r.id for r in rs] for a, rs in renewal.requests.items()} == {
        stopped.apply_id: [stop.id],
        cancelled.apply_id: [cancel.id],
    }


@pytest.mark.parametrize("backend_url", ["mysql", "postgres"], indirect=["backend_url"])
def test_a_row_held_by_another_transaction_is_skipped_not_waited_for(
    db: Database, open_db: OpenDb, spawn: Spawn
) -> None:
    """One apply's row locked (its owner's fence in flight): the batch returns at once, renews the
    others, and reports that one busy, neither renewed nor lost."""
    held = [support.running_lease(db) for _ in range(3)]
    busy = held[1]
    support.age_heartbeat(db, busy.apply_id, 120)
    beating = open_db()
    tap = Tap(beating)
    batch = spawn("batch", lambda: leases.heartbeat_all(beating, held))
    with leases.fence(open_db(), busy):
        batch.start()
        renewal = returned_without_waiting(db, batch, tap, what="the batched heartbeat")
    assert renewal.busy == {busy.apply_id}
    assert renewal.renewed == {held[0].apply_id, held[2].apply_id}
    assert renewal.lost == {}
    assert _age(db, busy.apply_id) >= 119


# --- the race: one apply of a batch reclaimed while the batch renews ------------------------------


@ISOLATIONS
def test_one_apply_of_a_batch_reclaimed_while_the_batch_renews(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """A reclaim pass has rotated one apply of the batch and not yet committed when the batch
    renews. The batch skips that row, renews the others, and the next beat proves the lease lost:

    - PostgreSQL: the batch returns at once, never waiting;
    - MariaDB: the batch waits for the pass to commit, though not for the reclaimed row. The
      pass's scan of ``(state, heartbeat_at)`` locked the index entry after the stale one, which
      is another apply's of the batch, and renewing that apply moves its entry. A heartbeat of its
      own waited the same way; the wait lasts as long as the pass's transaction;
    - SQLite: the batch waits for the write lock, then proves the lease lost at once.

    Either way the reclaimed apply keeps the reclaimer's lease."""
    held = [support.running_lease(db) for _ in range(3)]
    victim, others = held[1], [held[0], held[2]]
    support.age_heartbeat(db, victim.apply_id, 120)
    reclaiming, beating = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    pause, reclaim_tap, tap = PauseBeforeCommit(reclaiming), Tap(reclaiming), Tap(beating)
    reclaimer = spawn(
        "reclaim", lambda: leases.reclaim(reclaiming, support.reclaim_policy(stale_after=60))
    )
    batch = spawn("batch", lambda: leases.heartbeat_all(beating, held))

    try:
        reclaimer.start()
        assert pause.paused.wait(POLL), "the reclaim pass never reached its commit"
        holder = None if db.is_sqlite else reclaim_tap.connection_ids(reclaimer.thread).pop()
        batch.start()
        if db.dialect == "postgresql":
            returned_without_waiting(db, batch, tap, what="the batched heartbeat")
        else:
            prove_blocked(db, batch, tap, holder=holder, what="the batched heartbeat")
    finally:
        pause.release.set()
    (reclaimed,) = reclaimer.result()
    assert reclaimed.apply_id == victim.apply_id
    assert reclaimed.lease is not None
    epoch, token = reclaimed.lease.epoch, reclaimed.lease.token

    if not db.is_sqlite:
        first = batch.result()
        assert first.busy == {victim.apply_id}
        assert first.renewed == {lease.apply_id for lease in others}
        assert first.lost == {}
    renewal = batch.result() if db.is_sqlite else leases.heartbeat_all(beating, held)
    assert set(renewal.lost) == {victim.apply_id}
    assert renewal.lost[victim.apply_id].current_epoch == epoch
    assert renewal.renewed == {lease.apply_id for lease in others}
    assert support.lease_of(db, victim.apply_id)[:3] == (ApplyState.DISPATCHED, epoch, token)
    for lease in others:
        assert _age(db, lease.apply_id) < 5


@ISOLATIONS
def test_reclaim_skips_the_rows_of_a_batch_in_flight_and_then_finds_them_fresh(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """The other order: the batch holds its rows (renewed, not yet committed) when a reclaim pass
    runs for an apply whose heartbeat was stale. Servers: the pass skips the locked row at once;
    SQLite: it waits for the write lock. Then the heartbeat is fresh and nothing is reclaimed."""
    held = [support.running_lease(db) for _ in range(3)]
    support.age_heartbeat(db, held[1].apply_id, 120)
    policy = support.reclaim_policy(stale_after=60)
    beating, reclaiming = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(reclaiming)
    reclaimer = spawn("reclaim", lambda: leases.reclaim(reclaiming, policy))

    with beating.transaction() as conn:
        found = leasing.renew_held(conn, [(x.apply_id, x.epoch, x.token) for x in held])
        assert found.renewed == {lease.apply_id for lease in held}
        holder = holder_id(beating, conn)
        reclaimer.start()
        if db.is_sqlite:
            prove_blocked(db, reclaimer, tap, holder=holder, what="the reclaim pass")
        else:
            assert returned_without_waiting(db, reclaimer, tap, what="the reclaim pass") == []

    assert (reclaimer.result() if db.is_sqlite else leases.reclaim(reclaiming, policy)) == []
    for lease in held:
        assert support.lease_of(db, lease.apply_id)[:3] == ("running", lease.epoch, lease.token)
        assert _age(db, lease.apply_id) < 5


# --- tasks.heartbeat.Heartbeats: one thread for a worker's leases ---------------------------------


def test_a_lost_lease_interrupts_its_run_alone_and_the_others_keep_beating(db: Database) -> None:
    clock = FakeClock()
    beats = Heartbeats(db, interval=0.005, stale_after=STALE_AFTER, monotonic=clock)
    held = [(support.running_lease(db), Interrupts()) for _ in range(3)]
    for lease, interrupts in held:
        beats.hold(lease, interrupts)
    beats.start()
    try:
        wait_until(lambda: beats.beats >= 2, what="two batched heartbeats")
        (lost, lost_interrupts), kept = held[0], held[1:]
        support.hand_back(db, lost, reason="test rotation")
        assert lost_interrupts.event.wait(10)
        assert lost_interrupts.reason == Reason.LEASE_LOST
        seen = beats.beats
        for lease, _ in kept:
            support.age_heartbeat(db, lease.apply_id, 120)
        wait_until(lambda: beats.beats >= seen + 2, what="beats after the loss")
        for lease, interrupts in kept:
            assert not interrupts.event.is_set()
            assert _age(db, lease.apply_id) < 5
        assert beats.is_alive()  # a worker's heartbeat outlives any one lease
    finally:
        beats.stop()
        beats.join(10)
    assert not beats.is_alive()


@pytest.mark.parametrize("ending", [False, True], ids=["taken", "its-own-run-ending-it"])
def test_a_loss_is_a_warning_unless_the_lease_s_own_run_is_ending_it(
    db: Database, caplog: pytest.LogCaptureFixture, ending: bool
) -> None:
    """A mass cancel rotates hundreds of leases away at once, each by its own run, and a beat
    may read a row between that commit and the run's release: no warning then. The run is
    interrupted alike (it is past its last write)."""
    caplog.set_level(logging.INFO, logger="tasks.heartbeat")
    beats = Heartbeats(db, interval=1.0, stale_after=STALE_AFTER, monotonic=FakeClock())
    lease, interrupts = support.running_lease(db), Interrupts()
    beats.hold(lease, interrupts)
    interrupts.ending = ending
    support.hand_back(db, lease, reason="test rotation")
    assert not beats.beat_once()
    assert interrupts.reason == Reason.LEASE_LOST
    (record,) = [r for r in caplog.records if "stopping its run" in r.getMessage()]
    assert record.levelno == (logging.INFO if ending else logging.WARNING)


def test_each_lease_has_its_own_presumed_lost_window(db: Database, tmp_path: Path) -> None:
    """The store stops answering: a lease held for stale_after is presumed lost, one held later
    is not yet, and one released is never interrupted."""
    clock = FakeClock()
    broken = unreachable(db.dialect, tmp_path)
    beats = Heartbeats(broken, interval=0.005, stale_after=STALE_AFTER, monotonic=clock)
    early, late, gone = (support.running_lease(db) for _ in range(3))
    early_i, late_i, gone_i = Interrupts(), Interrupts(), Interrupts()
    beats.hold(early, early_i)
    beats.hold(gone, gone_i)
    clock.advance(10)
    beats.hold(late, late_i)
    beats.release(gone)
    beats.start()
    try:
        wait_until(lambda: beats.failures >= 2, what="failed heartbeats")
        clock.advance(STALE_AFTER - 10)
        assert early_i.event.wait(10), "not presumed lost after stale_after"
        assert early_i.lost is not None
        assert "presumed lost" in str(early_i.lost)
        seen = beats.failures
        wait_until(lambda: beats.failures >= seen + 2, what="more failed heartbeats")
        assert not late_i.event.is_set(), "presumed lost before its own stale_after"
        clock.advance(10)
        assert late_i.event.wait(10)
        assert not gone_i.event.is_set()
    finally:
        beats.stop()
        beats.join(10)
        broken.dispose()


@pytest.mark.parametrize("backend_url", ["mysql", "postgres"], indirect=["backend_url"])
def test_a_lease_skipped_because_its_row_was_held_is_tried_again_within_the_beat(
    db: Database, open_db: OpenDb, spawn: Spawn
) -> None:
    """The owner's own checkpoint holds the row when the beat comes: the beat renews the others,
    then tries that one again (after ``BUSY_PAUSE`` of the interval, here 1 s) and renews it once
    the checkpoint committed, instead of leaving it to the next beat."""
    clock = FakeClock()
    beats = Heartbeats(open_db(), interval=20.0, stale_after=STALE_AFTER, monotonic=clock)
    held = [(support.running_lease(db), Interrupts()) for _ in range(3)]
    for lease, interrupts in held:
        beats.hold(lease, interrupts)
    writing = held[1][0]
    support.age_heartbeat(db, writing.apply_id, 120)
    beat = spawn("beat", beats.beat_once)
    with leases.fence(open_db(), writing):
        beat.start()
        wait_until(lambda: beats.busy >= 1, what="the beat skipping the held row")
        assert _age(db, held[0][0].apply_id) < 5  # the others did not wait for it
    assert beat.result() is True
    assert beats.busy == 1
    assert _age(db, writing.apply_id) < 5
    assert not any(interrupts.event.is_set() for _, interrupts in held)


def test_an_unexpected_error_in_a_beat_does_not_end_the_workers_heartbeat(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A beat that breaks on something other than the store (a bug, a row it cannot read) is
    logged and counted; the thread goes on, or every lease of the worker would later be
    presumed lost."""
    calls = [0]

    def breaks_once(db: Database, held: list[Lease]) -> leases.Renewal:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a bug in one beat")
        return leases.heartbeat_all(db, held)

    monkeypatch.setattr("tasks.heartbeat.heartbeat_all", breaks_once)
    clock = FakeClock()
    beats = Heartbeats(db, interval=0.005, stale_after=STALE_AFTER, monotonic=clock)
    lease, interrupts = support.running_lease(db), Interrupts()
    beats.hold(lease, interrupts)
    support.age_heartbeat(db, lease.apply_id, 120)
    beats.start()
    try:
        wait_until(lambda: beats.beats >= 2, what="beats after the broken one")
    finally:
        beats.stop()
        beats.join(10)
    assert beats.failures >= 1
    assert _age(db, lease.apply_id) < 5
    assert not interrupts.event.is_set()
