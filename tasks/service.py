"""The bodies of the public operations, shared by the Celery tasks and the CLI.

Each writes to the database first and rings the broker after commit: a lost message only delays
an apply, because reclaim re-dispatches it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import leases
from leases import Lease, dispatch_waiting, reclaim
from leases.control import settle_unowned
from storage import control
from storage.engine import Database
from storage.errors import InvalidInput
from storage.states import ControlAction
from tasks.payload import parse_submission
from tasks.settings import Settings

Send = Callable[[Lease], object]
MAX_REQUESTED_BY = 255


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
    db: Database, apply_id: object, action: object, requested_by: object, send: Send
) -> dict[str, Any]:
    """Record a control request and carry it out now if the apply has no owner."""
    apply_id = require_id(apply_id)
    if not isinstance(action, str) or action not in set(ControlAction):
        raise InvalidInput(f"action must be one of stop, resume, cancel; not {action!r}")
    if requested_by is not None and (
        not isinstance(requested_by, str) or len(requested_by) > MAX_REQUESTED_BY
    ):
        raise InvalidInput(f"requested_by must be a string of at most {MAX_REQUESTED_BY} chars")
    request, _ = control.request(db, apply_id, ControlAction(action), requested_by=requested_by)
    settled = settle_unowned(db, request)
    for lease in (settled.lease, settled.successor):
        if lease is not None:
            send(lease)
    return {
        "apply_id": apply_id,
        "action": str(action),
        "request_id": settled.request.id,
        "request_state": str(settled.request.state),
        "apply_state": str(settled.apply_state),
        "error": settled.request.error,
    }


def reclaim_stale(db: Database, settings: Settings, send: Send) -> int:
    """One reclaim pass; dispatches each reclaimed apply after its batch committed. Then the
    waiting head of every line that has one (after an apply failed as abandoned)."""
    reclaimed = reclaim(db, settings.reclaim_policy)
    for item in reclaimed:
        if item.lease is not None:
            send(item.lease)
    for lease in dispatch_waiting(db):
        send(lease)
    return len(reclaimed)


def require_id(value: object, name: str = "apply_id") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**63 - 1:
        raise InvalidInput(f"{name} must be a positive integer, not {value!r}")
    return value
