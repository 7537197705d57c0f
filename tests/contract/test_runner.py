"""``ApplyRunner`` with the sleep engine on real databases: completion, failure, stop and resume
from the checkpoint, cancel, handover, a rotation by another party mid-run (nothing more is
written) and transient storage failures (retried)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from leases import Lease, fence, redeem
from storage import applies, control
from storage.database import Database
from storage.errors import LeaseLost
from storage.states import ApplyState, ControlAction, ControlState
from tasks import service
from tasks.engines import Engine, EngineContext, TaskSpec
from tasks.engines.sleep import SleepEngine
from tasks.heartbeat import Heartbeat
from tasks.interrupts import Interrupts, Reason
from tasks.runner import ApplyRunner, Outcome
from tests import support
from tests.celery_fixtures import (
    FakeClock,
    RecordingReporter,
    Report,
    SentLeases,
    run_lease,
    sleep_apply,
    task_rows,
    unreachable,
    wait_until,
)
from tests.support import hand_back


class RecordingEngine(Engine):
    """The real sleep engine, recording what it was asked to run and the first progress it
    reported for each apply task (to see where a resumed task started)."""

    name = "sleep"

    def __init__(self) -> None:
        self.inner = SleepEngine()
        self.specs: list[TaskSpec] = []
        self.first_percent: dict[int, int] = {}

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        return SleepEngine.validate_options(options)

    def already_applied(self, task: TaskSpec) -> bool:
        return self.inner.already_applied(task)

    def run(self, task: TaskSpec, ctx: EngineContext) -> None:
        self.specs.append(task)

        def progress(percent: int, checkpoint: Mapping[str, Any] | None = None) -> None:
            self.first_percent.setdefault(task.id, percent)
            ctx.progress(percent, checkpoint)

        self.inner.run(task, EngineContext(progress=progress, cancelled=ctx.cancelled))


def _runner(
    db: Database,
    lease: Lease,
    *,
    interrupts: Interrupts | None = None,
    reporter: RecordingReporter | None = None,
    engine: Engine | None = None,
    **kwargs: Any,
) -> ApplyRunner:
    kwargs.setdefault("progress_interval", 0.0)
    return ApplyRunner(
        db,
        lease,
        engine or SleepEngine(),
        interrupts or Interrupts(),
        reporter or RecordingReporter(),
        **kwargs,
    )


class Background:
    """Run a callable in a thread; ``result`` re-raises what it raised."""

    def __init__(self, fn: Callable[[], Outcome]) -> None:
        self._value: Outcome | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Outcome]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc

    def result(self, timeout: float = 20.0) -> Outcome:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the runner did not finish"
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def _mid_task(index: int, percent: int = 1) -> Callable[[Report], bool]:
    return lambda r: r.index == index and percent <= r.percent < 100


def _once(when: Callable[[Report], bool], action: Callable[[], None]) -> Callable[[Report], None]:
    """A reporter hook that runs ``action`` the first time ``when`` holds (in the runner's
    thread, between an engine step's checkpoint write and its next step)."""
    done = threading.Event()

    def hook(report: Report) -> None:
        if not done.is_set() and when(report):
            done.set()
            action()

    return hook


def _events(db: Database, apply_id: int) -> list[tuple[int, str]]:
    return support.log_events(db, apply_id)


def _assert_epochs_non_decreasing(db: Database, apply_id: int) -> None:
    epochs = [epoch for epoch, _ in _events(db, apply_id)]
    assert epochs == sorted(epochs), epochs


def test_completes_every_task_in_order(db: Database) -> None:
    apply_id = sleep_apply(db, (0.05, 0.05, 0.05))
    lease = run_lease(db, apply_id)
    reporter = RecordingReporter()
    outcome = _runner(db, lease, reporter=reporter).run()

    assert outcome == Outcome(ApplyState.COMPLETED)
    row = applies.get(db, apply_id)
    assert row["state"] == ApplyState.COMPLETED
    assert row["lease_epoch"] == lease.epoch + 1  # the terminal write rotated the lease away
    assert row["lease_token"] != lease.token
    assert row["lease_owner"] is None
    assert row["finished_at"] is not None
    assert row["error"] is None
    for task in task_rows(db, apply_id):
        assert (task["state"], task["progress"], task["lease_epoch"]) == ("completed", 100, 1)
        assert task["started_at"] is not None
        assert task["finished_at"] is not None
        assert task["checkpoint"]["elapsed"] == pytest.approx(0.05)
    started = [(e, ev) for e, ev in _events(db, apply_id) if ev.startswith("task_")]
    assert started == [(1, "task_started"), (1, "task_completed")] * 3
    assert _events(db, apply_id)[-1] == (2, "completed")
    _assert_epochs_non_decreasing(db, apply_id)

    assert {r.epoch for r in reporter.reports} == {lease.epoch}
    assert {r.total for r in reporter.reports} == {3}
    indexes = [r.index for r in reporter.reports]
    assert indexes == sorted(indexes)
    for index, table in enumerate(["t0", "t1", "t2"]):
        mine = [r for r in reporter.reports if r.index == index]
        assert {r.table for r in mine} == {table}
        assert mine[0].percent == 0
        assert mine[-1].percent == 100
        percents = [r.percent for r in mine]
        assert percents == sorted(percents)

    with pytest.raises(LeaseLost), fence(db, lease):
        pass  # the finished runner's lease admits nothing any more


def test_a_failing_task_fails_the_apply_and_cancels_the_rest(db: Database) -> None:
    apply_id = sleep_apply(db, (0.02, 0.02, 0.02), fail_at=1)
    lease = run_lease(db, apply_id)
    outcome = _runner(db, lease).run()

    assert outcome.state == ApplyState.FAILED
    assert outcome.error is not None
    assert "task t1 failed as asked (fail=true)" in outcome.error
    row = applies.get(db, apply_id)
    assert (row["state"], row["error"]) == ("failed", outcome.error)
    assert row["lease_epoch"] == lease.epoch + 1
    tasks = task_rows(db, apply_id)
    assert [t["state"] for t in tasks] == ["completed", "failed", "cancelled"]
    assert tasks[1]["error"] == outcome.error
    assert tasks[2]["finished_at"] is not None
    logs = applies.logs(db, apply_id)
    assert (logs[-1]["event"], logs[-1]["level"], logs[-1]["lease_epoch"]) == ("failed", "error", 2)
    _assert_epochs_non_decreasing(db, apply_id)


@pytest.mark.parametrize("via", ["control-request", "interrupt"])
def test_stop_mid_task_then_resume_from_the_checkpoint(db: Database, via: str) -> None:
    apply_id = sleep_apply(db, (0.02, 0.4, 0.02))
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()
    beat: Heartbeat | None = None
    requests: list[int] = []

    if via == "control-request":
        # The operator's stop reaches the owner through its heartbeat thread.
        beat = Heartbeat(db, lease, interrupts, interval=0.01, stale_after=30)
        beat.start()

        def stop() -> None:
            result = service.control_apply(db, apply_id, "stop", "ops", SentLeases())
            assert (result["request_state"], result["apply_state"]) == ("pending", "running")
            requests.append(result["request_id"])
            # Hold the engine here until the heartbeat has seen the request.
            assert interrupts.event.wait(10)
    else:

        def stop() -> None:
            interrupts.interrupt(Reason.STOP)

    reporter = RecordingReporter(_once(_mid_task(1, percent=40), stop))
    try:
        outcome = _runner(db, lease, interrupts=interrupts, reporter=reporter).run()
    finally:
        if beat is not None:
            beat.stop()
            beat.join(10)

    assert outcome == Outcome(ApplyState.STOPPED)
    state, epoch, token, owner = support.lease_of(db, apply_id)
    assert (state, epoch, owner) == ("stopped", lease.epoch + 1, None)
    assert token != lease.token
    tasks = task_rows(db, apply_id)
    assert [t["state"] for t in tasks] == ["completed", "pending", "pending"]
    checkpoint = tasks[1]["checkpoint"]
    # 40% of the 0.4 s task; the engine rounds its checkpoint to the millisecond, so exactly
    # 40% reads 0.16, a hair under the float 0.4 * 0.4.
    assert checkpoint["elapsed"] >= round(0.4 * 0.4, 3)
    assert tasks[1]["progress"] >= 40
    assert _events(db, apply_id)[-1] == (epoch, "stopped")
    if requests:
        assert control.get(db, requests[0]).state == ControlState.COMPLETED
    with pytest.raises(LeaseLost), fence(db, lease):
        pass  # the outstanding lease can no longer write

    # Resume: a new lease, a new runner; the finished task is not run again.
    resumed = run_lease(db, apply_id, owner="worker-2")
    engine = RecordingEngine()
    reporter2 = RecordingReporter()
    outcome2 = _runner(db, resumed, engine=engine, reporter=reporter2).run()
    assert outcome2 == Outcome(ApplyState.COMPLETED)
    assert [spec.table_name for spec in engine.specs] == ["t1", "t2"]
    assert engine.specs[0].checkpoint == checkpoint
    assert engine.specs[0].progress == tasks[1]["progress"]
    # The sleep engine picked up at the checkpoint's elapsed time, not at zero.
    assert engine.first_percent[tasks[1]["id"]] >= tasks[1]["progress"]
    assert reporter2.reports[0] == Report(resumed.epoch, 1, 3, "t1", tasks[1]["progress"])
    assert [t["state"] for t in task_rows(db, apply_id)] == ["completed"] * 3
    new_epoch_events = [ev for e, ev in _events(db, apply_id) if e == resumed.epoch]
    assert new_epoch_events.count("task_started") == 2
    _assert_epochs_non_decreasing(db, apply_id)


def test_cancel_mid_task_cancels_the_unfinished_tasks(db: Database) -> None:
    apply_id = sleep_apply(db, (0.02, 5.0, 0.02))
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()

    def cancel() -> None:
        request, _ = control.request(db, apply_id, ControlAction.CANCEL, requested_by="ops")
        interrupts.interrupt(Reason.CANCEL, request_id=request.id)

    reporter = RecordingReporter(_once(_mid_task(1), cancel))
    outcome = _runner(db, lease, interrupts=interrupts, reporter=reporter).run()

    assert outcome == Outcome(ApplyState.CANCELLED)
    row = applies.get(db, apply_id)
    assert (row["state"], row["lease_epoch"], row["error"]) == ("cancelled", lease.epoch + 1, None)
    assert row["finished_at"] is not None
    tasks = task_rows(db, apply_id)
    assert [t["state"] for t in tasks] == ["completed", "cancelled", "cancelled"]
    (request_id,) = _request_ids(db, apply_id)
    assert control.get(db, request_id).state == ControlState.COMPLETED
    assert _events(db, apply_id)[-1] == (lease.epoch + 1, "cancelled")


def _request_ids(db: Database, apply_id: int) -> list[int]:
    rows = support.snapshot(db)["control_requests"]
    return [int(r[0]) for r in rows if r[1] == apply_id]


def test_handover_returns_a_new_dispatched_lease_that_resumes(db: Database) -> None:
    apply_id = sleep_apply(db, (0.4, 0.02))
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()
    reporter = RecordingReporter(
        _once(_mid_task(0, percent=30), lambda: interrupts.interrupt(Reason.HANDOVER))
    )
    outcome = _runner(db, lease, interrupts=interrupts, reporter=reporter).run()

    assert outcome.state == ApplyState.DISPATCHED
    assert outcome.lease is not None
    state, epoch, token, owner = support.lease_of(db, apply_id)
    assert (state, epoch, token, owner) == (
        "dispatched",
        lease.epoch + 1,
        outcome.lease.token,
        None,
    )
    assert outcome.lease.epoch == epoch
    task = task_rows(db, apply_id)[0]
    assert task["state"] == "pending"
    assert task["checkpoint"]["elapsed"] > 0
    assert _events(db, apply_id)[-1] == (epoch, "handed_back")

    redeem(db, outcome.lease, "worker-2")
    engine = RecordingEngine()
    assert _runner(db, outcome.lease, engine=engine).run() == Outcome(ApplyState.COMPLETED)
    assert engine.specs[0].checkpoint == task["checkpoint"]
    assert engine.first_percent[task["id"]] >= 30


def test_a_stop_requested_before_redemption_is_acted_on_before_any_work(db: Database) -> None:
    """The request was made while a dead worker held the apply; the next holder acts on it."""
    apply_id = sleep_apply(db, (0.02, 0.02))
    dead = run_lease(db, apply_id, owner="dead-worker")
    request, _ = control.request(db, apply_id, ControlAction.STOP, requested_by="ops")
    taken_over = hand_back(db, dead, reason="test: as a reclaim would")
    redeem(db, taken_over, "worker-2")
    engine = RecordingEngine()
    outcome = _runner(db, taken_over, engine=engine).run()

    assert outcome == Outcome(ApplyState.STOPPED)
    assert engine.specs == []
    assert [t["state"] for t in task_rows(db, apply_id)] == ["pending", "pending"]
    assert control.get(db, request.id).state == ControlState.COMPLETED
    assert "task_started" not in [ev for _, ev in _events(db, apply_id)]


@pytest.mark.parametrize("heartbeat", [False, True], ids=["write-finds-it", "heartbeat-finds-it"])
def test_a_rotation_mid_run_makes_the_runner_write_nothing_more(
    db: Database, heartbeat: bool
) -> None:
    apply_id = sleep_apply(db, (10.0, 0.02))
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()
    reporter = RecordingReporter()
    # With the heartbeat thread, the runner's own checkpoint writes are rare (throttled).
    interval = 3600.0 if heartbeat else 0.0
    runner = _runner(
        db, lease, interrupts=interrupts, reporter=reporter, progress_interval=interval
    )
    beat = Heartbeat(db, lease, interrupts, interval=0.01, stale_after=30)
    if heartbeat:
        beat.start()
    running = Background(runner.run)
    try:
        # The task's start, then the engine's first (written) checkpoint.
        wait_until(
            lambda: reporter.count(lambda r: r.index == 0) >= 2, what="a checkpoint of task 0"
        )
        new = hand_back(db, lease, reason="test: another party rotates")
        after_rotation = support.snapshot(db)
        with pytest.raises(LeaseLost) as lost:
            running.result()
    finally:
        beat.stop()
        if heartbeat:
            beat.join(10)
    assert lost.value.apply_id == apply_id
    assert support.snapshot(db) == after_rotation
    assert max(e for e, _ in _events(db, apply_id)) == new.epoch
    assert all(t["lease_epoch"] <= lease.epoch for t in task_rows(db, apply_id))
    _assert_epochs_non_decreasing(db, apply_id)


def test_a_transient_storage_failure_in_an_owned_write_is_retried(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tasks.runner")
    apply_id = sleep_apply(db, (0.2, 0.02))
    lease = run_lease(db, apply_id)
    broken = unreachable(db.dialect, tmp_path)
    reporter = RecordingReporter()
    runner = _runner(db, lease, reporter=reporter)

    def cut_off() -> None:
        runner.db = broken  # the runner's next owned write cannot reach the database

    reporter.hook = _once(_mid_task(0), cut_off)
    running = Background(runner.run)
    try:
        wait_until(
            lambda: (
                sum("owned write failed, retrying" in r.getMessage() for r in caplog.records) >= 2
            ),
            what="retried owned writes",
        )
        runner.db = db  # the database is back
        outcome = running.result()
    finally:
        runner.db = db
        broken.dispose()
    assert outcome == Outcome(ApplyState.COMPLETED)
    assert [t["state"] for t in task_rows(db, apply_id)] == ["completed", "completed"]
    events = [ev for _, ev in _events(db, apply_id)]
    assert events.count("task_completed") == 2
    assert any("database unavailable" in r.getMessage() for r in caplog.records)


def test_checkpoint_writes_are_throttled_by_the_injected_clock(db: Database) -> None:
    apply_id = sleep_apply(db, (0.3,))
    lease = run_lease(db, apply_id)
    clock = FakeClock()
    reporter = RecordingReporter()
    outcome = _runner(db, lease, reporter=reporter, progress_interval=10.0, monotonic=clock).run()
    assert outcome == Outcome(ApplyState.COMPLETED)
    # The task's start, the first engine step (written), then only 100% (always written): the
    # engine's last step, its final report and the runner's after completion.
    percents = [r.percent for r in reporter.reports]
    assert percents[0] == 0
    assert 0 < percents[1] < 100
    assert percents[2:] == [100, 100, 100], percents


def test_a_task_s_last_checkpoint_is_written_by_its_completion(db: Database) -> None:
    """The 100 % checkpoint rides on the completion's own UPDATE: a task's row is written when it
    starts, at its first engine step, and once more when it completes, checkpoint included."""
    apply_id = sleep_apply(db, (0.3,))
    lease = run_lease(db, apply_id)
    updates: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("UPDATE APPLY_TASKS"):
            updates.append(" ".join(statement.split()))

    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        clock = FakeClock()
        outcome = _runner(db, lease, progress_interval=10.0, monotonic=clock).run()
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)
    assert outcome == Outcome(ApplyState.COMPLETED)
    assert len(updates) == 3, updates
    assert "started_at" in updates[0]
    assert "checkpoint" in updates[1]
    assert "finished_at" in updates[2]
    assert "checkpoint" in updates[2]
    (task,) = task_rows(db, apply_id)
    assert (task["state"], task["progress"]) == ("completed", 100)
    assert task["checkpoint"]["elapsed"] == pytest.approx(0.3)


def test_an_advancing_clock_lets_checkpoints_through(db: Database) -> None:
    apply_id = sleep_apply(db, (0.3,))
    lease = run_lease(db, apply_id)
    clock = FakeClock()
    reporter = RecordingReporter(lambda report: clock.advance(10.0))
    _runner(db, lease, reporter=reporter, progress_interval=10.0, monotonic=clock).run()
    assert len([r for r in reporter.reports if 0 < r.percent < 100]) >= 2
