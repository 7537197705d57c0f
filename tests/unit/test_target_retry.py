"""The loop around one apply task on its target (``tasks/target_retry.py``), without a server:
an engine whose target is scripted (down for so many attempts, earlier statements running for
so many looks) and an injected clock. What the real servers do is proven in
``tests/contract/test_target_outage.py`` and ``tests/e2e/test_target_fence.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from storage.errors import LeaseLost
from tasks.backoff import Backoff
from tasks.engines import (
    Engine,
    EngineCancelled,
    EngineContext,
    EngineError,
    TargetStatement,
    TargetUnavailable,
    TaskSpec,
)
from tasks.engines.tags import Tag
from tasks.interrupts import Interrupts, Reason
from tasks.target_retry import run_task
from tests.celery_fixtures import FakeClock, wait_until
from tests.engine_doubles import LogLines, Recorder, spec

LOST = "Lost connection to server during query (MySQL error 2013)"
NO_WAIT = Backoff((0.0,))


@dataclass
class ScriptedTarget(Engine):
    """A target that is down for ``down`` attempts (each costing ``clock`` ``step`` seconds),
    then shows ``earlier`` for ``looks`` looks at its process list, then has the change once it
    was run (or from the start: ``applied``)."""

    clock: FakeClock
    down: int = 0
    step: float = 10.0
    earlier: list[TargetStatement] = field(default_factory=list)
    looks: int = 0
    applied: bool = False
    calls: list[str] = field(default_factory=list)
    killed: list[TargetStatement] = field(default_factory=list)
    name = "scripted"

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def _reach(self, call: str) -> None:
        self.calls.append(call)
        if self.down > 0:
            self.down -= 1
            self.clock.advance(self.step)
            raise TargetUnavailable("orders", LOST)

    def running_statements(self, task: TaskSpec, ctx: EngineContext) -> list[TargetStatement]:
        self._reach("running_statements")
        if self.looks > 0:
            self.looks -= 1
            return list(self.earlier)
        return []

    def already_applied(self, task: TaskSpec) -> bool:
        self._reach("already_applied")
        return self.applied

    def run(self, task: TaskSpec, ctx: EngineContext) -> None:
        self._reach("run")
        self.applied = True

    def kill_statement(self, task: TaskSpec, statement: TargetStatement) -> bool:
        self.killed.append(statement)
        return True


def _ctx(logs: LogLines, *, epoch: int = 5) -> EngineContext:
    return EngineContext(progress=Recorder(), apply_id=12, epoch=epoch, log=logs)


def test_an_outage_shorter_than_the_window_is_ridden_out() -> None:
    clock = FakeClock()
    target = ScriptedTarget(clock, down=3)
    logs = LogLines()
    task = spec(database="orders")
    skipped = run_task(
        target,
        task,
        _ctx(logs),
        window=300,
        interrupts=Interrupts(),
        backoff=NO_WAIT,
        monotonic=clock,
    )
    assert skipped is False
    assert target.applied
    # Every attempt starts over: the fence, then already_applied, then the DDL. (The outage is
    # timed from the first failure: 10 s, 20 s and 30 s on the clock.)
    assert target.calls[-3:] == ["running_statements", "already_applied", "run"]
    assert logs.events == ["target_waiting", "target_recovered"]
    assert logs.lines[0] == (
        "warning",
        "target_waiting",
        f"target 'orders' unavailable: {LOST}; retrying for up to 300 s",
    )
    assert logs.lines[1][2] == "target 'orders' reachable again after 20.0 s and 3 retries"


def test_a_change_made_before_the_outage_is_not_run_again() -> None:
    clock = FakeClock()
    target = ScriptedTarget(clock, down=1, applied=True)
    skipped = run_task(
        target,
        spec(database="orders"),
        _ctx(LogLines()),
        window=300,
        interrupts=Interrupts(),
        backoff=NO_WAIT,
        monotonic=clock,
    )
    assert skipped is True
    assert "run" not in target.calls


def test_an_outage_longer_than_the_window_fails_the_task_for_people() -> None:
    clock = FakeClock()
    target = ScriptedTarget(clock, down=1000)
    logs = LogLines()
    with pytest.raises(EngineError) as failed:
        run_task(
            target,
            spec(database="orders"),
            _ctx(logs),
            window=300,
            interrupts=Interrupts(),
            backoff=NO_WAIT,
            monotonic=clock,
        )
    assert str(failed.value) == f"target 'orders' unreachable for 300 s: {LOST}"
    assert not isinstance(failed.value, TargetUnavailable)  # final: nothing retries it
    assert len(target.calls) == 31  # at 0, 10, ..., 300 s: the last one at the window's end
    assert logs.events == ["target_waiting"]


def test_a_window_of_zero_fails_at_the_first_outage() -> None:
    clock = FakeClock()
    target = ScriptedTarget(clock, down=1)
    with pytest.raises(EngineError, match=r"^target 'orders' unreachable for 0 s: Lost"):
        run_task(
            target,
            spec(database="orders"),
            _ctx(LogLines()),
            window=0,
            interrupts=Interrupts(),
            backoff=NO_WAIT,
            monotonic=clock,
        )
    assert target.calls == ["running_statements"]


@pytest.mark.parametrize("reason", [Reason.STOP, Reason.CANCEL, Reason.HANDOVER, Reason.LEASE_LOST])
def test_the_wait_between_attempts_ends_at_once_when_interrupted(reason: Reason) -> None:
    """A real wait (a minute's backoff) ended by an interrupt from another thread."""
    target = ScriptedTarget(FakeClock(), down=1000, step=0.0)
    interrupts = Interrupts()
    logs = LogLines()
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            run_task(
                target,
                spec(database="orders"),
                _ctx(logs),
                window=3600,
                interrupts=interrupts,
                backoff=Backoff((60.0,)),
            )
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    wait_until(lambda: logs.events == ["target_waiting"], what="the first outage to be logged")
    asked = time.monotonic()
    if reason == Reason.LEASE_LOST:
        interrupts.lease_lost(LeaseLost(12, 5, reason="test: rotated"))
    else:
        interrupts.interrupt(reason)
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - asked < 5  # not the minute of backoff
    expected = LeaseLost if reason == Reason.LEASE_LOST else EngineCancelled
    assert isinstance(outcome[0], expected), outcome
    assert len(target.calls) == 1


def _earlier(epoch: int, connection: int = 81) -> TargetStatement:
    return TargetStatement(connection, Tag(12, 34, epoch), seconds=4.0, progress=40.0)


def test_earlier_statements_are_waited_for_then_the_change_is_checked() -> None:
    clock = FakeClock()
    target = ScriptedTarget(clock, earlier=[_earlier(4)], looks=3, applied=True)
    logs = LogLines()
    ctx = _ctx(logs)
    skipped = run_task(
        target,
        spec(database="orders"),
        ctx,
        window=300,
        interrupts=Interrupts(),
        poll=0.0,
        monotonic=clock,
    )
    assert skipped is True  # the predecessor made the change: it is not run again
    assert target.calls == ["running_statements"] * 4 + ["already_applied"]
    assert target.killed == []
    assert logs.events == ["target_waiting_earlier", "target_earlier_ended"]  # logged once
    assert "statement of epoch 4 (task 34, connection 81)" in logs.lines[0][2]
    assert isinstance(ctx.progress, Recorder)
    assert ctx.progress.percents == [40, 40, 40]  # its progress, reported as the task's


@pytest.mark.parametrize(
    ("reason", "kills"),
    [(Reason.STOP, True), (Reason.CANCEL, True), (Reason.HANDOVER, False)],
)
def test_stop_and_cancel_kill_what_they_waited_for(reason: Reason, kills: bool) -> None:
    earlier, later = _earlier(4, 81), _earlier(6, 82)
    target = ScriptedTarget(FakeClock(), earlier=[earlier, later], looks=1000)
    interrupts = Interrupts()
    interrupts.interrupt(reason)
    logs = LogLines()
    with pytest.raises(EngineCancelled):
        run_task(target, spec(database="orders"), _ctx(logs), window=300, interrupts=interrupts)
    # Never a later epoch's statement: that is a newer holder's, and this lease is on its way out.
    assert target.killed == ([earlier] if kills else [])
    assert ("target_earlier_killed" in logs.events) is kills


def test_a_lost_lease_kills_nothing_and_raises_lease_lost() -> None:
    target = ScriptedTarget(FakeClock(), earlier=[_earlier(4)], looks=1000)
    interrupts = Interrupts()
    interrupts.lease_lost(LeaseLost(12, 5, reason="test: rotated"))
    with pytest.raises(LeaseLost):
        run_task(
            target, spec(database="orders"), _ctx(LogLines()), window=300, interrupts=interrupts
        )
    assert target.killed == []


def test_an_interrupt_before_the_ddl_starts_nothing() -> None:
    target = ScriptedTarget(FakeClock())
    interrupts = Interrupts()
    interrupts.interrupt(Reason.STOP)
    with pytest.raises(EngineCancelled):
        run_task(
            target, spec(database="orders"), _ctx(LogLines()), window=300, interrupts=interrupts
        )
    assert "run" not in target.calls
