"""Submission of applies, and the reads of applies, their tasks, logs and records."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Insert, Select, case, insert, select

from storage import clock
from storage._statements._common import _WAITING
from storage._statements.lines import _ahead_in_line
from storage.states import ApplyState
from storage.tables import applies, apply_comments, apply_logs, apply_tasks, checks


def insert_apply(values: Mapping[str, Any]) -> Insert:
    return insert(applies).values(
        state=ApplyState.QUEUED,
        lease_epoch=0,
        reclaim_count=0,
        created_at=clock.now(),
        updated_at=clock.now(),
        **values,
    )


def insert_apply_tasks(apply_id: int, rows: Iterable[Mapping[str, Any]]) -> Insert:
    return insert(apply_tasks).values(
        [
            {"apply_id": apply_id, "state": "pending", "progress": 0, "lease_epoch": 0, **row}
            for row in rows
        ]
    )


def apply_by_request_id(request_id: str) -> Select[Any]:
    return select(applies.c.id).where(applies.c.request_id == request_id)


def apply_row(apply_id: int) -> Select[Any]:
    return select(
        applies,
        clock.age_of(applies.c.heartbeat_at).label("heartbeat_age"),
    ).where(applies.c.id == apply_id)


def apply_task_rows(apply_id: int) -> Select[Any]:
    return (
        select(apply_tasks)
        .where(apply_tasks.c.apply_id == apply_id)
        .order_by(apply_tasks.c.position)
    )


def log_rows(apply_id: int, *, after_id: int = 0, limit: int = 1000) -> Select[Any]:
    return (
        select(apply_logs)
        .where(apply_logs.c.apply_id == apply_id, apply_logs.c.id > after_id)
        .order_by(apply_logs.c.id)
        .limit(limit)
    )


def lease_table(limit: int) -> Select[Any]:
    return (
        select(
            applies.c.id,
            applies.c.state,
            applies.c.database_name,
            applies.c.environment,
            case((applies.c.state.in_(_WAITING), _ahead_in_line(applies) + 1), else_=None).label(
                "line_position"
            ),
            applies.c.lease_epoch,
            applies.c.lease_owner,
            applies.c.lease_token,
            applies.c.reclaim_count,
            applies.c.requested_by,
            clock.age_of(applies.c.heartbeat_at).label("heartbeat_age"),
        )
        .order_by(applies.c.id.desc())
        .limit(limit)
    )


def active_applies(limit: int) -> Select[Any]:
    """Dispatched and running applies with their heartbeat age (DB clock), stalest first."""
    return (
        select(
            applies.c.id,
            applies.c.state,
            clock.age_of(applies.c.heartbeat_at).label("heartbeat_age"),
        )
        .where(applies.c.state.in_([ApplyState.DISPATCHED, ApplyState.RUNNING]))
        .order_by(applies.c.heartbeat_at)
        .limit(limit)
    )


def db_time() -> Select[Any]:
    return select(clock.now().label("now"))


def comment_row(apply_id: int, kind: str) -> Select[Any]:
    return select(apply_comments).where(
        apply_comments.c.apply_id == apply_id, apply_comments.c.kind == kind
    )


def check_row(apply_id: int) -> Select[Any]:
    return select(checks).where(checks.c.apply_id == apply_id)
