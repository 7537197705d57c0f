"""Settling control requests for applies that have no owner, by a CAS on their state.

A ``running`` apply has an owner: a stop or cancel stays pending and the owner acts on it at its
next safe point, completing it with a fenced write. If that owner is dead, reclaim hands the
apply to a new owner, which finds the request pending and acts on it. If the apply ends first,
the request fails in the transaction that ends it, saying so.

Everything else is settled here at once, under the apply's line lock (``storage._lines``): a stop
keeps the apply's place in its line (a stopped head holds the applies behind it back), a cancel
passes the turn on, and a resume dispatches the apply if it heads its line, else queues it.
"""

from __future__ import annotations

from dataclasses import dataclass

from leases.lease import Lease, mint_token
from storage import _leasing as leasing
from storage import _lines as lines
from storage import control
from storage.control import ControlRequest
from storage.database import Database
from storage.states import ApplyState, ControlAction, ControlState

_STOPPABLE = frozenset({ApplyState.PENDING, ApplyState.QUEUED, ApplyState.DISPATCHED})
_CANCELLABLE = _STOPPABLE | {ApplyState.STOPPED}
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
    successor: Lease | None = None  # after a cancel: the next apply of the line, to be sent


def settle_unowned(db: Database, request: ControlRequest) -> Settlement:
    """Carry out ``request`` now if the apply has no owner; otherwise leave it pending."""
    apply_id, action = request.apply_id, request.action
    with db.transaction() as conn:
        seen = leasing.read(conn, apply_id)
    if _owner_acts(ApplyState(seen.state), action):
        return Settlement(request, ApplyState(seen.state))  # no lock: nothing to change here
    token, successor_token = mint_token(), mint_token()
    with db.transaction() as conn:
        line = lines.of(conn, apply_id)
        lines.lock(conn, line)
        row = leasing.lock(conn, apply_id)
        state = ApplyState(row.state)
        if _owner_acts(state, action):  # redeemed meanwhile
            return Settlement(request, state)
        new_state: ApplyState | None = None
        error: str | None = None
        reason = f"{action} requested (control request {request.id})"
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
            first = lines.head(conn, line)
            if first is None or first.apply_id == apply_id:
                new_state = ApplyState.DISPATCHED
            else:
                new_state = ApplyState.QUEUED
                reason += f": queued behind apply {first.apply_id} ({first.state}) on {line}"
        else:
            error = f"apply is {state}, not stopped: nothing to resume"

        final = ControlState.FAILED if error else ControlState.COMPLETED
        # First: a rotation to a terminal state fails every request still pending.
        control._finish_unowned(conn, apply_id, request.id, state=final, error=error)
        lease = successor = None
        if new_state is not None:
            epoch = leasing.rotate(
                conn, row, new_token=token, to_state=new_state, event=_EVENTS[action], reason=reason
            )
            if new_state == ApplyState.CANCELLED:
                control._cancel_unfinished_tasks(conn, apply_id, epoch=epoch)
                promoted = lines.promote(conn, line, successor_token)
                if promoted is not None:
                    successor = Lease(promoted.apply_id, promoted.epoch, successor_token)
            if new_state == ApplyState.DISPATCHED:
                lease = Lease(apply_id, epoch, token)
            state = new_state
    settled = ControlRequest(request.id, apply_id, action, final, error)
    return Settlement(settled, state, lease, successor)


def _owner_acts(state: ApplyState, action: ControlAction) -> bool:
    """A running apply's owner acts on a stop or cancel. A resume of a running apply has nothing
    to do, and is failed here rather than left pending, as its owner never acts on one."""
    return state == ApplyState.RUNNING and action != ControlAction.RESUME
