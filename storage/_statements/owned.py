"""Owned writes, run inside a fence: the apply's state, its apply tasks' lifecycle, its log, the
records of its effects, and the ending of its control requests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Insert, String, Update, func, insert, literal

from storage import clock
from storage._statements._common import Upsert, _upsert
from storage.states import ApplyState
from storage.tables import (
    applies,
    apply_comments,
    apply_logs,
    apply_tasks,
    checks,
    control_requests,
)

# --- owned writes (run inside a fence) -----------------------------------------------------------


def set_apply_state(apply_id: int, *, state: str, error: str | None) -> Update:
    values: dict[str, Any] = {"state": state, "error": error, "updated_at": clock.now()}
    if ApplyState(state).terminal:
        values["finished_at"] = clock.now()
    return applies.update().where(applies.c.id == apply_id).values(**values)


def update_task(apply_id: int, task_id: int, *, epoch: int, values: Mapping[str, Any]) -> Update:
    return (
        apply_tasks.update()
        .where(apply_tasks.c.id == task_id, apply_tasks.c.apply_id == apply_id)
        .values(lease_epoch=epoch, **values)
    )


def append_log(apply_id: int, *, epoch: int, level: str, event: str, message: str) -> Insert:
    return insert(apply_logs).values(
        apply_id=apply_id,
        lease_epoch=epoch,
        level=level,
        event=event,
        message=message,
        created_at=clock.now(),
    )


def record_comment(
    apply_id: int, *, kind: str, epoch: int, github_comment_id: int, body_sha256: str
) -> Upsert:
    """A comment created or edited: its id, digest and epoch; edits counted."""
    return _upsert(
        apply_comments,
        {"apply_id": apply_id, "kind": kind},
        {
            "github_comment_id": github_comment_id,
            "last_epoch": epoch,
            "body_sha256": body_sha256,
            "updated_at": clock.now(),
        },
        on_update={"edit_count": apply_comments.c.edit_count + 1},
        on_insert={"edit_count": 0},
    )


def record_check(
    apply_id: int, *, epoch: int, check_run_id: int, status: str, conclusion: str | None
) -> Upsert:
    """A check run created or updated: its id, status, conclusion and epoch."""
    return _upsert(
        checks,
        {"apply_id": apply_id},
        {
            "github_check_run_id": check_run_id,
            "status": status,
            "conclusion": conclusion,
            "last_epoch": epoch,
            "updated_at": clock.now(),
        },
        on_update={},
        on_insert={},
    )


def fail_pending_control_requests(apply_id: int, *, apply_state: str) -> Update:
    """Every request still pending when its apply ends fails, saying so: "apply completed before
    the stop took effect". Run by every rotation to a terminal state, in its transaction."""
    reason: ColumnElement[Any] = (
        literal(f"apply {apply_state} before the ", String)
        + control_requests.c.action
        + literal(" took effect", String)
    )
    return (
        control_requests.update()
        .where(control_requests.c.apply_id == apply_id, control_requests.c.state == "pending")
        .values(state="failed", error=reason, completed_at=clock.now())
    )


def finish_control_request(
    apply_id: int, request_id: int, *, state: str, error: str | None
) -> Update:
    return (
        control_requests.update()
        .where(
            control_requests.c.id == request_id,
            control_requests.c.apply_id == apply_id,
            control_requests.c.state == "pending",
        )
        .values(state=state, error=error, completed_at=clock.now())
    )


# --- apply task lifecycle (owned, run inside a fence) ---------------------------------------------


def start_task(apply_id: int, task_id: int, *, epoch: int) -> Update:
    """Mark an apply task running; the first start time is kept across resumes."""
    return (
        apply_tasks.update()
        .where(apply_tasks.c.id == task_id, apply_tasks.c.apply_id == apply_id)
        .values(
            state="running",
            lease_epoch=epoch,
            started_at=func.coalesce(apply_tasks.c.started_at, clock.now()),
            error=None,
        )
    )


def finish_task(
    apply_id: int,
    task_id: int,
    *,
    epoch: int,
    state: str,
    error: str | None,
    checkpoint: Mapping[str, Any] | None = None,
) -> Update:
    """``checkpoint``: the task's last one, written in the same statement (None: left as it is)."""
    values: dict[str, Any] = {
        "state": state,
        "lease_epoch": epoch,
        "error": error,
        "finished_at": clock.now(),
    }
    if state == "completed":
        values["progress"] = 100
    if checkpoint is not None:
        values["checkpoint"] = checkpoint
    return (
        apply_tasks.update()
        .where(apply_tasks.c.id == task_id, apply_tasks.c.apply_id == apply_id)
        .values(**values)
    )


def cancel_unfinished_tasks(apply_id: int, *, epoch: int) -> Update:
    return (
        apply_tasks.update()
        .where(apply_tasks.c.apply_id == apply_id, apply_tasks.c.state.in_(["pending", "running"]))
        .values(state="cancelled", lease_epoch=epoch, finished_at=clock.now())
    )
