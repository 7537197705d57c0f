"""Retry of a failed apply from its failed task (issue 10, part 3), on every store.

``leasehold retry ID`` / ``control_apply(action="retry")``: only a ``failed`` apply is retried;
its completed apply tasks stay done, the failed one and those cancelled because it failed go
back to pending (the failed one keeps its checkpoint), its error is cleared and kept in its log,
its lease rotates (``retried``), and it re-enters its line: dispatched at once if it heads it,
else ``queued`` behind the apply at work on its database. Its completion notification is due
again when it ends again. Races are forced (one transaction held open while another acts), as in
``test_line_races.py``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
from sqlalchemy import update

import leases
from leases import Lease, fence, mint_token, redeem
from leases.control import refused_retry, settle_unowned
from storage import _leasing as leasing
from storage import _lines as lines
from storage import applies, control, fenced, notifications
from storage._lines import Line
from storage.applies import NewApply, NewTask
from storage.database import Database
from storage.errors import ApplyNotFound, InvalidInput, InvalidTransition, LeaseLost
from storage.notifications import Notice, Notify
from storage.states import ApplyState, ControlAction, ControlState, TaskState
from storage.tables import metadata
from tasks import notify as notifier
from tasks import service
from tasks.engines import Engine, EngineContext, EngineError, TaskSpec
from tasks.engines.sleep import SleepEngine
from tasks.interrupts import Interrupts
from tasks.runner import ApplyRunner, Outcome
from tests import support
from tests.celery_fixtures import RecordingReporter, SentLeases, task_rows
from tests.races import ISOLATIONS, Spawn, Tap, holder_id, prove_blocked

OpenDb = Callable[..., Database]
FAILURE = "target went away: lost connection during the ALTER"
WHERE = Notify("deploys.apply_finished", "deploys")


class FailOnce(Engine):
    """The sleep engine, except that apply task ``position`` fails the first time it runs, after
    checkpointing some progress; every later run of it succeeds. Records every task it runs."""

    name = "sleep"

    def __init__(self, position: int = 1) -> None:
        self.inner = SleepEngine()
        self.position = position
        self.failed = False
        self.specs: list[TaskSpec] = []

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        return SleepEngine.validate_options(options)

    def already_applied(self, task: TaskSpec) -> bool:
        return False

    def run(self, task: TaskSpec, ctx: EngineContext) -> None:
        self.specs.append(task)
        if task.position == self.position and not self.failed:
            self.failed = True
            ctx.progress(40, {"elapsed": 0.02})
            raise EngineError(FAILURE)
        self.inner.run(task, ctx)


@dataclass
class Outbox:
    """A notification ``send`` that records what it sent."""

    sent: list[Notice] = field(default_factory=list)

    def __call__(self, notice: Notice) -> bool:
        self.sent.append(notice)
        return True

    def states(self) -> list[tuple[int, str, str | None]]:
        return [(n.apply_id, n.state, n.error) for n in self.sent]


def new(database: str, tasks: int = 3, *, notify: Notify | None = None) -> NewApply:
    return NewApply(
        database_name=database,
        environment="production",
        engine="sleep",
        tasks=[
            NewTask(f"t{i + 1}", f"ALTER TABLE t{i + 1} ADD c INT", {"seconds": 0.01})
            for i in range(tasks)
        ],
        notify=notify,
    )


def run(db: Database, lease: Lease, engine: Engine) -> Outcome:
    """Redeem ``lease`` and run its apply in this thread, as a worker would."""
    redeem(db, lease, "worker-test")
    return ApplyRunner(
        db, lease, engine, Interrupts(), RecordingReporter(), progress_interval=0.0
    ).run()


def submit(db: Database, database: str, *, notify: Notify | None = None) -> leases.Submitted:
    return leases.submit(db, new(database, notify=notify))


def failed_apply(
    db: Database, *, database: str | None = None, notify: Notify | None = None
) -> tuple[int, FailOnce]:
    """A three-task apply that failed at its second task: [completed, failed, cancelled]."""
    submitted = submit(db, database or support.new_database(), notify=notify)
    assert submitted.lease is not None
    engine = FailOnce(position=1)
    outcome = run(db, submitted.lease, engine)
    assert (outcome.state, outcome.error) == (ApplyState.FAILED, FAILURE)
    states = [t["state"] for t in task_rows(db, submitted.apply_id)]
    assert states == ["completed", "failed", "cancelled"]
    return submitted.apply_id, engine


def retry(db: Database, apply_id: Any, sent: SentLeases | None = None, by: Any = "ops") -> Any:
    return service.control_apply(db, apply_id, "retry", by, sent if sent is not None else print)


def line_states(db: Database, database: str) -> dict[int, str]:
    return {
        int(r["id"]): str(r["state"])
        for r in applies.lease_table(db, limit=10_000)
        if r["database_name"] == database
    }


def assert_one_turn(db: Database, database: str) -> None:
    """At most one apply of the line is at work: dispatched or running."""
    found = line_states(db, database)
    holders = [i for i, s in found.items() if s in ("dispatched", "running")]
    assert len(holders) <= 1, found


def assert_history(db: Database, apply_id: int) -> None:
    """The history proves itself: epochs never go back, and no apply task completed twice."""
    events = support.log_events(db, apply_id)
    epochs = [epoch for epoch, _ in events]
    assert epochs == sorted(epochs), events
    completed = [
        m["message"]
        for m in applies.logs(db, apply_id)
        if m["event"] in ("task_completed", "task_skipped")
    ]
    assert len(completed) == len(set(completed)), completed


def lease_now(db: Database, apply_id: int) -> Lease:
    _, epoch, token, _ = support.lease_of(db, apply_id)
    assert token is not None
    return Lease(apply_id, epoch, token)


# --- the retry itself ----------------------------------------------------------------------------


def test_retry_resumes_a_failed_apply_from_its_failed_task_and_completes_it(db: Database) -> None:
    apply_id, engine = failed_apply(db)
    failed_row = support.lease_of(db, apply_id)
    epoch = failed_row[1]
    done_before, failed_before, _ = task_rows(db, apply_id)
    assert failed_before["checkpoint"] == {"elapsed": 0.02}
    sent = SentLeases()

    answer = retry(db, apply_id, sent)

    assert (answer["action"], answer["request_state"], answer["apply_state"], answer["error"]) == (
        "retry",
        "completed",
        "dispatched",
        None,
    )
    request = control.get(db, answer["request_id"])
    assert (request.action, request.state, request.error) == (
        ControlAction.RETRY,
        ControlState.COMPLETED,
        None,
    )
    # Rotated out of failed (retried), then dispatched as the head of its free line.
    assert [(lease.apply_id, lease.epoch) for lease in sent.leases] == [(apply_id, epoch + 2)]
    state, new_epoch, token, owner = support.lease_of(db, apply_id)
    assert (state, new_epoch, owner) == ("dispatched", epoch + 2, None)
    assert token not in (None, failed_row[2])
    row = applies.get(db, apply_id)
    assert (row["error"], row["finished_at"]) == (None, None)
    assert support.log_events(db, apply_id)[-2:] == [
        (epoch + 1, "retried"),
        (epoch + 2, "dispatched"),
    ]
    retried = next(m for m in applies.logs(db, apply_id) if m["event"] == "retried")
    assert retried["message"] == (
        f"epoch {epoch + 1}: retry requested (control request {answer['request_id']}): 2 "
        f"unfinished apply task(s) back to pending, 1 completed kept; it had failed: {FAILURE}"
    )
    # The completed task is untouched; the failed one keeps its checkpoint and progress.
    done, again, third = task_rows(db, apply_id)
    assert done == done_before
    assert (again["state"], again["error"], again["finished_at"]) == ("pending", None, None)
    assert (again["checkpoint"], again["progress"]) == ({"elapsed": 0.02}, 40)
    assert again["started_at"] == failed_before["started_at"]
    assert (third["state"], third["error"], third["finished_at"]) == ("pending", None, None)
    assert {again["lease_epoch"], third["lease_epoch"]} == {epoch + 1}
    # get_apply (and so `leasehold status ID --json`) shows an unfinished apply again.
    shown = service.get_apply(db, apply_id)
    assert (shown["state"], shown["error"], shown["epoch"]) == ("dispatched", None, epoch + 2)
    assert [t["state"] for t in shown["tasks"]] == ["completed", "pending", "pending"]

    runs_before = len(engine.specs)
    outcome = run(db, sent.leases[0], engine)

    assert (outcome.state, outcome.error) == (ApplyState.COMPLETED, None)
    rerun = engine.specs[runs_before:]
    assert [s.position for s in rerun] == [1, 2]  # the completed task is not run again
    assert rerun[0].checkpoint == {"elapsed": 0.02}  # the engine may continue from it
    assert [t["state"] for t in task_rows(db, apply_id)] == ["completed"] * 3
    assert task_rows(db, apply_id)[0] == done_before
    assert_history(db, apply_id)
    assert applies.get(db, apply_id)["finished_at"] is not None


def test_a_retried_apply_that_fails_again_can_be_retried_again(db: Database) -> None:
    apply_id, _ = failed_apply(db)
    sent = SentLeases()
    retry(db, apply_id, sent)
    outcome = run(db, sent.leases[-1], FailOnce(position=2))
    assert outcome.state == ApplyState.FAILED
    assert [t["state"] for t in task_rows(db, apply_id)] == ["completed", "completed", "failed"]
    retry(db, apply_id, sent)
    assert run(db, sent.leases[-1], SleepEngine()).state == ApplyState.COMPLETED
    events = [e for _, e in support.log_events(db, apply_id)]
    assert events.count("retried") == 2
    assert events.count("failed") == 2
    assert events.count("completed") == 1
    assert_history(db, apply_id)


def test_an_abandoned_apply_is_retried_with_the_task_its_dead_worker_left_running(
    db: Database,
) -> None:
    """Reclaim fails an apply as abandoned without touching its tasks: the one its dead holder
    was running goes back to pending with the rest."""
    submitted = submit(db, support.new_database())
    assert submitted.lease is not None
    redeem(db, submitted.lease, "worker-dead")
    first, second, _ = support.task_ids(db, submitted.apply_id)
    with fence(db, submitted.lease) as fx:
        fenced.finish_task(fx, first, TaskState.COMPLETED)
        fenced.start_task(fx, second)
        fenced.update_task(fx, second, progress=30, checkpoint={"elapsed": 0.003})
    support.age_heartbeat(db, submitted.apply_id, 120)
    abandoned = leases.reclaim(db, support.reclaim_policy(stale_after=30.0, max_reclaims=0))
    assert [r.lease for r in abandoned] == [None]
    assert applies.get(db, submitted.apply_id)["error"].startswith("abandoned")

    sent = SentLeases()
    assert retry(db, submitted.apply_id, sent)["apply_state"] == "dispatched"
    tasks = task_rows(db, submitted.apply_id)
    assert [t["state"] for t in tasks] == ["completed", "pending", "pending"]
    assert tasks[1]["checkpoint"] == {"elapsed": 0.003}
    assert run(db, sent.leases[0], SleepEngine()).state == ApplyState.COMPLETED
    assert_history(db, submitted.apply_id)


# --- refusals ------------------------------------------------------------------------------------


def _stage(db: Database, state: str) -> int:
    """An apply in ``state`` (not failed), with no lease of ours outstanding that matters."""
    submitted = submit(db, support.new_database())
    apply_id = submitted.apply_id
    assert submitted.lease is not None
    if state == "queued":
        support.set_state(db, apply_id, "queued")  # as if its line were busy
        return apply_id
    if state == "pending":  # left by a leasehold older than lines
        support.set_state(db, apply_id, "pending")
        return apply_id
    if state == "dispatched":
        return apply_id
    redeem(db, submitted.lease, "worker-1")
    if state != "running":
        support.release(db, submitted.lease, to_state=ApplyState(state), reason=f"test: {state}")
    return apply_id


REFUSALS = {
    "queued": "this one has not failed: wait for it to end, or stop or cancel it",
    "pending": "this one has not failed: wait for it to end, or stop or cancel it",
    "dispatched": "this one has not failed: wait for it to end, or stop or cancel it",
    "running": "this one has not failed: wait for it to end, or stop or cancel it",
    "stopped": "resume a stopped one instead (leasehold resume {id})",
    "completed": "a completed one is done: submit a new apply for another change",
    "cancelled": "a cancelled one is final: submit it again",
}


@pytest.mark.parametrize("state", sorted(REFUSALS))
def test_only_a_failed_apply_is_retried_anything_else_is_refused_and_nothing_changes(
    db: Database, state: str
) -> None:
    apply_id = _stage(db, state)
    before = support.snapshot(db)
    sent = SentLeases()
    with pytest.raises(InvalidTransition) as refused:
        retry(db, apply_id, sent)
    advice = REFUSALS[state].format(id=apply_id)
    assert str(refused.value) == (
        f"apply {apply_id} is {state}: cannot retry: only a failed apply can be retried; {advice}"
    )
    assert refused.value.state == state
    assert support.snapshot(db) == before  # not even a control request is recorded
    assert sent.leases == []


REAL = object()  # stands for the id of a real, failed apply

BAD = [
    pytest.param(
        987654, "retry", "ops", ApplyNotFound, "apply 987654 does not exist", id="unknown"
    ),
    pytest.param(REAL, "Retry", "ops", InvalidInput, "action must be one of", id="action-case"),
    pytest.param(REAL, "retry ", "ops", InvalidInput, "action must be one of", id="action-space"),
    pytest.param(REAL, "retries", "ops", InvalidInput, "action must be one of", id="action-other"),
    pytest.param(REAL, 4, "ops", InvalidInput, "action must be one of", id="action-int"),
    pytest.param(REAL, None, "ops", InvalidInput, "action must be one of", id="action-null"),
    pytest.param(REAL, ["retry"], "ops", InvalidInput, "action must be one of", id="action-list"),
    pytest.param("1", "retry", "ops", InvalidInput, "apply_id must be a positive", id="id-str"),
    pytest.param(True, "retry", "ops", InvalidInput, "apply_id must be a positive", id="id-bool"),
    pytest.param(0, "retry", "ops", InvalidInput, "apply_id must be a positive", id="id-zero"),
    pytest.param(2.0, "retry", "ops", InvalidInput, "apply_id must be a positive", id="id-float"),
    pytest.param(REAL, "retry", 7, InvalidInput, "requested_by must be a string", id="by-int"),
    pytest.param(REAL, "retry", "x" * 256, InvalidInput, "1 to 255 characters", id="by-long"),
    pytest.param(REAL, "retry", "ops\nretry by root", InvalidInput, "printable", id="by-newline"),
]


@pytest.mark.parametrize(("apply_id", "action", "by", "error", "message"), BAD)
def test_bad_retry_requests_are_refused_and_write_nothing(
    db: Database, apply_id: Any, action: Any, by: Any, error: type[Exception], message: str
) -> None:
    real, _ = failed_apply(db)
    if apply_id is REAL:
        apply_id = real
    before = support.snapshot(db)
    sent = SentLeases()
    with pytest.raises(error, match=message):
        service.control_apply(db, apply_id, action, by, sent)
    assert support.snapshot(db) == before
    assert sent.leases == []


def test_the_error_names_every_action(db: Database) -> None:
    with pytest.raises(InvalidInput) as refused:
        service.control_apply(db, 1, "pause", None, print)
    assert "action must be one of stop, resume, cancel, retry; not 'pause'" in str(refused.value)


def test_a_second_retry_of_a_retried_apply_is_refused(db: Database) -> None:
    apply_id, _ = failed_apply(db)
    sent = SentLeases()
    retry(db, apply_id, sent)
    before = support.snapshot(db)
    with pytest.raises(InvalidTransition, match=rf"apply {apply_id} is dispatched: cannot retry"):
        retry(db, apply_id, sent)
    assert support.snapshot(db) == before
    assert len(sent.leases) == 1


def test_a_retry_request_of_a_running_apply_is_never_left_to_its_owner(db: Database) -> None:
    """The owner never acts on a retry: one recorded for a running apply (a racer's, which found
    the apply still failed) fails at once instead of staying pending for good."""
    apply_id = _stage(db, "running")
    request, _ = control.request(db, apply_id, ControlAction.RETRY, requested_by="ops")
    settled = settle_unowned(db, request)
    assert (settled.apply_state, settled.request.state) == (ApplyState.RUNNING, ControlState.FAILED)
    assert settled.request.error is not None
    assert settled.request.error.startswith(f"apply {apply_id} is running: cannot retry")
    assert control.pending(db, apply_id) == []


# --- the line -------------------------------------------------------------------------------------


def test_a_retry_into_a_busy_line_waits_behind_the_running_apply_then_goes_before_later_ones(
    db: Database,
) -> None:
    """A retried apply keeps its submission order among waiting applies, but never overtakes the
    apply that holds its line's turn: it is queued, no sweep dispatches it beside the running
    one, and it is dispatched when that one ends, before the apply submitted after it."""
    database = support.new_database()
    first, engine = failed_apply(db, database=database)
    second = submit(db, database)  # the line was free again: dispatched
    assert second.lease is not None
    redeem(db, second.lease, "worker-2")
    third = submit(db, database).apply_id
    assert line_states(db, database) == {
        first: "failed",
        second.apply_id: "running",
        third: "queued",
    }

    sent = SentLeases()
    answer = retry(db, first, sent)

    assert (answer["request_state"], answer["apply_state"]) == ("completed", "queued")
    assert sent.leases == []
    epoch = support.lease_of(db, first)[1]
    assert support.log_events(db, first)[-2:] == [(epoch, "retried"), (epoch, "queued")]
    queued = applies.logs(db, first)[-1]["message"]
    assert f"#2 in line, behind apply {second.apply_id} (running)" in queued
    shown = service.get_apply(db, first)
    assert (shown["state"], shown["position"], shown["waiting_behind"]) == (
        "queued",
        2,
        second.apply_id,
    )
    assert service.get_apply(db, third)["position"] == 3
    table = {r["id"]: r["line_position"] for r in applies.lease_table(db)}
    assert (table[first], table[third]) == (2, 3)
    # Every reclaim pass sweeps waiting lines: it must not dispatch it beside the running one.
    assert leases.dispatch_waiting(db) == []
    assert_one_turn(db, database)

    ended = ApplyRunner(
        db, second.lease, SleepEngine(), Interrupts(), RecordingReporter(), progress_interval=0.0
    ).run()
    assert ended.successor is not None
    assert ended.successor.apply_id == first  # before the third, submitted after it
    assert line_states(db, database)[third] == "queued"
    outcome = run(db, ended.successor, engine)
    assert outcome.state == ApplyState.COMPLETED
    assert outcome.successor is not None
    assert outcome.successor.apply_id == third
    assert_history(db, first)


def test_a_retried_apply_goes_before_a_stopped_apply_submitted_after_it(db: Database) -> None:
    """Nothing is at work on the database: the retried apply heads its line in submission order
    and is dispatched (the operator asked for it), while the stopped apply submitted after it
    keeps its place behind it, still holding back the applies behind itself. Resumed meanwhile,
    that one waits for the retried apply, as any apply behind a running one does."""
    database = support.new_database()
    first, engine = failed_apply(db, database=database)
    second = submit(db, database)
    assert second.lease is not None
    redeem(db, second.lease, "worker-2")
    support.release(db, second.lease, reason="test: stopped")
    third = submit(db, database).apply_id  # held back by the stopped second

    sent = SentLeases()
    assert retry(db, first, sent)["apply_state"] == "dispatched"
    assert [lease.apply_id for lease in sent.leases] == [first]
    assert line_states(db, database) == {
        first: "dispatched",
        second.apply_id: "stopped",
        third: "queued",
    }
    resumed = service.control_apply(db, second.apply_id, "resume", "ops", sent)
    assert resumed["apply_state"] == "queued"  # behind the retried apply, now at work
    assert service.get_apply(db, second.apply_id)["waiting_behind"] == first
    assert leases.dispatch_waiting(db) == []
    assert_one_turn(db, database)

    outcome = run(db, sent.leases[0], engine)
    assert outcome.state == ApplyState.COMPLETED
    assert outcome.successor is not None
    assert outcome.successor.apply_id == second.apply_id
    assert line_states(db, database)[third] == "queued"


def test_a_stopped_apply_behind_a_retried_one_holds_its_line_again(db: Database) -> None:
    database = support.new_database()
    first, engine = failed_apply(db, database=database)
    second = submit(db, database)
    assert second.lease is not None
    redeem(db, second.lease, "worker-2")
    support.release(db, second.lease, reason="test: stopped")
    third = submit(db, database).apply_id
    sent = SentLeases()
    retry(db, first, sent)

    outcome = run(db, sent.leases[0], engine)

    assert outcome.successor is None  # the stopped apply heads the line again, and holds it
    assert line_states(db, database) == {
        first: "completed",
        second.apply_id: "stopped",
        third: "queued",
    }
    assert leases.dispatch_waiting(db) == []


def test_a_retry_dispatches_the_older_waiting_head_of_a_line_nobody_holds(db: Database) -> None:
    """A line whose waiting head was never dispatched (an older leasehold's): the retry puts its
    apply back in id order and dispatches the head, which here is the older apply, not itself."""
    database = support.new_database()
    older = applies.create(db, new(database)).apply_id  # queued, nobody dispatched it
    other = support.new_database()
    apply_id, _ = failed_apply(db, database=other)
    _move_to_line(db, apply_id, database)
    sent = SentLeases()

    answer = retry(db, apply_id, sent)

    assert answer["apply_state"] == "queued"
    assert [(lease.apply_id, lease.epoch) for lease in sent.leases] == [(older, 1)]
    assert line_states(db, database) == {older: "dispatched", apply_id: "queued"}


def _move_to_line(db: Database, apply_id: int, database: str) -> None:
    """Put an apply on another line (test-only: an apply never changes its line)."""
    table = metadata.tables["applies"]
    with db.transaction() as conn:
        conn.execute(update(table).where(table.c.id == apply_id).values(database_name=database))


# --- notifications -------------------------------------------------------------------------------


def _notification(db: Database, apply_id: int) -> dict[str, Any]:
    table = metadata.tables["notifications"]
    with db.transaction() as conn:
        return dict(
            conn.execute(table.select().where(table.c.apply_id == apply_id)).mappings().one()
        )


def test_the_caller_is_notified_again_when_the_retried_apply_ends(db: Database) -> None:
    apply_id, engine = failed_apply(db, notify=WHERE)
    outbox = Outbox()
    assert notifier.deliver(db, outbox, [apply_id]) == 1  # "failed", sent when it failed
    sent = SentLeases()
    retry(db, apply_id, sent)
    row = _notification(db, apply_id)
    assert row["due_at"] is None  # not owed while the retried apply runs
    assert notifications.owed(db) == []
    assert notifier.deliver(db, outbox) == 0

    assert run(db, sent.leases[0], engine).state == ApplyState.COMPLETED
    assert notifications.owed(db) == [apply_id]  # due again, made so by the terminal rotation
    assert notifier.deliver(db, outbox, [apply_id]) == 1
    assert outbox.states() == [(apply_id, "failed", FAILURE), (apply_id, "completed", None)]
    assert notifier.deliver(db, outbox) == 0  # sent once, recorded: never again


def test_a_failure_notice_still_owed_at_the_retry_is_withdrawn(db: Database) -> None:
    """The broker was down when the apply failed: the caller hears only how the retry ended,
    never a stale "failed" (nor a notice showing a running apply)."""
    apply_id, engine = failed_apply(db, notify=WHERE)
    assert notifications.owed(db) == [apply_id]
    sent = SentLeases()
    retry(db, apply_id, sent)
    assert notifications.owed(db) == []
    run(db, sent.leases[0], engine)
    outbox = Outbox()
    assert notifier.deliver(db, outbox) == 1
    assert outbox.states() == [(apply_id, "completed", None)]


def test_a_failure_notice_in_flight_at_the_retry_does_not_swallow_the_next(db: Database) -> None:
    """A sender claimed the "failed" notice and records it sent only after the retry: the
    retried apply's end still owes, and delivers, a new notification."""
    apply_id, engine = failed_apply(db, notify=WHERE)
    notice = notifications.claim(db, apply_id)
    assert notice is not None
    assert notice.state == "failed"
    sent = SentLeases()
    retry(db, apply_id, sent)
    notifications.mark_sent(db, apply_id)  # the sender, done sending the failure
    assert notifications.owed(db) == []
    run(db, sent.leases[0], engine)
    outbox = Outbox()
    assert notifier.deliver(db, outbox, [apply_id]) == 1
    assert outbox.states() == [(apply_id, "completed", None)]


# --- races ---------------------------------------------------------------------------------------


def _together(spawn: Spawn, fns: Sequence[Callable[[], object]]) -> list[object]:
    barrier = threading.Barrier(len(fns))

    def after_barrier(fn: Callable[[], object]) -> Callable[[], object]:
        def go() -> object:
            barrier.wait(timeout=30)
            return fn()

        return go

    racers = [spawn(f"racer-{i}", after_barrier(fn)) for i, fn in enumerate(fns)]
    for racer in racers:
        racer.start()
    return [racer.outcome() for racer in racers]


def _one_rotation(db: Database, apply_id: int, failed_epoch: int, sent: Sequence[Lease]) -> None:
    """Exactly one retry rotated the apply; one lease was minted and sent; no request pending."""
    assert [e for _, e in support.log_events(db, apply_id)].count("retried") == 1
    assert support.lease_of(db, apply_id)[:2] == ("dispatched", failed_epoch + 2)
    assert [(lease.apply_id, lease.epoch) for lease in sent] == [(apply_id, failed_epoch + 2)]
    assert control.pending(db, apply_id) == []
    assert_history(db, apply_id)


@ISOLATIONS
def test_two_retries_wait_for_the_line_and_exactly_one_rotates(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """Both retries find the apply failed and record (the same) request, then wait for the
    line's lock, held here; released, one rotates, the other reports that settlement (the same
    request) or is refused, the apply having left ``failed``."""
    database = support.new_database()
    apply_id, _ = failed_apply(db, database=database)
    failed_epoch = support.lease_of(db, apply_id)[1]
    holding = open_db(isolation_level=isolation)
    retriers = [open_db(isolation_level=isolation) for _ in range(2)]
    taps = [Tap(r) for r in retriers]
    sent = SentLeases()
    racers = [
        spawn(f"retry-{i}", partial(retry, r, apply_id, sent)) for i, r in enumerate(retriers)
    ]
    with holding.transaction() as conn:
        holder = holder_id(holding, conn)
        lines.lock(conn, Line(database, "production"))
        for racer, tap in zip(racers, taps, strict=True):
            racer.start()
            prove_blocked(db, racer, tap, holder=holder, what=racer.name, table="apply_lines")
    outcomes = [racer.outcome() for racer in racers]
    answers = [o for o in outcomes if isinstance(o, dict)]
    refusals = [o for o in outcomes if isinstance(o, BaseException)]
    assert answers, outcomes
    assert all(isinstance(r, InvalidTransition) for r in refusals), refusals
    # A loser that shared the winner's pending request reports that settlement (a no-op).
    assert {(a["request_state"], a["apply_state"]) for a in answers} == {
        ("completed", "dispatched")
    }
    assert len({a["request_id"] for a in answers}) == 1  # one request, settled once
    _one_rotation(db, apply_id, failed_epoch, sent.leases)


@ISOLATIONS
def test_a_retry_racing_the_reclaim_that_abandons_the_apply_never_loses_a_rotation(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """A reclaim pass is failing a silent apply as abandoned (its rotation held open here, as a
    batch holds it) when an operator retries it. On MariaDB the retry reads the committed state,
    still running, and is refused at once with nothing written; on SQLite it waits for the write
    lock and then retries the failure. Either way the two rotations are serialized (abandoned,
    then retried), the dead holder's lease stays dead, and a retry after the pass succeeds."""
    submitted = submit(db, support.new_database())
    assert submitted.lease is not None
    apply_id = submitted.apply_id
    redeem(db, submitted.lease, "worker-dead")
    reclaiming, retrying = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(retrying)
    sent = SentLeases()
    racer = spawn("retry", lambda: retry(retrying, apply_id, sent))
    with reclaiming.transaction(isolation_level="READ COMMITTED") as conn:
        holder = holder_id(reclaiming, conn)
        row = leasing.lock(conn, apply_id)
        abandoned = leasing.rotate(
            conn,
            row,
            new_token=mint_token(),
            to_state=ApplyState.FAILED,
            event="abandoned",
            reason="abandoned: test",
            error="abandoned: test",
        )
        racer.start()
        if db.is_sqlite:
            prove_blocked(db, racer, tap, holder=holder, what="the retry")
        else:
            refused = racer.error()  # while the reclaim's transaction is still open
            assert isinstance(refused, InvalidTransition)
            assert str(refused).startswith(f"apply {apply_id} is running: cannot retry")
    if not db.is_sqlite:
        assert control.pending(db, apply_id) == []
        assert support.lease_of(db, apply_id)[:2] == ("failed", abandoned)
        racer = spawn("retry-again", lambda: retry(retrying, apply_id, sent)).start()
    answer = racer.result()
    assert (answer["request_state"], answer["apply_state"]) == ("completed", "dispatched")
    assert [e for _, e in support.log_events(db, apply_id)][-3:] == [
        "abandoned",
        "retried",
        "dispatched",
    ]
    assert "it had failed: abandoned: test" in applies.logs(db, apply_id)[-2]["message"]
    assert [(lease.apply_id, lease.epoch) for lease in sent.leases] == [(apply_id, abandoned + 2)]
    with pytest.raises(LeaseLost):
        redeem(db, submitted.lease, "worker-dead")
    redeem(db, sent.leases[0], "worker-2")
    assert_history(db, apply_id)


def test_a_retry_request_that_a_terminal_rotation_failed_first_reports_why(db: Database) -> None:
    """A retry request still pending when its apply ends is failed by that ending, like any
    request; settling it afterwards changes nothing and reports that failure."""
    apply_id = _stage(db, "running")
    request, _ = control.request(db, apply_id, ControlAction.RETRY, requested_by="ops")
    lease = lease_now(db, apply_id)
    support.release(db, lease, to_state=ApplyState.FAILED, reason="test", error="boom")
    before = support.snapshot(db)
    settled = settle_unowned(db, request)
    assert (settled.apply_state, settled.request.state, settled.request.error) == (
        ApplyState.FAILED,
        ControlState.FAILED,
        "apply failed before the retry took effect",
    )
    assert settled.lease is None
    assert support.snapshot(db) == before
    refusal = refused_retry(settled)
    assert str(refusal) == (
        f"apply {apply_id} is failed: cannot retry: apply failed before the retry took effect; "
        "ask again to retry it now"
    )


@ISOLATIONS
def test_a_retry_waits_for_the_finishing_apply_of_its_line_then_takes_the_free_line(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    database = support.new_database()
    first, _ = failed_apply(db, database=database)
    second = submit(db, database)
    assert second.lease is not None
    redeem(db, second.lease, "worker-2")
    finishing, retrying = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(retrying)
    sent = SentLeases()
    racer = spawn("retry", lambda: retry(retrying, first, sent))
    with fence(finishing, second.lease, finishing=True) as fx:
        holder = holder_id(finishing, support.fence_connection(fx))
        done = fenced.finish(
            fx,
            new_token=mint_token(),
            successor_token=mint_token(),
            to_state=ApplyState.COMPLETED,
            event="completed",
            reason="tests",
        )
        assert done.successor is None  # the failed apply is not in the line yet
        racer.start()
        # Under InnoDB's REPEATABLE READ the finishing transaction's gap locks on
        # control_requests (it fails the apply's pending requests) already hold the retry's
        # request insert back. PostgreSQL has no gap locks: the retry waits for the line.
        gaps = isolation == "REPEATABLE READ" and db.dialect != "postgresql"
        table = "control_requests" if gaps else "apply_lines"
        prove_blocked(db, racer, tap, holder=holder, what="the retry", table=table)
    answer = racer.result()
    assert (answer["request_state"], answer["apply_state"]) == ("completed", "dispatched")
    assert [lease.apply_id for lease in sent.leases] == [first]
    assert line_states(db, database) == {first: "dispatched", second.apply_id: "completed"}


@ISOLATIONS
def test_a_retry_and_a_cancel_that_wait_together_leave_one_consistent_outcome(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """Both wait for the line's lock; whichever goes first, the other sees its result: a cancel
    first is refused (a failed apply is final) and the retry dispatches; a retry first dispatches
    and the cancel then cancels it, killing the retry's lease. Nothing waits forever."""
    database = support.new_database()
    apply_id, _ = failed_apply(db, database=database)
    holding = open_db(isolation_level=isolation)
    dbs = [open_db(isolation_level=isolation) for _ in range(2)]
    taps = [Tap(d) for d in dbs]
    sent = SentLeases()
    racers = [
        spawn("retry", partial(retry, dbs[0], apply_id, sent)),
        spawn("cancel", partial(service.control_apply, dbs[1], apply_id, "cancel", "ops", sent)),
    ]
    with holding.transaction() as conn:
        holder = holder_id(holding, conn)
        lines.lock(conn, Line(database, "production"))
        for racer, tap in zip(racers, taps, strict=True):
            racer.start()
            prove_blocked(db, racer, tap, holder=holder, what=racer.name, table="apply_lines")
    retried, cancelled = (racer.result() for racer in racers)
    assert (retried["request_state"], retried["apply_state"]) == ("completed", "dispatched")
    state = support.lease_of(db, apply_id)[0]
    if cancelled["request_state"] == "failed":  # the cancel went first
        assert cancelled["error"] == "apply is failed: nothing to cancel"
        assert state == "dispatched"
    else:  # the retry went first; the cancel ended the retried apply
        assert cancelled["apply_state"] == "cancelled"
        assert state == "cancelled"
        assert [t["state"] for t in task_rows(db, apply_id)] == [
            "completed",
            "cancelled",
            "cancelled",
        ]
        with pytest.raises(LeaseLost):
            redeem(db, sent.leases[0], "late-worker")
    assert control.pending(db, apply_id) == []
    assert_one_turn(db, database)
    assert_history(db, apply_id)


@ISOLATIONS
def test_eight_retries_and_a_reclaim_pass_at_once_rotate_once(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    database = support.new_database()
    apply_id, _ = failed_apply(db, database=database)
    failed_epoch = support.lease_of(db, apply_id)[1]
    dbs = [open_db(isolation_level=isolation) for _ in range(9)]
    sent = SentLeases()
    settings = support.settings(str(db.engine.url), stale_after=30.0)
    outcomes = _together(
        spawn,
        [partial(retry, d, apply_id, sent) for d in dbs[:8]]
        + [partial(service.reclaim_stale, dbs[8], settings, sent)],
    )
    answers = [o for o in outcomes[:8] if isinstance(o, dict)]
    refusals = [o for o in outcomes[:8] if not isinstance(o, dict)]
    assert answers
    assert all(isinstance(r, InvalidTransition) for r in refusals), refusals
    assert all(a["request_state"] == "completed" for a in answers), answers
    assert outcomes[8] == 0  # nothing stale to reclaim
    _one_rotation(db, apply_id, failed_epoch, sent.leases)
    assert_one_turn(db, database)
    for request in support.snapshot(db)["control_requests"]:
        assert request[3] in ("completed", "failed"), request


def test_the_log_of_a_retried_apply_reads_as_its_story(db: Database) -> None:
    """`leasehold logs ID` after a retry: the failure, the retry with the old error, then the
    new run, with epochs that never go back."""
    apply_id, engine = failed_apply(db)
    sent = SentLeases()
    retry(db, apply_id, sent)
    run(db, sent.leases[0], engine)
    events = [e for _, e in support.log_events(db, apply_id)]
    assert events[events.index("failed") :] == [
        "failed",
        "retried",
        "dispatched",
        "redeemed",
        "task_started",
        "task_completed",
        "task_started",
        "task_completed",
        "completed",
    ]
    failed = next(m for m in applies.logs(db, apply_id) if m["event"] == "failed")
    assert re.search(FAILURE, failed["message"])


def test_without_retries_a_line_keeps_submission_order_for_stopped_waiting_applies(
    db: Database,
) -> None:
    """The order that lets a retried apply queue behind the running one must not move a waiting
    apply that was stopped ahead of the queued ones submitted before it."""
    database = support.new_database()
    first = submit(db, database)
    assert first.lease is not None
    redeem(db, first.lease, "worker-1")
    second, third = submit(db, database).apply_id, submit(db, database).apply_id
    sent = SentLeases()
    stopped = service.control_apply(db, third, "stop", "ops", sent)
    assert stopped["apply_state"] == "stopped"
    assert service.get_apply(db, second)["position"] == 2
    assert service.get_apply(db, third)["position"] == 3

    ended = ApplyRunner(
        db, first.lease, SleepEngine(), Interrupts(), RecordingReporter(), progress_interval=0.0
    ).run()

    assert ended.successor is not None
    assert ended.successor.apply_id == second  # not held back by the stopped one behind it
    assert line_states(db, database) == {
        first.apply_id: "completed",
        second: "dispatched",
        third: "stopped",
    }


def test_a_retry_that_collides_with_a_request_settled_meanwhile_records_its_own(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our insert collides with a pending retry (the unique index on pending requests), which is
    settled before we read it back: ours is then a new request, refused because the apply left
    ``failed``, not an integrity error. Forced: the racer settles inside our read of the pending
    requests."""
    apply_id, _ = failed_apply(db)
    failed_epoch = support.lease_of(db, apply_id)[1]
    theirs, created = control.request(db, apply_id, ControlAction.RETRY, requested_by="racer")
    assert created
    sent = SentLeases()
    real_pending = control.pending

    def settled_first(db_: Database, apply_id_: int) -> list[control.ControlRequest]:
        monkeypatch.setattr(control, "pending", real_pending)
        settled = settle_unowned(db, theirs)
        assert settled.lease is not None
        sent(settled.lease)
        return real_pending(db_, apply_id_)

    monkeypatch.setattr(control, "pending", settled_first)
    with pytest.raises(InvalidTransition, match=rf"apply {apply_id} is dispatched: cannot retry"):
        retry(db, apply_id, sent)

    requests = [(r[2], r[3]) for r in support.snapshot(db)["control_requests"]]
    assert requests == [("retry", "completed"), ("retry", "failed")], requests
    _one_rotation(db, apply_id, failed_epoch, sent.leases)
