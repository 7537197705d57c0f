"""Settling control requests for applies that have no owner, by a CAS on their state.

A ``running`` apply has an owner: the request stays pending and the owner acts on it at its next
safe point, completing it with a fenced write. If that owner is dead, reclaim hands the apply to
a new owner, which finds the request pending and acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from leases.lease import Lease, mint_token
from storage import control, leasing
from storage.control import ControlRequest
from storage.engine import Database
from storage.states import ApplyState, ControlAction, ControlState

_STOPPABLE = frozenset({ApplyState.PENDING, ApplyState.DISPATCHED})
_CANCELLABLE = frozenset({ApplyState.PENDING, ApplyState.DISPATCHED, ApplyState.STOPPED})
_EVENTS = {
    ControlAction.STOP: "stopped",
    ControlAction.CANCEL: "cancelled",
    ControlAction.RESUME: "resumed",
}


@dataclass(frozen=True, slots=True)
class Settlement:
    request: ControlRequest
    apply_state: ApplyState
    lease: Lease | None = None  # a resumed apply's new lease, to be sent to a worker


def settle_unowned(db: Database, request: ControlRequest) -> Settlement:
    """Carry out ``request`` now if the apply has no owner; otherwise leave it pending."""
    apply_id, action = request.apply_id, request.action
    token = mint_token()
    with db.transaction() as conn:
        row = leasing.lock(conn, apply_id)
        state = ApplyState(row.state)
        # The owner acts on a stop or cancel; a running apply has nothing to resume, and its
        # owner never acts on a resume, which would otherwise stay pending.
        if state == ApplyState.RUNNING and action != ControlAction.RESUME:
            return Settlement(request, state)
        new_state: ApplyState | None = None
        error: str | None = None
        if action == ControlAction.STOP:
            if state in _STOPPABLE:
                new_state = ApplyState.STOPPED
            elif state != ApplyState.STOPPED:
                error = f"apply is {state}: nothing to stop"
        elif action == ControlAction.CANCEL:
            if state in _CANCELLABLE:
                new_state = ApplyState.CANCELLED
            else:
                error = f"apply is {state}: nothing to cancel"
        elif state == ApplyState.STOPPED:  # resume
            new_state = ApplyState.DISPATCHED
        else:
            error = f"apply is {state}, not stopped: nothing to resume"

        lease: Lease | None = None
        if new_state is not None:
            epoch = leasing.rotate(
                conn,
                row,
                new_token=token,
                to_state=new_state,
                event=_EVENTS[action],
                reason=f"{action} requested (control request {request.id})",
            )
            if new_state == ApplyState.CANCELLED:
                control.cancel_unfinished_tasks(conn, apply_id, epoch=epoch)
            if new_state == ApplyState.DISPATCHED:
                lease = Lease(apply_id, epoch, token)
            state = new_state
        final = ControlState.FAILED if error else ControlState.COMPLETED
        control.finish_unowned(conn, apply_id, request.id, state=final, error=error)
    settled = ControlRequest(request.id, apply_id, action, final, error)
    return Settlement(settled, state, lease)
