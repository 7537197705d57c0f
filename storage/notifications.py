"""Completion notifications: the task a caller asked to be sent when its apply ends (an outbox).

Recorded with the apply at submit; made *due* in the transaction that ends the apply (every
rotation to a terminal state, ``storage._leasing.rotate``); then delivered at least once: a
sender *claims* it (a compare-and-swap), sends it once that claim committed, and records it
*sent*. A sender that dies between the claim and the record leaves a claim that expires, and the
next reclaim pass sends it again; a send that fails frees its claim at once. A notification
recorded as sent is never sent again.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, RowMapping

from storage import _statements as statements
from storage.database import Database

# How long a claim keeps other senders away: far longer than one send to a broker takes.
CLAIM_EXPIRY = 60.0


@dataclass(frozen=True, slots=True)
class Notify:
    """Where a caller wants to hear that its apply ended: a task name and a queue of its own."""

    task: str
    queue: str


@dataclass(frozen=True, slots=True)
class Notice:
    """A claimed notification: send ``task`` to ``queue`` with the apply's final state."""

    apply_id: int
    task: str
    queue: str
    state: str
    error: str | None


def _record(conn: Connection, apply_id: int, notify: Notify) -> None:
    """At submit, in the transaction that inserts the apply."""
    conn.execute(statements.insert_notification(apply_id, task=notify.task, queue=notify.queue))


def owed(db: Database, *, expiry: float = CLAIM_EXPIRY, limit: int = 100) -> list[int]:
    """Applies whose notification is due, unsent and free to claim, oldest first."""
    with db.transaction() as conn:
        rows = conn.execute(statements.owed_notifications(expiry=expiry, limit=limit))
        return [int(r.apply_id) for r in rows]


def claim(db: Database, apply_id: int, *, expiry: float = CLAIM_EXPIRY) -> Notice | None:
    """Claim the apply's notification to send it; None if it is not due, already sent, or
    another sender's (until its claim expires)."""
    with db.transaction() as conn:
        claimed = conn.execute(statements.claim_notification(apply_id, expiry=expiry))
        if claimed.rowcount != 1:
            return None
        row = conn.execute(statements.notification_message(apply_id)).one()
    return Notice(apply_id, row.task, row.queue, row.state, row.error)


def mark_sent(db: Database, apply_id: int) -> None:
    with db.transaction() as conn:
        conn.execute(statements.notification_sent(apply_id))


def release(db: Database, apply_id: int) -> None:
    with db.transaction() as conn:
        conn.execute(statements.release_notification(apply_id))


def get(db: Database, apply_id: int) -> RowMapping | None:
    """The apply's notification (task, queue, sent_at, state, error), or None if none was asked."""
    with db.transaction() as conn:
        return conn.execute(statements.notification_message(apply_id)).mappings().one_or_none()


def _withdraw(conn: Connection, apply_id: int) -> None:
    """A failed apply is retried, in the caller's transaction: the notification of its failure is
    no longer owed (if still unsent, it never will be) and the retried apply's end makes a new one
    due (``_statements.notification_due``), so the caller hears how the retry ended."""
    conn.execute(statements.withdraw_notification(apply_id))
