"""Control requests: made, read, listed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Insert, Select, insert, select

from storage import clock
from storage.tables import apply_logs, control_requests


def insert_control_request(apply_id: int, *, action: str, requested_by: str | None) -> Insert:
    return insert(control_requests).values(
        apply_id=apply_id,
        action=action,
        state="pending",
        requested_by=requested_by,
        created_at=clock.now(),
    )


def pending_control_requests(apply_id: int) -> Select[Any]:
    return (
        select(
            control_requests.c.id,
            control_requests.c.action,
            control_requests.c.requested_by,
            clock.age_of(control_requests.c.created_at).label("age"),
        )
        .where(control_requests.c.apply_id == apply_id, control_requests.c.state == "pending")
        .order_by(control_requests.c.id)
    )


def pending_control_requests_of(apply_ids: Iterable[int]) -> Select[Any]:
    """The pending control requests of many applies (a worker's batched heartbeat polls them)."""
    return (
        select(control_requests.c.id, control_requests.c.apply_id, control_requests.c.action)
        .where(
            control_requests.c.apply_id.in_(sorted(apply_ids)),
            control_requests.c.state == "pending",
        )
        .order_by(control_requests.c.id)
    )


def control_requests_of_apply(apply_id: int) -> Select[Any]:
    """Every control request of one apply, oldest first (a range of the unique index that leads
    with ``apply_id``)."""
    return (
        select(
            control_requests.c.id,
            control_requests.c.action,
            control_requests.c.state,
            control_requests.c.requested_by,
            control_requests.c.error,
        )
        .where(control_requests.c.apply_id == apply_id)
        .order_by(control_requests.c.id)
    )


def control_request_row(request_id: int) -> Select[Any]:
    return select(control_requests).where(control_requests.c.id == request_id)


def rotation_event(apply_id: int, epoch: int) -> Select[Any]:
    return (
        select(apply_logs.c.event)
        .where(apply_logs.c.apply_id == apply_id, apply_logs.c.lease_epoch == epoch)
        .order_by(apply_logs.c.id)
        .limit(1)
    )
