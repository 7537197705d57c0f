"""The states of applies, apply tasks and control requests, as stored."""

from __future__ import annotations

from enum import StrEnum


class ApplyState(StrEnum):
    PENDING = "pending"  # written by leasehold before 0.2 only; migrated to queued
    QUEUED = "queued"  # waiting for its turn on its (database, environment)
    DISPATCHED = "dispatched"
    RUNNING = "running"
    STOPPED = "stopped"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_APPLY_STATES


TERMINAL_APPLY_STATES = frozenset({ApplyState.COMPLETED, ApplyState.FAILED, ApplyState.CANCELLED})
# Every apply that is not finished is in its line, in id (submission) order. Only the head of a
# line may be dispatched or run; a waiting head is dispatched in the transaction that made it so.
IN_LINE_STATES = frozenset(ApplyState) - TERMINAL_APPLY_STATES
WAITING_STATES = frozenset({ApplyState.PENDING, ApplyState.QUEUED})


class TaskState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ControlAction(StrEnum):
    STOP = "stop"
    RESUME = "resume"
    CANCEL = "cancel"
    RETRY = "retry"  # a failed apply, from its failed task (``leases.control``)


class ControlState(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"
