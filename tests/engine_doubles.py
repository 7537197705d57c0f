"""Test doubles for the DDL engines' tests (``tests/unit/test_engines.py``, the sleep engine;
``tests/contract/test_mysql_engine.py`` and ``test_target_outage.py``, the mysql engine on real
targets): a progress recorder, a log recorder, a task spec, and an engine run on a thread of its
own."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.errors import LeaseLost
from tasks.engines import Engine, EngineContext, TaskSpec


@dataclass
class Recorder:
    """An engine context's progress callback that records (percent, checkpoint)."""

    calls: list[tuple[int, dict[str, Any] | None]] = field(default_factory=list)
    raise_on_call: int | None = None  # raise LeaseLost on this call (0-based)

    def __call__(self, percent: int, checkpoint: Mapping[str, Any] | None = None) -> None:
        if self.raise_on_call is not None and len(self.calls) == self.raise_on_call:
            self.calls.append((percent, None))
            raise LeaseLost(1, 1, reason="test: rotated")
        self.calls.append((percent, None if checkpoint is None else dict(checkpoint)))

    @property
    def percents(self) -> list[int]:
        return [p for p, _ in self.calls]


@dataclass
class LogLines:
    """An engine context's ``log``: records (level, event, message), as the runner would write
    them to the apply's log."""

    lines: list[tuple[str, str, str]] = field(default_factory=list)

    def __call__(self, level: str, event: str, message: str) -> None:
        self.lines.append((level, event, message))

    @property
    def events(self) -> list[str]:
        return [event for _, event, _ in self.lines]


def spec(
    ddl: str = "ALTER TABLE t ADD COLUMN c INT",
    *,
    options: Mapping[str, Any] | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    database: str = "target",
    table: str = "t",
    task_id: int = 1,
) -> TaskSpec:
    return TaskSpec(
        id=task_id,
        position=0,
        table_name=table,
        ddl=ddl,
        options=options or {},
        database=database,
        checkpoint=checkpoint,
    )


class Running:
    """``engine.run`` in a thread, for cancelling it from the test."""

    def __init__(self, engine: Engine, task: TaskSpec, ctx: EngineContext) -> None:
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(engine, task, ctx), daemon=True)
        self._thread.start()

    def _run(self, engine: Engine, task: TaskSpec, ctx: EngineContext) -> None:
        try:
            engine.run(task, ctx)
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def join(self, timeout: float) -> BaseException | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the engine did not stop within {timeout}s"
        return self.error
