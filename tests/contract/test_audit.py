"""``storage.audit`` (``leasehold audit``), on every store: a history made by real runs audits
clean (completed, failed and retried, stopped and resumed, reclaimed, abandoned, cancelled), and
each kind of corruption planted in it is found, with the check that names it."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import insert, text, update

import leases
from leases import Lease, fence, redeem
from storage import applies as applies_repo
from storage import audit, control, fenced
from storage.applies import NewApply, NewTask
from storage.audit import Violation
from storage.database import Database
from storage.errors import ApplyNotFound
from storage.states import ApplyState, ControlAction, TaskState
from storage.tables import (
    applies,
    apply_comments,
    apply_logs,
    apply_tasks,
    checks,
    control_requests,
)
from tasks import service
from tasks.engines.sleep import SleepEngine
from tasks.interrupts import Interrupts, Reason
from tasks.runner import ApplyRunner, Outcome
from tests import support
from tests.celery_fixtures import RecordingReporter, Report, SentLeases, task_rows
from tests.contract.test_retry import FailOnce


def new(tasks: int = 3) -> NewApply:
    return NewApply(
        database_name=support.new_database(),
        environment="production",
        engine="sleep",
        tasks=[
            NewTask(f"t{i + 1}", f"ALTER TABLE t{i + 1} ADD c INT", {"seconds": 0.01})
            for i in range(tasks)
        ],
    )


def submitted(db: Database, tasks: int = 3) -> Lease:
    done = leases.submit(db, new(tasks))
    assert done.lease is not None
    return done.lease


def run(
    db: Database, lease: Lease, engine: Any = None, interrupts: Interrupts | None = None
) -> Outcome:
    """Redeem ``lease`` and run its apply in this thread, as a worker would."""
    redeem(db, lease, "worker-audit")
    return ApplyRunner(
        db,
        lease,
        engine or SleepEngine(),
        interrupts or Interrupts(),
        RecordingReporter(),
        progress_interval=0.0,
    ).run()


def completed(db: Database) -> int:
    lease = submitted(db)
    assert run(db, lease).state == ApplyState.COMPLETED
    return lease.apply_id


def retried(db: Database) -> int:
    """Failed at its second task, retried, then completed."""
    lease = submitted(db)
    assert run(db, lease, FailOnce(position=1)).state == ApplyState.FAILED
    sent = SentLeases()
    service.control_apply(db, lease.apply_id, "retry", "ops", sent)
    (again,) = sent.leases
    assert run(db, again).state == ApplyState.COMPLETED
    return lease.apply_id


def stopped_and_resumed(db: Database) -> int:
    """Stopped by its owner in its second task (put back to pending), resumed, completed."""
    lease = submitted(db)
    interrupts = Interrupts()

    def stop_in_second_task(report: Report) -> None:
        if report.index == 1:
            interrupts.interrupt(Reason.STOP)

    redeem(db, lease, "worker-audit")
    runner = ApplyRunner(
        db,
        lease,
        SleepEngine(),
        interrupts,
        RecordingReporter(stop_in_second_task),
        progress_interval=0.0,
    )
    assert runner.run().state == ApplyState.STOPPED
    assert [t["state"] for t in task_rows(db, lease.apply_id)] == [
        "completed",
        "pending",
        "pending",
    ]
    sent = SentLeases()
    service.control_apply(db, lease.apply_id, "resume", "ops", sent)
    (again,) = sent.leases
    assert run(db, again).state == ApplyState.COMPLETED
    return lease.apply_id


def died_in_a_task(db: Database) -> Lease:
    """Its worker completed the first task, started the second and died (heartbeat aged)."""
    lease = submitted(db)
    redeem(db, lease, "worker-dead")
    first, second, _ = support.task_ids(db, lease.apply_id)
    with fence(db, lease) as fx:
        fenced.finish_task(fx, first, TaskState.COMPLETED)
        fenced.append_log(fx, "task_completed", "task 1/3: t1")
        fenced.start_task(fx, second)
    support.age_heartbeat(db, lease.apply_id, 3600)
    return lease


def reclaimed(db: Database) -> int:
    lease = died_in_a_task(db)
    (taken,) = leases.reclaim(db, support.reclaim_policy(stale_after=60, max_reclaims=5))
    assert taken.lease is not None
    assert run(db, taken.lease).state == ApplyState.COMPLETED
    return lease.apply_id


def abandoned(db: Database) -> int:
    """Failed by reclaim, its second task left running by the worker that died."""
    lease = died_in_a_task(db)
    (taken,) = leases.reclaim(db, support.reclaim_policy(stale_after=60, max_reclaims=0))
    assert taken.lease is None
    assert support.lease_of(db, lease.apply_id)[0] == "failed"
    return lease.apply_id


def cancelled(db: Database) -> int:
    lease = submitted(db)
    service.control_apply(db, lease.apply_id, "cancel", "ops", SentLeases())
    return lease.apply_id


def failed(db: Database) -> int:
    lease = submitted(db)
    assert run(db, lease, FailOnce(position=1)).state == ApplyState.FAILED
    return lease.apply_id


def stopped_waiting(db: Database) -> int:
    lease = submitted(db)
    service.control_apply(db, lease.apply_id, "stop", "ops", SentLeases())
    return lease.apply_id


def checks_of(found: list[Violation]) -> list[str]:
    return sorted(v.check for v in found)


# --- a clean history ------------------------------------------------------------------------------


def test_a_history_made_by_real_runs_audits_clean(db: Database) -> None:
    made = [
        completed(db),
        retried(db),
        stopped_and_resumed(db),
        reclaimed(db),
        abandoned(db),
        cancelled(db),
        failed(db),
        stopped_waiting(db),
        submitted(db).apply_id,  # dispatched, never redeemed
        support.running_lease(db).apply_id,
    ]
    before = support.snapshot(db)

    assert audit.audit(db) == []
    report = audit.run(db, batch_size=3)  # four batches, the last one short

    assert (report.applies, report.violations) == (len(made), [])
    for apply_id in made:
        assert audit.audit(db, apply_id) == []
    assert support.snapshot(db) == before  # read-only


def test_an_unknown_apply_is_not_found(db: Database) -> None:
    with pytest.raises(ApplyNotFound, match="apply 424242 does not exist"):
        audit.audit(db, 424242)


def test_an_empty_store_audits_clean(db: Database) -> None:
    assert audit.run(db) == audit.Report(0, [])


# --- planted corruption ---------------------------------------------------------------------------


def epoch_of(db: Database, apply_id: int) -> int:
    return support.lease_of(db, apply_id)[1]


def plant(db: Database, statement: Any) -> None:
    with db.transaction() as conn:
        conn.execute(statement)


def log_row(apply_id: int, epoch: int, event: str, message: str = "planted") -> Any:
    return insert(apply_logs).values(
        apply_id=apply_id,
        lease_epoch=epoch,
        level="info",
        event=event,
        message=message,
        created_at=text("CURRENT_TIMESTAMP"),
    )


def test_a_stale_epoch_log_row_is_found(db: Database) -> None:
    apply_id = completed(db)
    plant(db, log_row(apply_id, 1, "task_started"))

    (found,) = audit.audit(db)

    assert found.check == "log_epochs"
    assert found.apply_id == apply_id
    last = max(r["id"] for r in _logs(db, apply_id))
    top = max(r["id"] for r in _logs(db, apply_id) if r["lease_epoch"] == epoch_of(db, apply_id))
    assert str(found) == (
        f"apply {apply_id}: log epoch 1 after {epoch_of(db, apply_id)} (log ids {top}, {last})"
    )
    assert found.as_json() == {
        "apply_id": apply_id,
        "check": "log_epochs",
        "message": found.message,
    }


def test_a_log_row_above_the_apply_epoch_is_found(db: Database) -> None:
    apply_id = stopped_waiting(db)
    plant(db, log_row(apply_id, epoch_of(db, apply_id) + 1, "heartbeat_lost"))

    assert checks_of(audit.audit(db, apply_id)) == ["log_epochs"]


def test_a_second_terminal_event_is_found(db: Database) -> None:
    apply_id = completed(db)
    plant(db, log_row(apply_id, epoch_of(db, apply_id), "completed"))

    (found,) = audit.audit(db)

    assert found.check == "terminal_event"
    assert "is completed with 2 terminal events" in found.message


def test_a_terminal_apply_without_its_terminal_event_is_found(db: Database) -> None:
    apply_id = cancelled(db)
    plant(db, update(apply_logs).where(apply_logs.c.apply_id == apply_id).values(event="noted"))

    (found,) = audit.audit(db)

    assert found.message == "is cancelled with no terminal event (exactly one expected)"


def test_a_terminal_event_of_an_unfinished_apply_is_found(db: Database) -> None:
    apply_id = stopped_waiting(db)
    plant(db, log_row(apply_id, epoch_of(db, apply_id), "failed"))

    assert checks_of(audit.audit(db)) == ["terminal_event"]


def test_a_retry_of_an_apply_that_had_not_failed_is_found(db: Database) -> None:
    apply_id = retried(db)
    # Make the failure before the retry a completion: a completed apply was "retried".
    plant(
        db,
        update(apply_logs)
        .where(apply_logs.c.apply_id == apply_id, apply_logs.c.event == "failed")
        .values(event="completed"),
    )

    (found,) = audit.audit(db)

    assert found.check == "terminal_event"
    assert "only an apply that failed once can be retried" in found.message


def test_a_task_completed_twice_is_found(db: Database) -> None:
    apply_id = retried(db)
    plant(db, log_row(apply_id, epoch_of(db, apply_id), "task_skipped", "task 2/3: t2"))

    (found,) = audit.audit(db)

    assert found.check == "task_completions"
    assert found.message.startswith("task 2/3: t2 recorded completed 2 times (log ids ")


def test_a_task_epoch_above_the_apply_epoch_is_found(db: Database) -> None:
    apply_id = completed(db)
    plant(
        db,
        update(apply_tasks)
        .where(apply_tasks.c.apply_id == apply_id, apply_tasks.c.position == 2)
        .values(lease_epoch=epoch_of(db, apply_id) + 1),
    )

    (found,) = audit.audit(db)

    epoch = epoch_of(db, apply_id)
    assert str(found) == (
        f"apply {apply_id}: task 3 (t3) epoch {epoch + 1} above the apply's {epoch}"
    )


def test_comment_and_check_epochs_above_the_apply_epoch_are_found(db: Database) -> None:
    apply_id = stopped_and_resumed(db)
    epoch = epoch_of(db, apply_id)
    now = text("CURRENT_TIMESTAMP")
    plant(
        db,
        insert(apply_comments).values(
            apply_id=apply_id, kind="progress", last_epoch=epoch + 2, edit_count=3, updated_at=now
        ),
    )
    plant(
        db,
        insert(checks).values(
            apply_id=apply_id,
            status="completed",
            conclusion=None,
            last_epoch=epoch + 1,
            updated_at=now,
        ),
    )

    found = audit.audit(db)

    assert sorted(v.message for v in found) == [
        "check run completed without a conclusion",
        f"check run epoch {epoch + 1} above the apply's {epoch}",
        f"comment progress epoch {epoch + 2} above the apply's {epoch}",
    ]
    assert checks_of(found) == ["effect_epochs"] * 3


def test_current_comment_and_check_records_audit_clean(db: Database) -> None:
    apply_id = completed(db)
    epoch = epoch_of(db, apply_id)
    now = text("CURRENT_TIMESTAMP")
    plant(
        db,
        insert(apply_comments).values(
            apply_id=apply_id, kind="progress", last_epoch=epoch, edit_count=3, updated_at=now
        ),
    )
    plant(
        db,
        insert(checks).values(
            apply_id=apply_id,
            status="completed",
            conclusion="success",
            last_epoch=epoch - 1,
            updated_at=now,
        ),
    )

    assert audit.audit(db) == []


def set_task(db: Database, apply_id: int, position: int, state: str) -> None:
    plant(
        db,
        update(apply_tasks)
        .where(apply_tasks.c.apply_id == apply_id, apply_tasks.c.position == position)
        .values(state=state),
    )


@pytest.mark.parametrize(
    ("make", "position", "task_state", "message"),
    [
        (completed, 1, "pending", "is completed but task 2 (t2) is pending"),
        (cancelled, 2, "pending", "task states out of order (1 cancelled, 2 cancelled, 3 pending)"),
        (cancelled, 0, "running", "is cancelled but task 1 (t1) is running"),
        (stopped_waiting, 2, "cancelled", "is stopped but task 3 (t3) is cancelled"),
        (stopped_and_resumed, 0, "failed", "is completed but task 1 (t1) is failed"),
        (stopped_waiting, 1, "completed", "task states out of order (1 pending, 2 completed"),
        (failed, 2, "completed", "task states out of order (1 completed, 2 failed, 3 completed)"),
    ],
)
def test_an_apply_state_that_disagrees_with_its_tasks_is_found(
    db: Database, make: Any, position: int, task_state: str, message: str
) -> None:
    apply_id = make(db)
    set_task(db, apply_id, position, task_state)

    found = audit.audit(db)

    assert found, "nothing found"
    assert {v.check for v in found} == {"state_vs_tasks"}
    assert any(v.message.startswith(message) for v in found), found


def test_states_no_leasehold_writes_are_found(db: Database) -> None:
    apply_id = stopped_waiting(db)
    set_task(db, apply_id, 1, "skipped")
    plant(db, update(applies).where(applies.c.id == apply_id).values(state="paused"))

    assert sorted(v.message for v in audit.audit(db)) == [
        "has an unknown state 'paused'",
        "task 2 (t2) has an unknown state 'skipped'",
    ]


def test_a_failed_apply_with_no_error_and_no_failed_task_is_found(db: Database) -> None:
    apply_id = abandoned(db)  # failed by reclaim: its error says why
    plant(db, update(applies).where(applies.c.id == apply_id).values(error=None))

    assert [v.message for v in audit.audit(db)] == ["is failed with no error and no failed task"]


def test_one_apply_is_audited_alone(db: Database) -> None:
    clean, dirty = completed(db), completed(db)
    plant(db, log_row(dirty, 0, "task_started"))

    assert audit.audit(db, clean) == []
    assert [v.apply_id for v in audit.audit(db, dirty)] == [dirty]


def test_violations_of_many_batches_are_all_found(db: Database) -> None:
    made = [completed(db) for _ in range(5)]
    for apply_id in made[::2]:
        plant(db, log_row(apply_id, 0, "task_started"))

    report = audit.run(db, batch_size=2)

    assert report.applies == 5
    assert [v.apply_id for v in report.violations] == made[::2]


def _logs(db: Database, apply_id: int) -> list[dict[str, Any]]:
    return [dict(r) for r in applies_repo.logs(db, apply_id)]


# --- who asked: every control request records its requester (issue 14) --------------------------


@pytest.mark.parametrize("nobody", [None, "", "   "], ids=["null", "empty", "blank"])
def test_a_control_request_that_records_no_requester_is_found(
    db: Database, nobody: str | None
) -> None:
    """A cancel that says nobody asked is found, naming the request and its apply; a request that
    names someone is not. NULL: the Celery task's ``requested_by`` left out. Empty or blank: a
    row no leasehold of today writes (the tasks refuse such a requester), but an older one did,
    or a hand did, and the audit reads rows, not the rules of their writers."""
    named = stopped_waiting(db)  # stopped by "ops"
    apply_id = submitted(db).apply_id
    before = support.snapshot(db)
    if nobody is None:
        answer = service.control_apply(db, apply_id, "cancel", nobody, SentLeases())
        assert answer["apply_state"] == "cancelled"
        request_id = answer["request_id"]
    else:
        request_id = control.request(db, apply_id, ControlAction.CANCEL, requested_by=nobody)[0].id
    assert len(support.snapshot(db)["control_requests"]) == len(before["control_requests"]) + 1

    (found,) = audit.audit(db)

    assert (found.apply_id, found.check) == (apply_id, "control_requesters")
    assert (
        str(found)
        == f"apply {apply_id}: control request {request_id} (cancel) records no requester"
    )
    assert found.as_json() == {
        "apply_id": apply_id,
        "check": "control_requesters",
        "message": f"control request {request_id} (cancel) records no requester",
    }
    assert audit.audit(db, named) == []
    assert audit.audit(db, apply_id) == [found]


def test_every_anonymous_control_request_of_every_batch_is_found(db: Database) -> None:
    """Two anonymous requests of one apply are two violations; requests across batches are each
    read with their own batch."""
    made = [stopped_waiting(db) for _ in range(3)]
    anonymous = made[1]
    stop = support.insert_control_request(db, anonymous, action="stop", state="completed")
    resume = support.insert_control_request(db, anonymous, action="resume", state="failed")
    plant(
        db,
        update(control_requests)
        .where(control_requests.c.id.in_([stop, resume]))
        .values(requested_by=None),
    )

    report = audit.run(db, batch_size=1)

    assert report.applies == 3
    assert [(v.apply_id, v.check, v.message) for v in report.violations] == [
        (anonymous, "control_requesters", f"control request {stop} (stop) records no requester"),
        (
            anonymous,
            "control_requesters",
            f"control request {resume} (resume) records no requester",
        ),
    ]
