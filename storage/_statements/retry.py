"""Retry: a failed apply back into its line (no lease: the apply row is locked)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, Update, select

from storage import clock
from storage._statements._common import _WAITING, _by_primary_key
from storage.tables import applies, apply_tasks


def apply_failure(apply_id: int) -> Select[Any]:
    """The error a failed apply ended with (kept in its log when a retry clears it)."""
    return select(applies.c.error).where(applies.c.id == apply_id)


def reopen_apply(apply_id: int, *, epoch: int) -> Update:
    """A retried apply, just rotated out of ``failed`` to ``epoch``, is unfinished again: its error
    and end time are cleared. Zero rows: it is not the waiting apply of that epoch."""
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == epoch,
            applies.c.state.in_(_WAITING),
        )
        .values(error=None, finished_at=None, updated_at=clock.now())
    )


def reopen_tasks(apply_id: int, *, epoch: int) -> Update:
    """A retried apply's unfinished apply tasks (the failed one, those cancelled because it
    failed, any left running or pending by an abandoned holder) go back to pending, stamped with
    the retry's epoch. Completed ones are not touched; checkpoints and progress are kept, so that
    an engine may continue from them."""
    return (
        apply_tasks.update()
        .where(apply_tasks.c.apply_id == apply_id, apply_tasks.c.state != "completed")
        .values(state="pending", error=None, finished_at=None, lease_epoch=epoch)
    )
