"""Control requests (stop, resume, cancel, retry): durable, at most one pending per apply and
action.

Recording a request needs no lease. Completing one is an owned write (``storage.fenced``) when a
running owner acts on it, or part of the state compare-and-swap made by ``leases.control`` when
the apply has no owner (the connection-level ``_finish_unowned`` and ``_cancel_unfinished_tasks``,
private to ``storage`` and ``leases``). A retry is only ever settled that way (``_reopen_failed``):
a failed apply has no owner.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection

from storage import _leasing as leasing
from storage import _statements as statements
from storage.database import Database
from storage.errors import InvalidTransition, RowNotFound, StorageIntegrityError
from storage.states import ControlAction, ControlState, TaskState


@dataclass(frozen=True, slots=True)
class ControlRequest:
    id: int
    apply_id: int
    action: ControlAction
    state: ControlState = ControlState.PENDING
    error: str | None = None


def request(
    db: Database, apply_id: int, action: ControlAction, *, requested_by: str | None
) -> tuple[ControlRequest, bool]:
    """Record a pending request; returns (request, created). An identical pending request is
    returned instead of a second one (the unique index on pending requests decides races)."""
    action = ControlAction(action)
    for attempt in range(_INSERT_ATTEMPTS):
        try:
            for txn in db.attempts():
                with txn as conn:
                    leasing.read(conn, apply_id)  # ApplyNotFound, not a foreign-key error
                    result = conn.execute(
                        statements.insert_control_request(
                            apply_id, action=action, requested_by=requested_by
                        )
                    )
                    (request_id,) = result.inserted_primary_key or (0,)
        except StorageIntegrityError:
            for existing in pending(db, apply_id):
                if existing.action == action:
                    return existing, False
            # The request we collided with was settled before we could read it: it is no longer
            # pending, so ours is a new one (its settlement reads the apply as it is now).
            if attempt + 1 == _INSERT_ATTEMPTS:
                raise
            continue
        return ControlRequest(int(request_id), apply_id, action), True
    raise AssertionError("unreachable")  # the loop returns or raises


# Every attempt after the first means that another caller recorded and settled a request of
# this action in between: progress, so a bound this generous is never reached in practice.
_INSERT_ATTEMPTS = 10


def pending(db: Database, apply_id: int) -> list[ControlRequest]:
    with db.transaction() as conn:
        rows = conn.execute(statements.pending_control_requests(apply_id))
        return [ControlRequest(int(r.id), apply_id, ControlAction(r.action)) for r in rows]


def pending_in(conn: Connection, apply_ids: Iterable[int]) -> dict[int, list[ControlRequest]]:
    """The pending requests of many applies, by apply id, in the caller's transaction (a worker's
    batched heartbeat): one statement whatever their number."""
    ids = set(apply_ids)
    found: dict[int, list[ControlRequest]] = {}
    if not ids:
        return found
    for r in conn.execute(statements.pending_control_requests_of(ids)):
        found.setdefault(int(r.apply_id), []).append(
            ControlRequest(int(r.id), int(r.apply_id), ControlAction(r.action))
        )
    return found


def get(db: Database, request_id: int) -> ControlRequest:
    with db.transaction() as conn:
        return _current(conn, request_id)


def _current(conn: Connection, request_id: int) -> ControlRequest:
    """A request as it is now, in the caller's transaction (a racer may have settled it)."""
    row = conn.execute(statements.control_request_row(request_id)).one_or_none()
    if row is None:
        raise RowNotFound(f"no control request {request_id}")
    return ControlRequest(
        int(row.id),
        int(row.apply_id),
        ControlAction(row.action),
        ControlState(row.state),
        row.error,
    )


def _finish_unowned(
    conn: Connection,
    apply_id: int,
    request_id: int,
    *,
    state: ControlState,
    error: str | None = None,
) -> None:
    """Complete a request in the caller's transaction, which holds the apply row lock and has
    just settled the apply without an owner."""
    result = conn.execute(
        statements.finish_control_request(apply_id, request_id, state=state, error=error)
    )
    if result.rowcount != 1:
        raise RowNotFound(f"apply {apply_id} has no pending control request {request_id}")


def _cancel_unfinished_tasks(conn: Connection, apply_id: int, *, epoch: int) -> None:
    """Cancel the apply tasks of an apply that is being cancelled without an owner."""
    conn.execute(statements.cancel_unfinished_tasks(apply_id, epoch=epoch))


@dataclass(frozen=True, slots=True)
class Reopened:
    """What a retry found: the error it cleared and the apply tasks it put back to pending."""

    error: str | None
    reset: int  # apply tasks back to pending (the failed one first among them)
    kept: int  # completed apply tasks, untouched


def _failure(conn: Connection, apply_id: int) -> Reopened:
    """Before a retry, in its transaction (the apply row is locked): the apply's error and how its
    apply tasks stand, for the retry's log line."""
    error = conn.execute(statements.apply_failure(apply_id)).scalar_one_or_none()
    states = [row.state for row in conn.execute(statements.apply_task_rows(apply_id))]
    kept = states.count(TaskState.COMPLETED)
    return Reopened(error, len(states) - kept, kept)


def _reopen_failed(conn: Connection, apply_id: int, *, epoch: int) -> None:
    """Make a failed apply, just rotated to ``epoch`` and waiting in its line, unfinished again:
    its error and end time cleared, its unfinished apply tasks back to pending (with their
    checkpoints), its completed ones untouched. The caller holds the line and the apply row."""
    if conn.execute(statements.reopen_apply(apply_id, epoch=epoch)).rowcount != 1:
        state = str(conn.execute(statements.read_lease_row(apply_id)).one().state)
        raise InvalidTransition(apply_id, state, f"reopen it for a retry at epoch {epoch}")
    conn.execute(statements.reopen_tasks(apply_id, epoch=epoch))
