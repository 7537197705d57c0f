"""Sending messages: ``run_apply`` to workers, and completion notifications to callers. The
broker is a doorbell, the database the truth."""

from __future__ import annotations

import logging

from kombu.exceptions import OperationalError

from leases import Lease
from storage.notifications import Notice
from tasks.app import app

log = logging.getLogger(__name__)
RUN_APPLY = "leasehold.run_apply"


def send_run(lease: Lease) -> bool:
    """Send ``run_apply`` for a freshly rotated lease (after its transaction committed).

    If the broker is unreachable the apply stays ``dispatched`` and reclaim re-dispatches it
    after the dispatch timeout, so a failed send is logged, not raised. The lease is shown in
    task events and logs only as its repr (epoch and token prefix), never whole.
    """
    kwargs = {"apply_id": lease.apply_id, "lease": lease.to_json()}
    try:
        app.send_task(
            RUN_APPLY,
            kwargs=kwargs,
            kwargsrepr=repr({"apply_id": lease.apply_id, "lease": lease}),
        )
    except OperationalError as exc:
        log.warning(
            "apply %s: could not send run_apply for epoch %s (%s); reclaim will re-dispatch",
            lease.apply_id,
            lease.epoch,
            exc,
        )
        return False
    return True


def send_notification(notice: Notice) -> bool:
    """Send the caller's task with the apply's final state, to the caller's queue. False (logged)
    if the broker cannot be reached: the notification stays owed and a reclaim pass retries it."""
    try:
        app.send_task(
            notice.task,
            kwargs={"apply_id": notice.apply_id, "state": notice.state, "error": notice.error},
            queue=notice.queue,
        )
    except OperationalError as exc:
        log.warning(
            "apply %s: could not send its notification %s to %s (%s); will retry",
            notice.apply_id,
            notice.task,
            notice.queue,
            exc,
        )
        return False
    return True
