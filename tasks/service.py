"""The bodies of the public operations, shared by the Celery tasks and the CLI.

Each writes to the database first and rings the broker after commit: a lost message only delays
an apply, because reclaim re-dispatches it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import leases
from leases import Lease, dispatch_waiting, reclaim
from leases.control import check_retryable, refused_retry, settle_unowned
from storage import applies, control, marks, notifications
from storage.database import Database
from storage.errors import InvalidInput
from storage.states import ApplyState, ControlAction, ControlState
from tasks import notify as notifier
from tasks.github.owed import publish_owed
from tasks.payload import MAX_REQUESTED_BY, parse_submission
from tasks.payload import requested_by as checked_requester
from tasks.settings import Settings

Send = Callable[[Lease], object]


def submit(db: Database, settings: Settings, payload: Mapping[str, Any], send: Send) -> int:
    """Validate, insert the apply and its tasks in one transaction that also dispatches it if its
    line (database, environment) is free; else it waits there, ``queued``. Then ring the broker.

    A repeated ``request_id`` returns the same apply and sends nothing.
    """
    new = parse_submission(payload, targets=settings.targets)
    submitted = leases.submit(db, new)
    if submitted.lease is not None:
        send(submitted.lease)
    return submitted.apply_id


def control_apply(
    db: Database,
    apply_id: object,
    action: object,
    requested_by: object,
    send: Send,
    notify: notifier.Send | None = None,
) -> dict[str, Any]:
    """Record a control request and carry it out now if the apply has no owner. A cancel that
    ends the apply delivers its completion notification with ``notify`` (without one, the next
    reclaim pass does). A retry of an apply that has not failed raises ``InvalidTransition``:
    before recording anything, or, if it lost a race, once its request ended failed."""
    apply_id = require_id(apply_id)
    if not isinstance(action, str) or action not in set(ControlAction):
        raise InvalidInput(f"action must be one of {', '.join(ControlAction)}; not {action!r}")
    requested_by = _claimed(requested_by)
    if action == ControlAction.RETRY:
        check_retryable(db, apply_id)  # refused before anything is written
    request, _ = control.request(db, apply_id, ControlAction(action), requested_by=requested_by)
    settled = settle_unowned(db, request)
    if action == ControlAction.RETRY and settled.request.state == ControlState.FAILED:
        raise refused_retry(settled)
    for lease in (settled.lease, settled.successor):
        if lease is not None:
            send(lease)
    if notify is not None and settled.apply_state.terminal:
        notifier.deliver(db, notify, [apply_id])
    return {
        "apply_id": apply_id,
        "action": str(action),
        "request_id": settled.request.id,
        "request_state": str(settled.request.state),
        "apply_state": str(settled.apply_state),
        "error": settled.request.error,
    }


def requester(claimed: object, signer: str | None) -> str | None:
    """Who asked, for the record: what the caller claims (``requested_by``, free text) composed
    with who signed the message, when a signature names someone. The signer is what was proved,
    so it leads, and the claim is kept after it as what was said: ``"CN=deploy (as alice)"``,
    cut to the column's 255 characters. Either alone is itself; neither is None."""
    claimed = _claimed(claimed)
    if claimed is None:
        return signer
    if signer is None:
        return claimed
    return f"{signer} (as {claimed})"[:MAX_REQUESTED_BY]


def _claimed(value: object) -> str | None:
    """A caller's ``requested_by``, held to the submit payload's rule (printable text that fits
    its column): a control request's requester is shown on the same terminals and pages."""
    return checked_requester(value)


def reclaim_stale(
    db: Database, settings: Settings, send: Send, notify: notifier.Send | None = None
) -> int:
    """One reclaim pass; dispatches each reclaimed apply after its batch committed. Then the
    waiting head of every line that has one (after an apply failed as abandoned), every
    ``run_apply`` whose send failed (the broker was down), and every completion notification
    still owed. Records the pass (``leasehold doctor`` reads its age); then publishes what pull
    requests are still owed (``tasks.github.owed``)."""
    reclaimed = reclaim(db, settings.reclaim_policy)
    for item in reclaimed:
        if item.lease is not None:
            send(item.lease)
    for lease in dispatch_waiting(db):
        send(lease)
    for lease in leases.owed_dispatches(db):
        if send(lease):
            leases.dispatch_sent(db, lease)
    if notify is not None:
        notifier.deliver(db, notify)
    marks.touch(db, marks.RECLAIM_PASS, detail=f"{len(reclaimed)} rotated")
    # Last, and bounded: a GitHub outage costs a pass at most one call's timeout here.
    publish_owed(db, settings)
    return len(reclaimed)


def get_apply(db: Database, apply_id: object) -> dict[str, Any]:
    """An apply as callers see it (JSON): its state, lease epoch, who asked for it, place in line
    while it waits, each apply task's progress, and its completion notification. Reads only."""
    apply_id = require_id(apply_id)
    row = applies.get(db, apply_id)
    state = ApplyState(row["state"])
    place = None if state.terminal else applies.place(db, apply_id)
    notice = notifications.get(db, apply_id)
    age = row["heartbeat_age"]
    return {
        "apply_id": apply_id,
        "state": str(state),
        "error": row["error"],
        "epoch": int(row["lease_epoch"]),
        "reclaim_count": int(row["reclaim_count"]),
        "database": row["database_name"],
        "environment": row["environment"],
        "requested_by": row["requested_by"],
        "position": None if place is None else place.position,
        "waiting_behind": None if place is None else place.head.apply_id,
        "heartbeat_age": None if age is None or state.terminal else round(float(age), 3),
        "tasks": [
            {"table": t["table_name"], "state": t["state"], "progress": int(t["progress"])}
            for t in applies.tasks(db, apply_id)
        ],
        "notification": None
        if notice is None
        else {"task": notice.task, "queue": notice.queue, "sent": notice.sent_at is not None},
    }


def require_id(value: object, name: str = "apply_id") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**63 - 1:
        raise InvalidInput(f"{name} must be a positive integer, not {value!r}")
    return value
