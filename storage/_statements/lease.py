"""The lease row of an apply: read, fence, lock, rotate, redeem, heartbeat, reclaim scans; and
the dispatches owed when the broker was down."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Select, Update, bindparam, select, tuple_

from storage import clock
from storage._statements._common import _LEASE_ROW, _by_primary_key
from storage.states import ApplyState
from storage.tables import applies

# --- the lease row -------------------------------------------------------------------------------


def read_lease_row(apply_id: int) -> Select[Any]:
    """Why a precondition failed: the row as it is now, unlocked."""
    return select(
        applies.c.id, applies.c.state, applies.c.lease_epoch, applies.c.lease_token
    ).where(applies.c.id == apply_id)


def existing_apply_ids(apply_ids: Iterable[int]) -> Select[Any]:
    """Which of ``apply_ids`` exist, unlocked (a skipped row is held, a missing one gone)."""
    return select(applies.c.id).where(applies.c.id.in_(sorted(apply_ids)))


def fence(apply_id: int, token: str) -> Select[Any]:
    """The fence: prove the lease current and lock the apply row until the transaction ends.

    A locking read sees the newest committed row under REPEATABLE READ and READ COMMITTED alike,
    and waits for a rotation in flight. On SQLite the row lock is the database write lock that
    every transaction takes at BEGIN IMMEDIATE, so the clause is omitted by the dialect.
    """
    return (
        select(applies.c.lease_epoch)
        .where(
            applies.c.id == apply_id,
            applies.c.lease_token == token,
            applies.c.state == ApplyState.RUNNING,
        )
        .with_for_update()
    )


def lock_apply(apply_id: int) -> Select[Any]:
    """Lock one apply row for a transition made without a lease (control, dispatch)."""
    return select(*_LEASE_ROW).where(applies.c.id == apply_id).with_for_update()


def rotate(
    apply_id: int,
    *,
    old_epoch: int,
    old_token: str | None,
    new_token: str,
    from_states: Iterable[str],
    to_state: str,
    reclaimed: bool = False,
    error: str | None = None,
) -> Update:
    """Compare-and-swap the lease: only the holder of (old_epoch, old_token) can rotate it."""
    token_matches = (
        applies.c.lease_token.is_(None) if old_token is None else applies.c.lease_token == old_token
    )
    values: dict[str, Any] = {
        "lease_token": new_token,
        "lease_epoch": applies.c.lease_epoch + 1,
        "lease_owner": None,
        "lease_acquired_at": None,
        "state": to_state,
        "heartbeat_at": clock.now(),
        "updated_at": clock.now(),
    }
    if reclaimed:
        values["reclaim_count"] = applies.c.reclaim_count + 1
    if ApplyState(to_state).terminal:
        values["finished_at"] = clock.now()
        values["error"] = error
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == old_epoch,
            token_matches,
            applies.c.state.in_(list(from_states)),
        )
        .values(**values)
    )


def redeem(apply_id: int, *, epoch: int, token: str, owner: str) -> Update:
    """The worker's first write: claim a dispatched lease that nobody has claimed yet."""
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == epoch,
            applies.c.lease_token == token,
            applies.c.lease_owner.is_(None),
            applies.c.state == ApplyState.DISPATCHED,
        )
        .values(
            lease_owner=owner,
            state=ApplyState.RUNNING,
            lease_acquired_at=clock.now(),
            heartbeat_at=clock.now(),
            updated_at=clock.now(),
        )
    )


def heartbeat(apply_id: int, *, epoch: int, token: str) -> Update:
    """Liveness, fenced in one statement: the row lock of the UPDATE is the fence."""
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == epoch,
            applies.c.lease_token == token,
            applies.c.state == ApplyState.RUNNING,
        )
        .values(heartbeat_at=clock.now())
    )


def lock_held(apply_ids: Iterable[int]) -> Select[Any]:
    """A worker's batched heartbeat, step 1: lock the lease rows of the applies it holds, skipping
    those locked now (the owner's own fence in flight, or a reclaimer's rotation), and read them.

    A locking read sees the newest committed row, as the fence does; ``SKIP LOCKED`` keeps one
    apply's held row from delaying every other lease of the worker (the skipped one is neither
    renewed nor lost this beat). No ``state`` in the WHERE clause: the primary key alone finds
    the rows, so no index entry of ``(state, heartbeat_at)`` is locked (see ``_by_primary_key``).
    On SQLite the clause is omitted: BEGIN IMMEDIATE holds the whole database.
    """
    return (
        select(applies.c.id, applies.c.state, applies.c.lease_epoch, applies.c.lease_token)
        .where(applies.c.id.in_(sorted(apply_ids)))
        .order_by(applies.c.id)
        .with_for_update(skip_locked=True)
    )


def renew_held(leases: Iterable[tuple[int, int, str]]) -> Update:
    """A worker's batched heartbeat, step 2: renew the leases that step 1 proved current, in one
    statement. The rows are locked by step 1 already; the precondition stays in the WHERE clause
    all the same, so that the statement is a fence of its own (``rowcount`` must be all of them).
    """
    held = sorted(leases)
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id.in_([apply_id for apply_id, _, _ in held]),
            tuple_(applies.c.id, applies.c.lease_epoch, applies.c.lease_token).in_(held),
            applies.c.state == ApplyState.RUNNING,
        )
        .values(heartbeat_at=clock.now())
    )


def stale_candidates(state: str, *, older_than: float, limit: int) -> Select[Any]:
    """Applies in ``state`` whose heartbeat is older than ``older_than`` seconds by the DB clock.

    An index range scan on (state, heartbeat_at); rows another reclaimer (or a fenced write in
    flight) holds are skipped rather than waited for.
    """
    return (
        select(
            applies.c.id,
            applies.c.state,
            applies.c.lease_epoch,
            applies.c.lease_token,
            applies.c.reclaim_count,
        )
        .where(
            applies.c.state == state,
            applies.c.heartbeat_at < clock.now_minus(bindparam("older_than", older_than)),
        )
        .order_by(applies.c.heartbeat_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def current_epoch(apply_id: int) -> Select[Any]:
    return select(applies.c.lease_epoch).where(applies.c.id == apply_id)


# --- dispatches owed (the broker was down) --------------------------------------------------------


def owe_dispatch(apply_id: int, *, epoch: int) -> Update:
    """``run_apply`` for ``epoch`` could not be sent. Only while that lease is still the current,
    unredeemed one: a later rotation dispatches on its own."""
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == epoch,
            applies.c.state == ApplyState.DISPATCHED,
            applies.c.lease_owner.is_(None),
        )
        .values(dispatch_owed_epoch=epoch)
    )


def owed_dispatches(limit: int) -> Select[Any]:
    """Dispatched, unredeemed leases whose ``run_apply`` is still owed."""
    return (
        select(applies.c.id, applies.c.lease_epoch, applies.c.lease_token)
        .where(
            applies.c.state == ApplyState.DISPATCHED,
            applies.c.lease_owner.is_(None),
            applies.c.dispatch_owed_epoch == applies.c.lease_epoch,
        )
        .order_by(applies.c.id)
        .limit(limit)
    )


def dispatch_sent(apply_id: int, *, epoch: int) -> Update:
    return _by_primary_key(
        applies.update()
        .where(applies.c.id == apply_id, applies.c.dispatch_owed_epoch == epoch)
        .values(dispatch_owed_epoch=None)
    )
