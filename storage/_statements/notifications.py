"""Notifications: completion for callers."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Insert, Select, Update, bindparam, insert, select

from storage import clock
from storage.tables import applies, notifications


def insert_notification(apply_id: int, *, task: str, queue: str) -> Insert:
    return insert(notifications).values(apply_id=apply_id, task=task, queue=queue, attempts=0)


def notification_due(apply_id: int) -> Update:
    """The apply ended: its notification is owed. Run by every rotation to a terminal state.

    The first end finds claimed_at and sent_at NULL. An end after a retry (which withdrew the
    notification: ``withdraw_notification``) owes a new one: a send of the earlier end that was
    still in flight at the retry may have recorded itself sent since, so both are cleared here."""
    return (
        notifications.update()
        .where(notifications.c.apply_id == apply_id, notifications.c.due_at.is_(None))
        .values(due_at=clock.now(), claimed_at=None, sent_at=None)
    )


def withdraw_notification(apply_id: int) -> Update:
    """A failed apply is retried: the notification of its failure is no longer owed (one not yet
    sent never is: the caller hears the retried apply's end instead), and the next rotation to a
    terminal state makes a new one due (``notification_due`` matches only while due_at is NULL).
    Zero rows: the submit asked for no notification."""
    return notifications.update().where(notifications.c.apply_id == apply_id).values(due_at=None)


def _claimable(expiry: float) -> ColumnElement[bool]:
    return (
        notifications.c.due_at.is_not(None)
        & notifications.c.sent_at.is_(None)
        & (
            notifications.c.claimed_at.is_(None)
            | (notifications.c.claimed_at < clock.now_minus(bindparam("expiry", expiry)))
        )
    )


def owed_notifications(*, expiry: float, limit: int) -> Select[Any]:
    """Notifications owed and free to claim (never claimed, or claimed over ``expiry`` ago)."""
    return (
        select(notifications.c.apply_id)
        .where(_claimable(expiry))
        .order_by(notifications.c.due_at)
        .limit(limit)
    )


def claim_notification(apply_id: int, *, expiry: float) -> Update:
    """Take an owed notification to send it; zero rows: sent, not due, or another sender's."""
    return (
        notifications.update()
        .where(notifications.c.apply_id == apply_id, _claimable(expiry))
        .values(claimed_at=clock.now(), attempts=notifications.c.attempts + 1)
    )


def notification_sent(apply_id: int) -> Update:
    return (
        notifications.update()
        .where(notifications.c.apply_id == apply_id, notifications.c.sent_at.is_(None))
        .values(sent_at=clock.now())
    )


def release_notification(apply_id: int) -> Update:
    """A send failed: free the claim at once, so that the next reclaim pass tries again."""
    return (
        notifications.update()
        .where(notifications.c.apply_id == apply_id, notifications.c.sent_at.is_(None))
        .values(claimed_at=None)
    )


def notification_message(apply_id: int) -> Select[Any]:
    """What a notification carries: where it goes, and the apply's final state."""
    return (
        select(
            notifications.c.task,
            notifications.c.queue,
            notifications.c.sent_at,
            applies.c.state,
            applies.c.error,
        )
        .join(applies, applies.c.id == notifications.c.apply_id)
        .where(notifications.c.apply_id == apply_id)
    )
