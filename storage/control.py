"""Control requests (stop, resume, cancel): durable, at most one pending per apply and action.

Recording a request needs no lease. Completing one is an owned write (``storage.fenced``) when a
running owner acts on it, or part of the state compare-and-swap made by ``leases.control`` when
the apply has no owner (the connection-level ``_finish_unowned`` and ``_cancel_unfinished_tasks``,
private to ``storage`` and ``leases``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from storage import _leasing as leasing
from storage import _statements as statements
from storage.database import Database
from storage.errors import RowNotFound, StorageIntegrityError
from storage.states import ControlAction, ControlState


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
    try:
        with db.transaction() as conn:
            leasing.read(conn, apply_id)  # ApplyNotFound rather than a foreign-key error
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
        raise
    return ControlRequest(int(request_id), apply_id, action), True


def pending(db: Database, apply_id: int) -> list[ControlRequest]:
    with db.transaction() as conn:
        rows = conn.execute(statements.pending_control_requests(apply_id))
        return [ControlRequest(int(r.id), apply_id, ControlAction(r.action)) for r in rows]


def get(db: Database, request_id: int) -> ControlRequest:
    with db.transaction() as conn:
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
