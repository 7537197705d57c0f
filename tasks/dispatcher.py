"""Sending messages: ``run_apply`` to workers, and completion notifications to callers. The
broker is a doorbell, the database the truth."""

from __future__ import annotations

import logging

from leases import Lease, owe_dispatch
from storage.errors import StorageError
from storage.notifications import Notice
from tasks import runtime
from tasks.app import app

log = logging.getLogger(__name__)
RUN_APPLY = "leasehold.run_apply"


def send_run(lease: Lease) -> bool:
    """Send ``run_apply`` for a freshly rotated lease (after its transaction committed).

    A send that fails (the broker down or unreachable) is not raised: it is recorded as owed
    (``leases.owe_dispatch``) and every reclaim pass sends it again until one gets through, so
    the apply waits for the outage and one reclaim interval, not for the dispatch timeout. If
    even that record cannot be written, reclaim re-dispatches after the dispatch timeout. The
    lease is shown in task events and logs only as its repr (epoch and token prefix).
    """
    kwargs = {"apply_id": lease.apply_id, "lease": lease.to_json()}
    try:
        app.send_task(
            RUN_APPLY,
            kwargs=kwargs,
            kwargsrepr=repr({"apply_id": lease.apply_id, "lease": lease}),
        )
    except Exception as exc:  # whatever the transport raises: the database is the truth
        log.warning(
            "apply %s: could not send run_apply for epoch %s (%s: %s); the next reclaim pass "
            "sends it again",
            lease.apply_id,
            lease.epoch,
            type(exc).__name__,
            exc,
        )
        try:
            owe_dispatch(runtime.database(), lease)
        except StorageError as store_exc:
            log.warning(
                "apply %s: could not record the owed dispatch either (%s); reclaim re-dispatches "
                "it after the dispatch timeout",
                lease.apply_id,
                store_exc,
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
    except Exception as exc:  # whatever the transport raises: it stays owed
        log.warning(
            "apply %s: could not send its notification %s to %s (%s); will retry",
            notice.apply_id,
            notice.task,
            notice.queue,
            exc,
        )
        return False
    return True
