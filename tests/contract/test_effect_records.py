"""The records of external effects and the effect window (``storage.published`` through
``leases.effects``), on every store.

An effect's answer is recorded in an *effect fence*: the lease proven current in any state of
its apply (a stopped or ended apply is still published, by the lease its stop or end minted),
never by a lease that moved on. The effect window keeps two epochs' calls from overlapping
without holding a lock during a call: it opens only for the current lease, only once no other
epoch's window is open, and is closed by the epoch that opened it.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import text, update

from leases import Lease, fence, mint_token
from leases.effects import close_window, effect_fence, open_window
from storage import applies, fenced, publications, published
from storage.database import Database
from storage.errors import EffectWindowBusy, FenceClosed, LeaseLost
from storage.published import EffectFenced
from storage.states import ApplyState
from storage.tables import applies as applies_table
from tests import support
from tests.celery_fixtures import run_lease, sleep_apply
from tests.support import hand_back


def record_both(fx: EffectFenced, n: int = 0) -> None:
    published.record_comment(fx, kind="summary", github_comment_id=1001, body_sha256=f"{n:064d}")
    published.record_check(fx, check_run_id=2002, status="in_progress")


def test_records_land_with_the_current_lease_stamped_with_its_epoch(db: Database) -> None:
    lease = support.running_lease(db)
    bystander = support.running_lease(db, owner="worker-2")
    with effect_fence(db, bystander) as fx:
        record_both(fx)
    with effect_fence(db, lease) as fx:
        record_both(fx)
    with db.transaction() as conn:
        comments = conn.execute(
            text("SELECT apply_id, github_comment_id, edit_count, last_epoch FROM apply_comments")
        ).all()
        checks = conn.execute(text("SELECT apply_id, last_epoch, status FROM checks")).all()
    assert sorted(tuple(r) for r in comments) == sorted(
        [(bystander.apply_id, 1001, 0, bystander.epoch), (lease.apply_id, 1001, 0, lease.epoch)]
    )
    assert sorted(tuple(r) for r in checks) == sorted(
        [
            (bystander.apply_id, bystander.epoch, "in_progress"),
            (lease.apply_id, lease.epoch, "in_progress"),
        ]
    )


def test_records_update_in_place(db: Database) -> None:
    lease = support.running_lease(db)
    for n in range(3):
        with effect_fence(db, lease) as fx:
            published.record_comment(
                fx, kind="summary", github_comment_id=1001, body_sha256=f"{n:064d}"
            )
            published.record_check(
                fx, check_run_id=2002, status="completed", conclusion="success" if n else None
            )
            published.record_check(  # unchanged values: still one row, not a lost lease
                fx, check_run_id=2002, status="completed", conclusion="success" if n else None
            )
    with db.transaction() as conn:
        comments = conn.execute(text("SELECT edit_count, body_sha256 FROM apply_comments")).all()
        checks = conn.execute(text("SELECT status, conclusion FROM checks")).all()
    assert [tuple(r) for r in comments] == [(2, f"{2:064d}")]
    assert [tuple(r) for r in checks] == [("completed", "success")]


def test_a_lease_that_moved_on_records_nothing(db: Database) -> None:
    lease = support.running_lease(db)
    current = hand_back(db, lease, reason="tests")
    forged = Lease(current.apply_id, current.epoch, "f" * 32)  # the current epoch, a wrong token
    for stale in (lease, forged):
        before = support.snapshot(db)
        with pytest.raises(LeaseLost), effect_fence(db, stale) as fx:
            record_both(fx)
        assert support.snapshot(db) == before


def test_a_stopped_or_ended_apply_is_recorded_by_the_lease_its_end_minted(db: Database) -> None:
    """The final publication: the apply is no longer running, but its new lease may publish."""
    lease = support.running_lease(db)
    with fence(db, lease) as fx:
        epoch = fenced.end_lease(
            fx, new_token="a" * 32, to_state=ApplyState.STOPPED, event="stopped", reason="tests"
        )
    stopped = Lease(lease.apply_id, epoch, "a" * 32)
    with effect_fence(db, stopped) as fx:
        record_both(fx)
    assert applies.get(db, lease.apply_id)["state"] == "stopped"
    with pytest.raises(LeaseLost), effect_fence(db, lease) as fx:  # the running lease may not
        record_both(fx)


def test_a_block_that_raises_records_nothing_and_the_handle_closes(db: Database) -> None:
    lease = support.running_lease(db)
    before = support.snapshot(db)
    kept: list[EffectFenced] = []

    def records_then_raises() -> None:
        with effect_fence(db, lease) as fx:
            kept.append(fx)
            record_both(fx)
            raise RuntimeError("after the records")

    with pytest.raises(RuntimeError):
        records_then_raises()
    assert support.snapshot(db) == before
    with pytest.raises(FenceClosed):
        record_both(kept[0])
    with pytest.raises(FenceClosed):
        EffectFenced(None, 1, 1, _proof=object())  # type: ignore[arg-type]


# --- the effect window ---------------------------------------------------------------------------


def window(db: Database, apply_id: int) -> tuple[int | None, bool]:
    row = applies.get(db, apply_id)
    return row["effect_epoch"], row["effect_until"] is not None


def test_the_window_opens_extends_and_closes_for_its_epoch(db: Database) -> None:
    lease = support.running_lease(db)
    open_window(db, lease, 30.0)
    assert window(db, lease.apply_id) == (lease.epoch, True)
    open_window(db, lease, 30.0)  # the same epoch extends it
    close_window(db, lease)
    assert window(db, lease.apply_id) == (lease.epoch, False)


def test_a_later_epoch_waits_for_an_open_window_told_how_long(db: Database) -> None:
    lease = support.running_lease(db)
    open_window(db, lease, 30.0)
    new = hand_back(db, lease, reason="tests")  # rotated while the call is in flight
    before = support.snapshot(db)
    with pytest.raises(EffectWindowBusy) as busy:
        open_window(db, new, 30.0)
    assert busy.value.epoch == lease.epoch
    assert 25.0 < busy.value.remaining <= 30.0
    assert support.snapshot(db) == before
    # the earlier call was answered: its epoch closes its own window, lease moved on or not
    close_window(db, lease)
    open_window(db, new, 30.0)
    assert window(db, lease.apply_id) == (new.epoch, True)
    close_window(db, lease)  # a late close of the earlier epoch leaves the new window alone
    assert window(db, lease.apply_id) == (new.epoch, True)


def test_a_window_left_open_runs_out_by_the_store_clock(db: Database) -> None:
    """A call left without an answer keeps its window open to its end, and no longer."""
    lease = support.running_lease(db)
    open_window(db, lease, 30.0)
    new = hand_back(db, lease, reason="tests")
    with db.transaction() as conn:  # the window's end written into the past, not slept through
        conn.execute(
            update(applies_table)
            .where(applies_table.c.id == lease.apply_id)
            .values(effect_until=datetime(2000, 1, 1))
        )
    open_window(db, new, 30.0)
    assert window(db, lease.apply_id) == (new.epoch, True)


def test_only_the_current_lease_opens_a_window(db: Database) -> None:
    lease = support.running_lease(db)
    new = hand_back(db, lease, reason="tests")
    forged = Lease(new.apply_id, new.epoch, "f" * 32)
    before = support.snapshot(db)
    for stale in (lease, forged):
        with pytest.raises(LeaseLost):
            open_window(db, stale, 30.0)
    assert support.snapshot(db) == before


# --- the outbox's backlog, as leasehold doctor reports it ----------------------------------------


def test_the_backlog_counts_what_stopped_or_ended_applies_owe_not_a_resumed_one(
    db: Database,
) -> None:
    apply_id = sleep_apply(db, (0.01,), pull_request=True)
    lease = run_lease(db, apply_id)
    assert publications.backlog(db).count == 0
    with fence(db, lease) as fx:
        fenced.end_lease(
            fx, new_token=mint_token(), to_state=ApplyState.STOPPED, event="stopped", reason="t"
        )
    owed = publications.backlog(db)
    assert owed.count == 1
    assert owed.oldest_due_at is not None
    run_lease(db, apply_id)  # resumed: running again, its holder publishes
    assert publications.backlog(db).count == 0
