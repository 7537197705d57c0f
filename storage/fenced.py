"""Owned writes. Each takes a :class:`Fenced` handle, which only :func:`fenced_transaction`
creates, after its first statement proved the lease current and locked the apply row. An owned
write without a fence therefore does not type-check, and one with a stale lease never runs.

A rotation must update the same row, so it waits for the fenced transaction to end (and a fenced
transaction opened after a rotation sees the new token and raises ``LeaseLost``), under
REPEATABLE READ and READ COMMITTED alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, final

from sqlalchemy import Connection

from storage import _leasing as leasing
from storage import _lines as lines
from storage import _statements as statements
from storage._lines import Line, Promoted
from storage.database import Database
from storage.errors import FenceClosed, InvalidInput, RowNotFound
from storage.states import ApplyState, ControlState, TaskState

_TASK_COLUMNS: Final = frozenset(
    {"state", "progress", "checkpoint", "started_at", "finished_at", "error"}
)


@final
class Fenced:
    """An open transaction in which the apply's lease was proven current and its row is locked."""

    __slots__ = ("_conn", "_line", "_open", "_token", "apply_id", "epoch")

    def __init__(
        self,
        conn: Connection,
        apply_id: int,
        epoch: int,
        token: str,
        *,
        line: Line | None,
        _proof: object,
    ) -> None:
        if _proof is not _PROOF:
            raise FenceClosed("a Fenced handle is only made by fenced_transaction()")
        self._conn = conn
        self._line = line
        self._open = True
        self._token = token
        self.apply_id = apply_id
        self.epoch = epoch

    def _connection(self) -> Connection:
        """For this module's owned writes only: the handle exposes no connection, so that
        nothing outside ``storage`` can write through the fence unfenced."""
        if not self._open:
            raise FenceClosed(f"the fence of apply {self.apply_id} epoch {self.epoch} is closed")
        return self._conn

    def _close(self) -> None:
        self._open = False

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"Fenced(apply_id={self.apply_id}, epoch={self.epoch}, {state})"


_PROOF: Final = object()


@contextmanager
def fenced_transaction(
    db: Database,
    apply_id: int,
    epoch: int,
    token: str,
    *,
    finishing: bool = False,
    apply_row: Mapping[Any, Any] | None = None,
) -> Iterator[Fenced]:
    """Open a transaction whose first lock is the fence; yield the handle; commit.

    If the block raises, everything it wrote is rolled back. ``LeaseLost`` or ``ApplyNotFound``
    come from the fence itself before anything is written. ``finishing``: the block may end the
    apply (:func:`finish`), which passes its line's turn on, so the line is locked first (the
    lock order is a line, then its applies). ``apply_row``: the apply's row as read before (its
    ``id``, ``database_name`` and ``environment``), which saves reading its line again.
    """
    known = None if apply_row is None else _line_of_row(apply_row, apply_id)
    for txn in db.attempts():
        with txn as conn:
            line = None
            if finishing:
                # Unlocked, or from the row read before: an apply never changes its line.
                line = lines.of(conn, apply_id) if known is None else known
                lines.lock(conn, line)
            # Under PostgreSQL's REPEATABLE READ a fence that waited for a rotation fails to
            # serialize: it is run again (nothing was written), and the fresh snapshot proves
            # the lease lost or current. Once the handle is out, nothing is run again.
            leasing.fence(conn, apply_id, epoch, token)
            txn.settled()
            handle = Fenced(conn, apply_id, epoch, token, line=line, _proof=_PROOF)
            try:
                yield handle
            finally:
                handle._close()


def _line_of_row(row: Mapping[Any, Any], apply_id: int) -> Line:
    if row["id"] != apply_id:
        raise FenceClosed(f"the row of apply {row['id']} does not tell apply {apply_id}'s line")
    return Line(str(row["database_name"]), str(row["environment"]))


def set_apply_state(fx: Fenced, state: ApplyState, *, error: str | None = None) -> None:
    """Move the held apply to ``state``. Leaving ``running`` ends the lease's rights: the fence
    admits only running applies."""
    fx._connection().execute(statements.set_apply_state(fx.apply_id, state=state, error=error))


def update_task(fx: Fenced, task_id: int, **values: Any) -> None:
    """Write an apply task's state, progress, checkpoint, times or error, stamping the epoch."""
    values = task_values(values)
    result = fx._connection().execute(
        statements.update_task(fx.apply_id, task_id, epoch=fx.epoch, values=values)
    )
    if result.rowcount != 1:
        raise RowNotFound(f"apply {fx.apply_id} has no apply task {task_id}")


def task_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The values :func:`update_task` writes, checked (``InvalidInput``) before anything is:
    also for a caller that writes them later, in a transaction of its own choosing."""
    values = dict(values)
    unknown = set(values) - _TASK_COLUMNS
    if unknown:
        raise InvalidInput(f"unknown apply task columns: {sorted(unknown)}")
    if "state" in values:
        try:
            values["state"] = TaskState(values["state"]).value
        except ValueError as exc:
            raise InvalidInput(f"unknown apply task state {values['state']!r}") from exc
    if "progress" in values:
        progress = values["progress"]
        # bool is an int subclass; None would only fail later, as a NOT NULL violation.
        if isinstance(progress, bool) or not (isinstance(progress, int) and 0 <= progress <= 100):
            raise InvalidInput(f"progress must be an int from 0 to 100, not {progress!r}")
    if "checkpoint" in values:
        _check_json("checkpoint", values["checkpoint"])
    return values


def _check_json(name: str, value: object) -> None:
    """Refuse what the store cannot keep as JSON before anything is written: each driver fails
    its own way on it (psycopg raises a bare ``TypeError``; NaN is no JSON to PostgreSQL)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} must be JSON: {exc}") from exc


def start_task(fx: Fenced, task_id: int) -> None:
    """Mark an apply task running (its first start time survives a resume)."""
    result = fx._connection().execute(statements.start_task(fx.apply_id, task_id, epoch=fx.epoch))
    if result.rowcount != 1:
        raise RowNotFound(f"apply {fx.apply_id} has no apply task {task_id}")


def finish_task(
    fx: Fenced,
    task_id: int,
    state: TaskState,
    *,
    error: str | None = None,
    checkpoint: Mapping[str, Any] | None = None,
) -> None:
    """End an apply task: completed (progress 100), failed or cancelled, at the DB's time; with
    its last ``checkpoint`` in the same statement, if one is still to be written."""
    if checkpoint is not None:
        _check_json("checkpoint", checkpoint)
    result = fx._connection().execute(
        statements.finish_task(
            fx.apply_id,
            task_id,
            epoch=fx.epoch,
            state=TaskState(state),
            error=error,
            checkpoint=checkpoint,
        )
    )
    if result.rowcount != 1:
        raise RowNotFound(f"apply {fx.apply_id} has no apply task {task_id}")


def cancel_unfinished_tasks(fx: Fenced) -> None:
    fx._connection().execute(statements.cancel_unfinished_tasks(fx.apply_id, epoch=fx.epoch))


def append_log(fx: Fenced, event: str, message: str, *, level: str = "info") -> None:
    fx._connection().execute(
        statements.append_log(
            fx.apply_id, epoch=fx.epoch, level=level, event=event, message=message
        )
    )


def finish_control_request(
    fx: Fenced, request_id: int, *, state: ControlState, error: str | None = None
) -> None:
    result = fx._connection().execute(
        statements.finish_control_request(
            fx.apply_id, request_id, state=ControlState(state), error=error
        )
    )
    if result.rowcount != 1:
        raise RowNotFound(f"apply {fx.apply_id} has no pending control request {request_id}")


def end_lease(
    fx: Fenced,
    *,
    new_token: str,
    to_state: ApplyState,
    event: str,
    reason: str,
) -> int:
    """Rotate the held lease away as the last write of the fenced transaction (stop, hand back),
    so that the writes before it and the rotation commit together. Returns the new epoch; the
    handle's epoch is no longer current once this commits. The apply keeps its line's turn: a
    terminal state is :func:`finish`'s."""
    if ApplyState(to_state).terminal:
        raise FenceClosed(f"ending apply {fx.apply_id} as {to_state} is finish()'s job")
    return _rotate_away(fx, new_token=new_token, to_state=to_state, event=event, reason=reason)


@dataclass(frozen=True, slots=True)
class Finished:
    epoch: int  # the apply's last epoch
    successor: Promoted | None  # the next apply of its line, dispatched in the same transaction


def finish(
    fx: Fenced,
    *,
    new_token: str,
    successor_token: str,
    to_state: ApplyState,
    event: str,
    reason: str,
    error: str | None = None,
) -> Finished:
    """End the apply (completed, failed, cancelled) as the last write of its fenced transaction:
    rotate its lease away, fail its control requests still pending, and dispatch the next apply
    of its line with ``successor_token``, all committing together. Needs a fence opened with
    ``finishing=True``, which holds the line."""
    if not ApplyState(to_state).terminal:
        raise FenceClosed(f"finish() ends an apply; {to_state} is end_lease()'s")
    line = fx._line
    if line is None:
        raise FenceClosed(f"finishing apply {fx.apply_id} needs a fence with finishing=True")
    conn = fx._connection()
    epoch = _rotate_away(
        fx, new_token=new_token, to_state=to_state, event=event, reason=reason, error=error
    )
    return Finished(epoch, lines.promote(conn, line, successor_token))


def _rotate_away(
    fx: Fenced,
    *,
    new_token: str,
    to_state: ApplyState,
    event: str,
    reason: str,
    error: str | None = None,
) -> int:
    row = leasing.LeaseRow(fx.apply_id, ApplyState.RUNNING, fx.epoch, fx._token)
    epoch = leasing.rotate(
        fx._connection(),
        row,
        new_token=new_token,
        to_state=to_state,
        event=event,
        reason=reason,
        error=error,
    )
    # The handle's lease is gone: a write after the rotation would be stamped with the old epoch
    # after the rotation's log line (invariant 5). It raises FenceClosed, rolling the block back.
    fx._close()
    return epoch
