"""Scenario 7: stop, resume and cancel, each while the apply runs (its owner acts on the request
and completes it with a fenced write) and while nobody owns it (a CAS on its state). The
warm-shutdown handover is in ``test_failover`` since it stops a worker. And retry of a failed
apply from its failed task (issue 10).

Two module-scoped workers serve every test; no beat runs, so a dispatched apply whose message
was never sent stays unowned for as long as a test needs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import update

from storage import applies
from storage.database import Database
from storage.tables import metadata
from tests.e2e.helpers import (
    RESULT_TIMEOUT,
    Cluster,
    Stack,
    assert_completed_once,
    assert_epochs_non_decreasing,
    control_requests,
    describe,
    dispatched_apply,
    events,
    logs,
    row,
    sleep_payload,
    submit_task,
    wait_progress,
    wait_state,
)

pytestmark = pytest.mark.slow
# Stacks: control is rotations and lines in the store, so PostgreSQL too; on RabbitMQ the
# control queue is covered by the poison and contract modules (tests/e2e/conftest.py).
STACKS = frozenset({"redis", "postgres", "sqlite"})

CONTROL = "leasehold.control_apply"


def _control_task(stack: Stack, apply_id: int, action: str) -> dict[str, Any]:
    """control_apply as another app sends it."""
    result = stack.client.send_task(
        CONTROL, kwargs={"apply_id": apply_id, "action": action, "requested_by": "e2e"}
    )
    out: dict[str, Any] = result.get(timeout=RESULT_TIMEOUT)
    return out


def _control_cli(stack: Stack, apply_id: int, action: str, *, ok: bool = True) -> dict[str, Any]:
    done = stack.cli(action, str(apply_id), "--by", "e2e-operator", check=False)
    assert (done.returncode == 0) == ok, f"{done.returncode}\n{done.stdout}{done.stderr}"
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _running(stack: Stack, *seconds: float, position: int = 1) -> tuple[int, int]:
    """Submit a sleep apply and wait until apply task ``position`` is under way."""
    apply_id = submit_task(stack, sleep_payload(*seconds))
    wait_progress(stack.db, apply_id, position, 10, timeout=RESULT_TIMEOUT)
    return apply_id, int(row(stack.db, apply_id)["lease_epoch"])


def test_stop_while_running_then_resume_from_the_first_unfinished_task(cluster: Cluster) -> None:
    """stop while running: the owner stops at a safe point, completes the request and rotates
    the lease away (resumable: task 2 keeps its checkpoint); resume while stopped (no owner):
    a CAS dispatches a new lease, and a worker continues from task 2, not from task 1."""
    stack, db = cluster.stack, cluster.stack.db
    cluster.shared_workers(2)
    # task 2 long enough that the stop (a CLI process, slow to start on a busy machine) always
    # arrives while it runs; the stop cuts it short, and the resumed run continues from its
    # checkpoint
    apply_id, epoch = _running(stack, 0.3, 8.0, 0.3)

    asked = _control_cli(stack, apply_id, "stop")
    assert (asked["request_state"], asked["apply_state"]) == ("pending", "running"), asked
    stopped = wait_state(db, apply_id, "stopped", timeout=RESULT_TIMEOUT)
    assert (stopped["lease_epoch"], stopped["lease_owner"]) == (epoch + 1, None)
    (request,) = control_requests(db, apply_id)
    assert (request["action"], request["state"], request["requested_by"]) == (
        "stop",
        "completed",
        "e2e-operator",
    )
    assert request["completed_at"] is not None
    last = logs(db, apply_id)[-1]
    assert (last.epoch, last.event) == (epoch + 1, "stopped"), describe(db, apply_id)
    tasks = applies.tasks(db, apply_id)
    assert [t["state"] for t in tasks] == ["completed", "pending", "pending"]
    checkpoint = float(tasks[1]["checkpoint"]["elapsed"])
    assert checkpoint > 0, describe(db, apply_id)
    stop_log_end = last.id

    resumed = _control_cli(stack, apply_id, "resume")
    assert (resumed["request_state"], resumed["apply_state"]) == ("completed", "dispatched")
    wait_state(db, apply_id, "completed", timeout=RESULT_TIMEOUT)
    assert_completed_once(db, apply_id)
    after = [(e.epoch, e.event, e.message) for e in logs(db, apply_id) if e.id > stop_log_end]
    assert after[:3] == [
        (epoch + 2, "resumed", after[0][2]),
        (epoch + 2, "redeemed", after[1][2]),
        (epoch + 2, "task_started", "task 2/3: t2"),
    ], describe(db, apply_id)
    assert [a[1] for a in after].count("task_started") == 2  # tasks 2 and 3 only
    assert [r["state"] for r in control_requests(db, apply_id)] == ["completed", "completed"]


def test_cancel_while_running(cluster: Cluster) -> None:
    """cancel while running: the owner ends the apply cancelled with a fenced write that also
    completes the request and cancels the unfinished apply tasks."""
    stack, db = cluster.stack, cluster.stack.db
    cluster.shared_workers(2)
    apply_id, epoch = _running(stack, 0.3, 4.0, 0.3)

    asked = _control_task(stack, apply_id, "cancel")
    assert (asked["request_state"], asked["apply_state"]) == ("pending", "running"), asked
    final = wait_state(db, apply_id, "cancelled", timeout=RESULT_TIMEOUT)
    assert (final["lease_epoch"], final["lease_owner"]) == (epoch + 1, None)
    assert final["finished_at"] is not None
    assert [t["state"] for t in applies.tasks(db, apply_id)] == [
        "completed",
        "cancelled",
        "cancelled",
    ]
    (request,) = control_requests(db, apply_id)
    assert (request["action"], request["state"]) == ("cancel", "completed")
    assert events(db, apply_id)[-1] == (epoch + 1, "cancelled")
    assert_epochs_non_decreasing(db, apply_id)


def test_resume_while_running_is_refused_and_the_apply_runs_on(cluster: Cluster) -> None:
    """resume while running: nothing to resume; the request fails at once with a clear error
    (it does not linger as pending) and the running apply is untouched."""
    stack, db = cluster.stack, cluster.stack.db
    cluster.shared_workers(2)
    apply_id, epoch = _running(stack, 0.3, 4.0, 0.3)

    asked = _control_task(stack, apply_id, "resume")
    assert (asked["request_state"], asked["apply_state"]) == ("failed", "running"), asked
    assert "nothing to resume" in asked["error"]
    wait_state(db, apply_id, "completed", timeout=RESULT_TIMEOUT)
    assert_completed_once(db, apply_id)
    (request,) = control_requests(db, apply_id)
    assert (request["action"], request["state"]) == ("resume", "failed")
    assert {e.epoch for e in logs(db, apply_id)} == {epoch, epoch + 1}


def test_stop_and_cancel_while_not_owned(cluster: Cluster) -> None:
    """stop and cancel of applies nobody owns (dispatched, but the message never arrived; then
    stopped) are carried out at once by a CAS on the state; the late message is refused."""
    stack, db = cluster.stack, cluster.stack.db
    cluster.shared_workers(2)
    lost, second_lease = dispatched_apply(db, 0.3, 0.3), dispatched_apply(db, 0.3)
    first, second = lost.apply_id, second_lease.apply_id

    stopped = _control_task(stack, first, "stop")
    assert (stopped["request_state"], stopped["apply_state"]) == ("completed", "stopped")
    late = stack.client.send_task(
        "leasehold.run_apply", kwargs={"apply_id": first, "lease": lost.to_json()}
    )
    assert late.get(timeout=RESULT_TIMEOUT)["outcome"] == "not_redeemed"
    assert row(db, first)["state"] == "stopped"

    again = _control_cli(stack, first, "stop")  # already stopped: done, nothing changes
    assert (again["request_state"], again["apply_state"]) == ("completed", "stopped")
    cancelled = _control_cli(stack, first, "cancel")
    assert (cancelled["request_state"], cancelled["apply_state"]) == ("completed", "cancelled")
    refused = _control_cli(stack, first, "resume", ok=False)
    assert refused["request_state"] == "failed"
    assert "nothing to resume" in refused["error"]
    assert events(db, first) == [(1, "dispatched"), (2, "stopped"), (3, "cancelled")]
    assert [t["state"] for t in applies.tasks(db, first)] == ["cancelled", "cancelled"]
    assert [(r["action"], r["state"]) for r in control_requests(db, first)] == [
        ("stop", "completed"),
        ("stop", "completed"),
        ("cancel", "completed"),
        ("resume", "failed"),
    ]

    gone = _control_task(stack, second, "cancel")
    assert (gone["request_state"], gone["apply_state"]) == ("completed", "cancelled")
    assert events(db, second) == [(1, "dispatched"), (2, "cancelled")]
    assert row(db, second)["finished_at"] is not None


def _fix_the_failing_task(db: Database, apply_id: int, position: int) -> None:
    """What the operator does before a retry, played by the test: the cause of the failure goes
    away (here, the sleep engine's ``fail`` option of that apply task is switched off)."""
    table = metadata.tables["apply_tasks"]
    task = applies.tasks(db, apply_id)[position]
    options = {**task["options"], "fail": False}
    with db.transaction() as conn:
        conn.execute(update(table).where(table.c.id == task["id"]).values(options=options))


def test_retry_of_a_failed_apply_completes_it_from_its_failed_task(cluster: Cluster) -> None:
    """An apply fails at its second task; once the cause is gone, `leasehold retry` puts it back
    in its line and a worker continues from that task: the first is not run again, each task
    completes once, and a retry of the completed apply is refused, changing nothing."""
    stack, db = cluster.stack, cluster.stack.db
    cluster.shared_workers(2)
    payload = sleep_payload(0.3, 0.6, 0.3)
    payload["tasks"][1]["options"]["fail"] = True
    apply_id = submit_task(stack, payload)
    failed = wait_state(db, apply_id, "failed", timeout=RESULT_TIMEOUT)
    assert "failed as asked" in failed["error"], describe(db, apply_id)
    assert [t["state"] for t in applies.tasks(db, apply_id)] == [
        "completed",
        "failed",
        "cancelled",
    ]
    first_done = applies.tasks(db, apply_id)[0]
    _fix_the_failing_task(db, apply_id, 1)

    retried = _control_cli(stack, apply_id, "retry")
    assert (retried["request_state"], retried["apply_state"]) == ("completed", "dispatched")
    final = wait_state(db, apply_id, "completed", timeout=RESULT_TIMEOUT)
    # Epochs: retried, dispatched (redeemed by a worker), then completed.
    assert (final["error"], final["lease_epoch"]) == (None, failed["lease_epoch"] + 3)
    assert_completed_once(db, apply_id)
    assert applies.tasks(db, apply_id)[0] == first_done  # untouched by the retry and the run
    entries = logs(db, apply_id)
    assert [e.message for e in entries if e.event == "task_started"] == [
        "task 1/3: t1",
        "task 2/3: t2",
        "task 2/3: t2",  # the retry's run: from the failed task, not from the first
        "task 3/3: t3",
    ], describe(db, apply_id)
    (retry_line,) = [e for e in entries if e.event == "retried"]
    assert "it had failed: sleep engine: task t2 failed as asked" in retry_line.message
    (request,) = control_requests(db, apply_id)
    assert (request["action"], request["state"], request["requested_by"]) == (
        "retry",
        "completed",
        "e2e-operator",
    )

    before = [dict(r) for r in control_requests(db, apply_id)], events(db, apply_id)
    result = stack.client.send_task(
        CONTROL, kwargs={"apply_id": apply_id, "action": "retry", "requested_by": "e2e"}
    )
    error = result.get(timeout=RESULT_TIMEOUT, propagate=False)
    assert result.state == "FAILURE", (result.state, error)
    assert f"apply {apply_id} is completed: cannot retry" in str(error)
    assert ([dict(r) for r in control_requests(db, apply_id)], events(db, apply_id)) == before
