"""What an engine is: it runs one apply task, reports progress, honours cancellation, and can
tell whether a task is already applied, so that a resumed apply does not run it twice."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from storage.errors import LeaseholdError


class EngineError(LeaseholdError):
    """The apply task itself failed (bad DDL, a failing target): the apply fails."""


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


@dataclass(slots=True)
class EngineContext:
    """Given to ``Engine.run``: where to report progress, and the event that asks it to stop."""

    progress: Progress
    cancelled: threading.Event = field(default_factory=threading.Event)

    def raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise EngineCancelled("cancelled")


class Engine(ABC):
    name: str

    @classmethod
    @abstractmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check a submitted task's options; raise ``InvalidInput`` with a clear message."""

    @abstractmethod
    def already_applied(self, task: TaskSpec) -> bool:
        """True when the change is certainly in place already (False when unsure)."""

    @abstractmethod
    def run(self, task: TaskSpec, ctx: EngineContext) -> None:
        """Apply ``task``. Raise ``EngineCancelled`` promptly once ``ctx.cancelled`` is set and
        ``EngineError`` when the change fails. Exceptions from ``ctx.progress`` (``LeaseLost``)
        must propagate."""
