"""The effect window of an apply's external calls (GitHub), and the fence of an effect's record."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, Update, bindparam, select

from storage import clock
from storage._statements._common import _by_primary_key
from storage.tables import applies


def open_effect_window(apply_id: int, *, epoch: int, token: str, seconds: float) -> Update:
    """Open (or extend) the lease's effect window: ``seconds`` from now by the store's clock.

    Only the current lease may, in any state (a stopped or ended apply is still published), and
    only once no window of another epoch is open: an earlier epoch's call may still be in flight
    until its window ends, and ours must not overlap it.
    """
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == epoch,
            applies.c.lease_token == token,
            applies.c.effect_until.is_(None)
            | (applies.c.effect_epoch == epoch)
            | (applies.c.effect_until <= clock.now()),
        )
        .values(effect_epoch=epoch, effect_until=clock.now_plus(bindparam("seconds", seconds)))
    )


def effect_window_row(apply_id: int) -> Select[Any]:
    """Why a window did not open: the lease as it is, and the seconds the open one has left."""
    return select(
        applies.c.lease_epoch,
        applies.c.lease_token,
        applies.c.effect_epoch,
        (-clock.age_of(applies.c.effect_until)).label("remaining"),
    ).where(applies.c.id == apply_id)


def close_effect_window(apply_id: int, *, epoch: int) -> Update:
    """The epoch's calls are over (answered): later epochs need not wait for its window to run
    out. The one write a holder may still make once its lease moved on, since it only says that
    its own call is over; it never touches a later epoch's window."""
    return _by_primary_key(
        applies.update()
        .where(applies.c.id == apply_id, applies.c.effect_epoch == epoch)
        .values(effect_until=None)
    )


def effect_fence(apply_id: int, token: str) -> Select[Any]:
    """The fence of an effect's record: the lease is current, in whatever state the apply is
    (its stopped or final state is published after the rotation that made it so)."""
    return (
        select(applies.c.lease_epoch)
        .where(applies.c.id == apply_id, applies.c.lease_token == token)
        .with_for_update()
    )
