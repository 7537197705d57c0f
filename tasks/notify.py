"""Delivering completion notifications (``storage.notifications``): claim, send, record.

Right after the transaction that ended an apply, whoever ended it (its run, a cancel of an apply
nobody owns) delivers its notification; every reclaim pass delivers the rest (a send that failed
while the broker was down, a sender that died between its claim and its record). At least once,
keyed by ``apply_id``: a sender that dies after sending but before recording it sent leaves it to
be sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from storage import notifications
from storage.database import Database
from storage.notifications import Notice

log = logging.getLogger(__name__)

Send = Callable[[Notice], bool]


def deliver(db: Database, send: Send, apply_ids: Iterable[int] | None = None) -> int:
    """Deliver the notifications of ``apply_ids`` (default: every owed one). Returns how many
    were sent; one that another sender holds, or that is not due, is left alone."""
    ids = notifications.owed(db) if apply_ids is None else list(apply_ids)
    sent = 0
    for apply_id in ids:
        notice = notifications.claim(db, apply_id)
        if notice is None:
            continue
        if not send(notice):
            notifications.release(db, apply_id)
            continue
        notifications.mark_sent(db, apply_id)
        log.info(
            "apply %s: notified %s on %s (%s)", apply_id, notice.task, notice.queue, notice.state
        )
        sent += 1
    return sent
