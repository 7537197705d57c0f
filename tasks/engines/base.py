"""What an engine is: it runs one apply task, reports progress, honours cancellation, and can
tell whether a task is already applied, so that a resumed apply does not run it twice. An engine
that runs statements on a target also shows which of an apply's statements still run there, and
can kill one: the target-side fence (``tasks/target_retry.py``) waits for them."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from storage.errors import LeaseholdError
from tasks.engines.tags import Tag


class EngineError(LeaseholdError):
    """The apply task itself failed (bad DDL, a failing target): the apply fails."""


class TargetUnavailable(EngineError):
    """The target could not be reached: the connection was refused or lost, the server went
    away or is shutting down. Not the change's fault: retried for ``LEASEHOLD_TARGET_RETRY``
    before the apply fails. ``reason`` is written for people (no driver boilerplate)."""

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(f"target {target!r} unavailable: {reason}")
        self.target = target
        self.reason = reason


class EngineCancelled(LeaseholdError):
    """The engine stopped early because it was asked to (stop, cancel, handover, lease lost)."""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    id: int
    position: int
    table_name: str
    ddl: str
    options: Mapping[str, Any]
    database: str
    checkpoint: Mapping[str, Any] | None = None
    progress: int = 0


class Progress(Protocol):
    def __call__(self, percent: int, checkpoint: Mapping[str, Any] | None = None) -> None: ...


# (level, event, message): a line of the apply's log, written by the runner as an owned write.
EngineLog = Callable[[str, str, str], None]


def _no_log(level: str, event: str, message: str) -> None:
    """Outside a runner (tests, tools) nothing is logged."""


def _nothing_to_confirm() -> None:
    """Outside a runner there is no lease to confirm."""


@dataclass(slots=True)
class EngineContext:
    """Given to ``Engine.run``: where to report progress, the event that asks it to stop, and
    which apply and lease epoch it runs for (its statements are tagged with them on the target).

    ``log`` writes a line of the apply's log (fenced, like progress); ``confirm_lease`` proves
    the lease still current (a fence round-trip), called right before a statement is sent.
    ``apply_id`` 0 means no apply (tests, tools)."""

    progress: Progress
    cancelled: threading.Event = field(default_factory=threading.Event)
    apply_id: int = 0
    epoch: int = 0
    log: EngineLog = _no_log
    confirm_lease: Callable[[], None] = _nothing_to_confirm

    def raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise EngineCancelled("cancelled")

    def tag(self, task: TaskSpec) -> Tag:
        return Tag(apply_id=self.apply_id, task_id=task.id, epoch=self.epoch)


@dataclass(frozen=True, slots=True)
class TargetStatement:
    """A statement of an apply seen running on its target (its tag says whose)."""

    connection_id: int
    tag: Tag
    seconds: float  # running for, by the target's clock
    progress: float | None = None  # percent done, where the target reports it (MariaDB)
    query_id: int | None = None  # the target's id of this very statement, where it has one

    def describe(self) -> str:
        done = "" if self.progress is None else f", {self.progress:.0f}% done"
        return (
            f"statement of epoch {self.tag.epoch} (task {self.tag.task_id}, connection "
            f"{self.connection_id}) running for {self.seconds:.1f} s{done}"
        )


class Engine(ABC):
    name: str

    @classmethod
    @abstractmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check a submitted task's options; raise ``InvalidInput`` with a clear message."""

    @abstractmethod
    def already_applied(self, task: TaskSpec) -> bool:
        """True when the change is certainly in place already (False when unsure). Raises
        ``TargetUnavailable`` when the target cannot be reached."""

    @abstractmethod
    def run(self, task: TaskSpec, ctx: EngineContext) -> None:
        """Apply ``task``. Raise ``EngineCancelled`` promptly once ``ctx.cancelled`` is set,
        ``TargetUnavailable`` when the target cannot be reached and ``EngineError`` when the
        change fails. Exceptions from ``ctx.progress`` (``LeaseLost``) must propagate."""

    def running_statements(self, task: TaskSpec, ctx: EngineContext) -> list[TargetStatement]:
        """Statements of apply ``ctx.apply_id`` still running on ``task``'s target, whatever
        their epoch, not counting the caller's own connection. An engine without a target has
        none. Raises ``TargetUnavailable`` when the target cannot be reached."""
        return []

    def kill_statement(self, task: TaskSpec, statement: TargetStatement) -> bool:
        """Kill ``statement`` on ``task``'s target; False if that could not be done (the target
        unreachable). Never raises for an unreachable target: a kill is best effort."""
        return False
