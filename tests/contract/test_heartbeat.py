"""The heartbeat thread, on real databases with an injected ``monotonic``: it renews
``heartbeat_at`` by the DB clock, proves loss only from a successful statement, retries storage
failures, and presumes the lease lost only after ``stale_after`` of (injected) time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from leases import Lease, heartbeat
from storage import applies, control
from storage.database import Database
from storage.errors import LeaseLost, StorageUnavailable
from storage.states import ApplyState, ControlAction
from tasks.heartbeat import Heartbeat
from tasks.interrupts import Interrupts, Reason
from tests import support
from tests.celery_fixtures import FakeClock, unreachable, wait_until
from tests.support import hand_back, release

STALE_AFTER = 30.0


@pytest.fixture
def lease(db: Database) -> Lease:
    return support.running_lease(db)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def broken(db: Database, tmp_path: Path) -> Iterator[Database]:
    """A database of the same dialect that cannot be reached."""
    failing = unreachable(db.dialect, tmp_path)
    yield failing
    failing.dispose()


def _heartbeat(
    db: Database, lease: Lease, clock: FakeClock, interval: float = 0.005
) -> tuple[Heartbeat, Interrupts]:
    interrupts = Interrupts()
    beat = Heartbeat(
        db, lease, interrupts, interval=interval, stale_after=STALE_AFTER, monotonic=clock
    )
    return beat, interrupts


def _age(db: Database, apply_id: int) -> float:
    return float(applies.get(db, apply_id)["heartbeat_age"])


def test_a_beat_renews_heartbeat_at_from_the_database_clock(
    db: Database, lease: Lease, clock: FakeClock
) -> None:
    support.age_heartbeat(db, lease.apply_id, 120)
    assert _age(db, lease.apply_id) >= 119
    beat, interrupts = _heartbeat(db, lease, clock)
    assert beat.beat_once() is True
    assert _age(db, lease.apply_id) < 5
    assert (beat.beats, beat.failures) == (1, 0)
    assert not interrupts.event.is_set()
    state, epoch, token, owner = support.lease_of(db, lease.apply_id)
    assert (state, epoch, token, owner) == ("running", lease.epoch, lease.token, "worker-1")


def test_after_a_rotation_the_next_beat_proves_the_lease_lost(
    db: Database, lease: Lease, clock: FakeClock
) -> None:
    new = hand_back(db, lease, reason="test rotation")
    before = support.snapshot(db)
    beat, interrupts = _heartbeat(db, lease, clock)
    assert beat.beat_once() is False
    assert interrupts.reason == Reason.LEASE_LOST
    assert interrupts.event.is_set()
    assert isinstance(interrupts.lost, LeaseLost)
    assert interrupts.lost.current_epoch == new.epoch
    with pytest.raises(LeaseLost):
        interrupts.raise_if_lost()
    assert support.snapshot(db) == before  # the refused heartbeat wrote nothing
    assert beat.failures == 0  # proof of loss is not a storage failure


def test_a_heartbeat_of_an_apply_that_left_running_is_lost(
    db: Database, lease: Lease, clock: FakeClock
) -> None:
    release(db, lease, reason="stopped elsewhere")
    beat, interrupts = _heartbeat(db, lease, clock)
    assert beat.beat_once() is False
    assert interrupts.reason == Reason.LEASE_LOST


def test_the_thread_stops_at_once_when_the_lease_is_lost(
    db: Database, lease: Lease, clock: FakeClock
) -> None:
    beat, interrupts = _heartbeat(db, lease, clock)
    beat.start()
    try:
        wait_until(lambda: beat.beats >= 2, what="two heartbeats")
        hand_back(db, lease, reason="test rotation")
        assert interrupts.event.wait(10)
        assert interrupts.reason == Reason.LEASE_LOST
        beat.join(10)
        assert not beat.is_alive()
    finally:
        beat.stop()
        beat.join(10)


def test_storage_failures_are_retried_and_not_read_as_loss(
    broken: Database, lease: Lease, clock: FakeClock
) -> None:
    with pytest.raises(StorageUnavailable):
        heartbeat(broken, lease)
    beat, interrupts = _heartbeat(broken, lease, clock)
    assert beat.beat_once() is False
    assert beat.failures == 1
    assert interrupts.lost is None
    assert not interrupts.event.is_set()


def test_failures_presume_the_lease_lost_only_after_stale_after(
    broken: Database, lease: Lease, clock: FakeClock
) -> None:
    beat, interrupts = _heartbeat(broken, lease, clock)
    beat.start()
    try:
        wait_until(lambda: beat.failures >= 3, what="failed heartbeats")
        clock.advance(STALE_AFTER - 0.5)
        seen = beat.failures
        wait_until(lambda: beat.failures >= seen + 3, what="more failed heartbeats")
        assert not interrupts.event.is_set(), "presumed lost before stale_after"
        clock.advance(0.5)
        assert interrupts.event.wait(10), "not presumed lost after stale_after"
        assert interrupts.reason == Reason.LEASE_LOST
        assert interrupts.lost is not None
        assert "presumed lost" in str(interrupts.lost)
        beat.join(10)
        assert not beat.is_alive()
    finally:
        beat.stop()
        beat.join(10)


def test_a_successful_beat_restarts_the_stale_after_window(
    db: Database, broken: Database, lease: Lease, clock: FakeClock
) -> None:
    """Failures, one success, failures again: only stale_after since the last success counts."""
    beat, interrupts = _heartbeat(broken, lease, clock)
    beat.start()
    try:
        wait_until(lambda: beat.failures >= 2, what="failed heartbeats")
        clock.advance(STALE_AFTER - 1)
        beat.db = db  # the database is back
        wait_until(lambda: beat.beats >= 1, what="a heartbeat after recovery")
        beat.db = broken  # and gone again
        seen = beat.failures
        wait_until(lambda: beat.failures >= seen + 2, what="failures after recovery")
        clock.advance(STALE_AFTER - 1)  # 2 * stale_after - 2 since start, < stale_after since ok
        seen = beat.failures
        wait_until(lambda: beat.failures >= seen + 2, what="more failures")
        assert not interrupts.event.is_set()
        clock.advance(1)
        assert interrupts.event.wait(10)
        assert interrupts.reason == Reason.LEASE_LOST
    finally:
        beat.stop()
        beat.join(10)


@pytest.mark.parametrize("action", [ControlAction.STOP, ControlAction.CANCEL])
def test_a_pending_control_request_interrupts_with_its_id(
    db: Database, lease: Lease, clock: FakeClock, action: ControlAction
) -> None:
    request, created = control.request(db, lease.apply_id, action, requested_by="ops")
    assert created
    beat, interrupts = _heartbeat(db, lease, clock)
    assert beat.beat_once() is True
    assert interrupts.event.is_set()
    assert interrupts.reason == Reason(str(action))
    assert interrupts.request_id == request.id
    assert interrupts.lost is None


def test_cancel_outranks_stop(db: Database, lease: Lease, clock: FakeClock) -> None:
    control.request(db, lease.apply_id, ControlAction.STOP, requested_by=None)
    cancel, _ = control.request(db, lease.apply_id, ControlAction.CANCEL, requested_by=None)
    beat, interrupts = _heartbeat(db, lease, clock)
    assert beat.beat_once() is True
    assert (interrupts.reason, interrupts.request_id) == (Reason.CANCEL, cancel.id)


def test_a_resume_request_does_not_interrupt(db: Database, lease: Lease, clock: FakeClock) -> None:
    control.request(db, lease.apply_id, ControlAction.RESUME, requested_by=None)
    beat, interrupts = _heartbeat(db, lease, clock)
    assert beat.beat_once() is True
    assert not interrupts.event.is_set()


def test_the_thread_picks_up_a_request_made_while_it_runs(
    db: Database, lease: Lease, clock: FakeClock
) -> None:
    beat, interrupts = _heartbeat(db, lease, clock)
    beat.start()
    try:
        wait_until(lambda: beat.beats >= 1, what="a heartbeat")
        request, _ = control.request(db, lease.apply_id, ControlAction.STOP, requested_by=None)
        assert interrupts.event.wait(10)
        assert (interrupts.reason, interrupts.request_id) == (Reason.STOP, request.id)
        # The apply stays running: only its owner acts on the request, at a safe point.
        assert applies.get(db, lease.apply_id)["state"] == ApplyState.RUNNING
        assert control.get(db, request.id).state == "pending"
    finally:
        beat.stop()
        beat.join(10)


def test_stop_ends_a_thread_that_waits_a_long_interval(
    db: Database, lease: Lease, clock: FakeClock
) -> None:
    beat, _ = _heartbeat(db, lease, clock, interval=3600)
    beat.start()
    beat.stop()
    beat.join(5)
    assert not beat.is_alive()
    assert beat.beats == 0


def test_a_heartbeat_that_hangs_is_presumed_lost_after_stale_after_all_the_same(
    db: Database, lease: Lease, clock: FakeClock, open_db: Callable[..., Database]
) -> None:
    """A partition can hang a statement instead of failing it (packets dropped silently). Here
    another connection holds the applies table (a table lock on the servers: the heartbeat skips
    a locked *row*) or the database write lock (SQLite), so the heartbeat's first statement waits
    inside the driver and neither succeeds nor fails. The presumption of loss does not wait for
    it: stale_after after the last success, the lease is presumed lost while the beat is still
    blocked."""
    holder = open_db()
    beat, interrupts = _heartbeat(db, lease, clock)
    with _holding_the_applies_table(holder):
        beat.start()
        try:
            wait_until(lambda: beat.beats == 0 and beat.is_alive(), what="the heartbeat started")
            clock.advance(STALE_AFTER - 0.5)
            assert not interrupts.event.wait(0.2), "presumed lost before stale_after"
            clock.advance(0.5)
            assert interrupts.event.wait(10), "a hung heartbeat kept the lease for ever"
            assert interrupts.lost is not None
            assert "presumed lost" in str(interrupts.lost)
            assert beat.beats == 0  # the beat itself is still waiting for the table
        finally:
            beat.stop()
    beat.join(60)  # the blocked beat ends once the row is free
    assert not beat.is_alive()


@contextmanager
def _holding_the_applies_table(holder: Database) -> Iterator[None]:
    with holder.transaction() as conn:
        if holder.is_sqlite:
            conn.execute(text("UPDATE applies SET updated_at = updated_at"))
            yield
        elif holder.dialect == "postgresql":
            conn.execute(text("LOCK TABLE applies IN ACCESS EXCLUSIVE MODE"))
            yield
        else:
            # LOCK TABLES ends the transaction and outlives the next one: unlocked by hand.
            conn.execute(text("LOCK TABLES applies WRITE"))
            try:
                yield
            finally:
                conn.execute(text("UNLOCK TABLES"))
