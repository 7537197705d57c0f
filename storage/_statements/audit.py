"""Audit: the read-only selects of ``leasehold audit`` (storage/audit.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, case, func, select

from storage.tables import (
    applies,
    apply_comments,
    apply_logs,
    apply_tasks,
    checks,
    control_requests,
)

# The log events that record an apply task completed (the runner's ``_complete_task``).
AUDIT_COMPLETION_EVENTS = ("task_completed", "task_skipped")


def audit_applies(*, after_id: int, limit: int) -> Select[Any]:
    """The next batch of applies in id order (keyset: no offset to skip over)."""
    return (
        select(applies.c.id, applies.c.state, applies.c.lease_epoch, applies.c.error)
        .where(applies.c.id > after_id)
        .order_by(applies.c.id)
        .limit(limit)
    )


def audit_one_apply(apply_id: int) -> Select[Any]:
    return select(applies.c.id, applies.c.state, applies.c.lease_epoch, applies.c.error).where(
        applies.c.id == apply_id
    )


def audit_logs(first_id: int, last_id: int) -> Select[Any]:
    """The log of a batch's applies in (apply, id) order: a range of ix_apply_logs_apply_id_id.
    Only completion lines need their message (it names the task): the others' are not read."""
    return (
        select(
            apply_logs.c.apply_id,
            apply_logs.c.id,
            apply_logs.c.lease_epoch,
            apply_logs.c.event,
            case(
                (apply_logs.c.event.in_(AUDIT_COMPLETION_EVENTS), apply_logs.c.message),
                else_=None,
            ).label("message"),
        )
        .where(apply_logs.c.apply_id.between(first_id, last_id))
        .order_by(apply_logs.c.apply_id, apply_logs.c.id)
    )


def audit_tasks(first_id: int, last_id: int) -> Select[Any]:
    return (
        select(
            apply_tasks.c.apply_id,
            apply_tasks.c.position,
            apply_tasks.c.table_name,
            apply_tasks.c.state,
            apply_tasks.c.lease_epoch,
        )
        .where(apply_tasks.c.apply_id.between(first_id, last_id))
        .order_by(apply_tasks.c.apply_id, apply_tasks.c.position)
    )


def audit_comments(first_id: int, last_id: int) -> Select[Any]:
    return select(
        apply_comments.c.apply_id, apply_comments.c.kind, apply_comments.c.last_epoch
    ).where(apply_comments.c.apply_id.between(first_id, last_id))


def audit_checks(first_id: int, last_id: int) -> Select[Any]:
    return select(
        checks.c.apply_id, checks.c.status, checks.c.conclusion, checks.c.last_epoch
    ).where(checks.c.apply_id.between(first_id, last_id))


def audit_anonymous_control_requests(first_id: int, last_id: int) -> Select[Any]:
    """The control requests of a batch's applies that record no requester (NULL, empty or only
    spaces): a range of the unique index that leads with ``apply_id``."""
    requester = func.trim(func.coalesce(control_requests.c.requested_by, ""))
    return (
        select(control_requests.c.apply_id, control_requests.c.id, control_requests.c.action)
        .where(control_requests.c.apply_id.between(first_id, last_id), requester == "")
        .order_by(control_requests.c.apply_id, control_requests.c.id)
    )
