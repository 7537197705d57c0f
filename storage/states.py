"""The states of applies, apply tasks and control requests, as stored."""

from __future__ import annotations

from enum import StrEnum


class ApplyState(StrEnum):
    PENDING = "pending"
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


class ControlState(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"
