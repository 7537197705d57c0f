"""Settling control requests for applies that have no owner, by a CAS on their state.

A ``running`` apply has an owner: a stop or cancel stays pending and the owner acts on it at its
next safe point, completing it with a fenced write. If that owner is dead, reclaim hands the
apply to a new owner, which finds the request pending and acts on it. If the apply ends first,
the request fails in the transaction that ends it, saying so.

Everything else is settled here at once, under the apply's line lock (``storage._lines``): a stop
keeps the apply's place in its line (a stopped head holds the applies behind it back), a cancel
passes the turn on, and a resume dispatches the apply if it heads its line, else queues it.

A retry takes a ``failed`` apply (nobody owns one) back into its line: its unfinished apply tasks
go back to pending, its completed ones stay done, its error is cleared (and kept in its log), its
completion notification is withdrawn until it ends again, and it is dispatched if it heads its
line, else it waits ``queued``. It re-enters with its old id: it waits behind the apply at work
on its database (dispatched or running), and otherwise takes its submission place, ahead of the
applies submitted after it, a stopped one included (``storage._statements.line_head``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from leases.lease import Lease, mint_token
from storage import _leasing as leasing
from storage import _lines as lines
from storage import control, notifications
from storage._leasing import LeaseRow
from storage._lines import Line
from storage.control import ControlRequest
from storage.database import Database
from storage.errors import InvalidTransition
from storage.states import ApplyState, ControlAction, ControlState

_STOPPABLE = frozenset({ApplyState.PENDING, ApplyState.QUEUED, ApplyState.DISPATCHED})
_CANCELLABLE = _STOPPABLE | {ApplyState.STOPPED}
_EVENTS = {
    ControlAction.STOP: "stopped",
    ControlAction.CANCEL: "cancelled",
    ControlAction.RESUME: "resumed",
    ControlAction.RETRY: "retried",
}
# Actions that a running apply's owner never acts on: they are settled (or refused) at once.
_NEVER_THE_OWNERS = frozenset({ControlAction.RESUME, ControlAction.RETRY})


@dataclass(frozen=True, slots=True)
class Settlement:
    request: ControlRequest
    apply_state: ApplyState
    lease: Lease | None = None  # a resumed or retried apply's new lease, to be sent to a worker
    # After a cancel, or a retry that found its line's waiting head undispatched: the apply of the
    # line dispatched in the same transaction, to be sent.
    successor: Lease | None = None


def settle_unowned(db: Database, request: ControlRequest) -> Settlement:
    """Carry out ``request`` now if the apply has no owner; otherwise leave it pending.

    A request that a racer settled meanwhile (two callers with the same pending request) is
    returned as that racer settled it, and nothing changes.
    """
    apply_id, action = request.apply_id, request.action
    with db.transaction() as conn:
        seen = leasing.read(conn, apply_id)
        line = lines.of(conn, apply_id)  # an apply never changes its line
    if _owner_acts(ApplyState(seen.state), action):
        return Settlement(request, ApplyState(seen.state))  # no lock: nothing to change here
    token, successor_token = mint_token(), mint_token()
    for txn in db.attempts():
        with txn as conn:
            # Locks first: under InnoDB's REPEATABLE READ the first plain read fixes the snapshot
            # that every later one (the request, the line's head) reads, so none may come before
            # the locks. (PostgreSQL's is fixed by the first statement: a lock that waited for a
            # change fails to serialize, and attempts() runs this again.)
            lines.lock(conn, line)
            row = leasing.lock(conn, apply_id)
            state = ApplyState(row.state)
            if _owner_acts(state, action):  # redeemed meanwhile
                return Settlement(request, state)
            current = control._current(conn, request.id)
            if current.state != ControlState.PENDING:
                return Settlement(current, state)  # a duplicate's racer settled it: a no-op
            if action == ControlAction.RETRY:
                return _retry(conn, request, row, line, token, successor_token)
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
                    conn,
                    row,
                    new_token=token,
                    to_state=new_state,
                    event=_EVENTS[action],
                    reason=reason,
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
    """A running apply's owner acts on a stop or cancel. A resume or retry of a running apply has
    nothing to do, and is failed here rather than left pending, as its owner never acts on one."""
    return state == ApplyState.RUNNING and action not in _NEVER_THE_OWNERS


# --- retry ---------------------------------------------------------------------------------------


def check_retryable(db: Database, apply_id: int) -> None:
    """Refuse a retry of an apply that has not failed before anything is recorded (an unlocked
    read: ``settle_unowned`` decides again under the locks). ``ApplyNotFound`` for an unknown id."""
    with db.transaction() as conn:
        state = ApplyState(leasing.read(conn, apply_id).state)
    if state != ApplyState.FAILED:
        raise retry_refused(apply_id, state)


def retry_refused(apply_id: int, state: ApplyState) -> InvalidTransition:
    """Why an apply in ``state`` cannot be retried, and what to do instead."""
    if state == ApplyState.STOPPED:
        instead = f"resume a stopped one instead (leasehold resume {apply_id})"
    elif state == ApplyState.COMPLETED:
        instead = "a completed one is done: submit a new apply for another change"
    elif state == ApplyState.CANCELLED:
        instead = "a cancelled one is final: submit it again"
    else:
        instead = "this one has not failed: wait for it to end, or stop or cancel it"
    return InvalidTransition(
        apply_id, state, f"retry: only a failed apply can be retried; {instead}"
    )


def refused_retry(settled: Settlement) -> InvalidTransition:
    """The error for a retry whose request ended failed: the apply was not failed under the locks
    (another retry, a cancel or a reclaim got there first), or it ended again, failing the request
    still pending, before the retry took effect."""
    request, state = settled.request, settled.apply_state
    if state != ApplyState.FAILED:
        return retry_refused(request.apply_id, state)
    return InvalidTransition(
        request.apply_id, state, f"retry: {request.error}; ask again to retry it now"
    )


def _retry(
    conn: Connection,
    request: ControlRequest,
    row: LeaseRow,
    line: Line,
    token: str,
    turn_token: str,
) -> Settlement:
    """Settle a retry in the caller's transaction, which holds ``line`` and the apply row."""
    apply_id, state = request.apply_id, ApplyState(row.state)
    if state != ApplyState.FAILED:  # another retry, a cancel or a reclaim got here first
        error = str(retry_refused(apply_id, state))
        control._finish_unowned(conn, apply_id, request.id, state=ControlState.FAILED, error=error)
        failed = ControlRequest(request.id, apply_id, request.action, ControlState.FAILED, error)
        return Settlement(failed, state)
    found = control._failure(conn, apply_id)
    control._finish_unowned(conn, apply_id, request.id, state=ControlState.COMPLETED)
    reason = (
        f"retry requested (control request {request.id}): {found.reset} unfinished apply "
        f"task(s) back to pending, {found.kept} completed kept; it had failed: "
        f"{found.error or '(no error recorded)'}"
    )
    # A CAS out of ``failed`` at the epoch locked above; it and everything below commit together.
    epoch = leasing.rotate(
        conn, row, new_token=token, to_state=ApplyState.QUEUED, event="retried", reason=reason
    )
    control._reopen_failed(conn, apply_id, epoch=epoch)
    notifications._withdraw(conn, apply_id)
    # Back in its line: dispatched now if it heads it, as every waiting head is.
    promoted = lines.promote(conn, line, turn_token)
    turn = None if promoted is None else Lease(promoted.apply_id, promoted.epoch, turn_token)
    done = ControlRequest(request.id, apply_id, request.action, ControlState.COMPLETED)
    if turn is not None and turn.apply_id == apply_id:
        return Settlement(done, ApplyState.DISPATCHED, lease=turn)
    _log_place(conn, line, apply_id, epoch)
    return Settlement(done, ApplyState.QUEUED, successor=turn)


def _log_place(conn: Connection, line: Line, apply_id: int, epoch: int) -> None:
    """Say in the log where a retried apply waits, and behind which apply."""
    where = lines.place(conn, line, apply_id)
    if where is None or where.position == 1:
        return
    leasing.append_log(
        conn,
        apply_id,
        epoch=epoch,
        level="info",
        event="queued",
        message=f"epoch {epoch}: queued on {line}: #{where.position} in line, behind apply "
        f"{where.head.apply_id} ({where.head.state}); it is dispatched when its turn comes",
    )
