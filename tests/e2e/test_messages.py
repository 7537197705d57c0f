"""Scenarios 1, 4 and 8: a submitted apply runs to completion (as Flower sees it), a duplicated
``run_apply`` message runs once, and bad messages from other apps fail clearly and write nothing.

Two module-scoped workers serve every test here; no beat runs, so nothing is reclaimed behind a
test's back.
"""

from __future__ import annotations

from typing import Any

import pytest

from leases import Lease, mint_token
from storage import applies
from tests import support
from tests.e2e.helpers import (
    RESULT_TIMEOUT,
    Cluster,
    EventRecorder,
    assert_completed_once,
    dispatched_apply,
    events,
    logs,
    owner_task_id,
    row,
    sleep_payload,
    submit_cli,
    submit_task,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.slow
# Stacks: Celery's messages and Flower's events: the broker's business, not the store's
# (tests/e2e/conftest.py).
STACKS = frozenset({"redis", "rabbitmq", "sqlite"})

RUN_APPLY = "leasehold.run_apply"


def _expected_log(tasks: int, *, epoch: int = 1) -> list[tuple[int, str]]:
    out = [(epoch, "dispatched"), (epoch, "redeemed")]
    out += [(epoch, "task_started"), (epoch, "task_completed")] * tasks
    return [*out, (epoch + 1, "completed")]


def test_submit_runs_to_completion_and_flower_sees_progress(cluster: Cluster) -> None:
    """Scenario 1: ``leasehold submit`` -> completed; the logs and apply tasks as expected;
    run_apply reported PROGRESS through ``task-progress`` events and ended SUCCESS, as Flower's
    event state (``celery.events.state.State``) shows it."""
    stack, db = cluster.stack, cluster.stack.db
    cluster.shared_workers(2)
    with EventRecorder(stack.client) as recorder:
        apply_id = submit_cli(stack, sleep_payload(0.3, 1.2, 0.3))
        wait_state(db, apply_id, "completed", timeout=RESULT_TIMEOUT)
        redeemed = next(e for e in logs(db, apply_id) if e.event == "redeemed")
        task_id = owner_task_id(redeemed.message.rsplit(" by ", 1)[1])
        result = stack.client.AsyncResult(task_id).get(timeout=RESULT_TIMEOUT)
        wait_for(
            f"Flower's view of run_apply {task_id} to reach SUCCESS",
            lambda: (t := recorder.task(task_id)) is not None and t.state == "SUCCESS",
            timeout=RESULT_TIMEOUT,
            diagnose=lambda: str(recorder.event_types(task_id)),
        )

    assert result == {"apply_id": apply_id, "epoch": 1, "outcome": "completed", "error": None}
    assert events(db, apply_id) == _expected_log(3)
    assert_completed_once(db, apply_id)
    final = row(db, apply_id)
    assert (final["lease_epoch"], final["lease_owner"], final["error"]) == (2, None, None)
    assert final["finished_at"] is not None
    assert [t["lease_epoch"] for t in applies.tasks(db, apply_id)] == [1, 1, 1]

    task = recorder.task(task_id)
    assert task.name == RUN_APPLY
    types = recorder.event_types(task_id)
    for expected in ("task-received", "task-started", "task-progress", "task-succeeded"):
        assert expected in types, types
    states = recorder.states_of(task_id)
    assert "PROGRESS" in states, states
    assert states.index("PROGRESS") < states.index("SUCCESS"), states
    assert states[-1] == "SUCCESS", states
    progress = recorder.task_events(task_id, "task-progress")
    assert {e["apply_id"] for e in progress} == {apply_id}
    assert {e["epoch"] for e in progress} == {1}
    assert (progress[-1]["task"], progress[-1]["tasks"], progress[-1]["percent"]) == (3, 3, 100)
    assert any(0 < e["percent"] < 100 for e in progress if e["task"] == 2), progress


def test_submit_with_repeated_request_id_returns_the_same_apply(cluster: Cluster) -> None:
    stack, db = cluster.stack, cluster.stack.db
    cluster.shared_workers(2)
    payload = sleep_payload(0.2, request_id="e2e-repeat-1")
    first = submit_task(stack, payload)
    second = submit_task(stack, payload)
    assert first == second
    wait_state(db, first, "completed", timeout=RESULT_TIMEOUT)
    assert events(db, first) == _expected_log(1)


def test_duplicated_run_apply_message_runs_once(cluster: Cluster) -> None:
    """Scenario 4: the same run_apply message delivered twice: one redeems and completes, the
    other ends quietly with outcome 'not_redeemed' and writes nothing."""
    stack, db = cluster.stack, cluster.stack.db
    cluster.shared_workers(2)
    lease = dispatched_apply(db, 0.5, 0.5)  # a real lease, not yet sent to anyone
    apply_id = lease.apply_id
    kwargs = {"apply_id": apply_id, "lease": lease.to_json()}
    sent = [stack.client.send_task(RUN_APPLY, kwargs=kwargs) for _ in range(2)]
    results = [r.get(timeout=RESULT_TIMEOUT) for r in sent]

    outcomes = sorted(r["outcome"] for r in results)
    assert outcomes == ["completed", "not_redeemed"], results
    assert events(db, apply_id) == _expected_log(2)
    assert_completed_once(db, apply_id)
    redeemed = [e for e in logs(db, apply_id) if e.event == "redeemed"]
    assert len(redeemed) == 1
    winner = next(r for r, res in zip(sent, results, strict=True) if res["outcome"] == "completed")
    assert owner_task_id(redeemed[0].message.rsplit(" by ", 1)[1]) == winner.id


def _bad_messages(
    apply_id: int, other: Lease, current: Lease
) -> list[tuple[str, dict[str, Any], str]]:
    """(task name, kwargs, a fragment of the expected error) for messages other apps might send."""
    good = sleep_payload(0.1)
    forged_token = mint_token()
    return [
        # run_apply with wrong types
        (RUN_APPLY, {"apply_id": str(apply_id), "lease": current.to_json()}, "apply_id must be"),
        (RUN_APPLY, {"apply_id": apply_id, "lease": current.token}, "lease must be a JSON object"),
        (
            RUN_APPLY,
            {"apply_id": apply_id, "lease": {**current.to_json(), "epoch": "1"}},
            "lease epoch must be an integer",
        ),
        (
            RUN_APPLY,
            {"apply_id": apply_id, "lease": {**current.to_json(), "token": "0" * 31}},
            "lease token must be 32 lowercase hex",
        ),
        (RUN_APPLY, {"apply_id": apply_id}, "lease"),
        # run_apply for an apply that does not exist
        (
            RUN_APPLY,
            {"apply_id": 987654, "lease": Lease(987654, 1, forged_token).to_json()},
            "apply 987654 does not exist",
        ),
        # run_apply with a lease for another apply
        (RUN_APPLY, {"apply_id": apply_id, "lease": other.to_json()}, "lease is for apply"),
        # submit_apply: unknown keys, wrong types, oversize
        ("leasehold.submit_apply", {**good, "priority": 1}, "unknown payload keys"),
        ("leasehold.submit_apply", {**good, "tasks": "ALTER TABLE t"}, "tasks must be a list"),
        ("leasehold.submit_apply", {**good, "database": 5}, "database must be a str"),
        (
            "leasehold.submit_apply",
            {**good, "tasks": [{"table": "t", "ddl": "x" * 300_000, "options": {}}]},
            "the limit is 262144",
        ),
        (
            "leasehold.submit_apply",
            {**good, "tasks": [{"table": "t", "ddl": "x", "options": {"seconds": "1"}}]},
            "options.seconds must be a number",
        ),
        # control_apply with a bad action, a wrong type, an unknown apply
        ("leasehold.control_apply", {"apply_id": apply_id, "action": "destroy"}, "action must be"),
        ("leasehold.control_apply", {"apply_id": [apply_id], "action": "stop"}, "apply_id must"),
        ("leasehold.control_apply", {"apply_id": 987654, "action": "stop"}, "does not exist"),
    ]


def test_bad_messages_fail_clearly_and_write_nothing(cluster: Cluster) -> None:
    """Scenario 8: messages from other apps with wrong types, unknown keys, an unknown apply, a
    forged lease, a lease for another apply, an oversize payload or a bad action: each fails
    with a clear error in its result, and no leasehold table changes."""
    stack, db = cluster.stack, cluster.stack.db
    cluster.shared_workers(2)
    current = dispatched_apply(db, 0.1)  # dispatched, never sent: nobody redeems it
    other = dispatched_apply(db, 0.1)
    apply_id = current.apply_id
    before = support.snapshot(db)

    cases = _bad_messages(apply_id, other, current)
    sent = [
        (name, kwargs, fragment, stack.client.send_task(name, kwargs=kwargs))
        for name, kwargs, fragment in cases
    ]
    failures = []
    for name, kwargs, fragment, result in sent:
        error = result.get(timeout=RESULT_TIMEOUT, propagate=False)
        if result.state != "FAILURE" or fragment not in str(error):
            failures.append(f"{name}({str(kwargs)[:120]}): {result.state} {error!r}")
    assert not failures, "\n".join(failures)

    # Forged leases (right shape, never issued: a later epoch, or the current epoch with a
    # made-up token; every epoch has one token) fail clearly, writing nothing.
    forged = [
        Lease(apply_id, current.epoch + 1, mint_token()),
        Lease(apply_id, current.epoch, mint_token()),
    ]
    refused = [
        stack.client.send_task(RUN_APPLY, kwargs={"apply_id": apply_id, "lease": lease.to_json()})
        for lease in forged
    ]
    for result in refused:
        error = result.get(timeout=RESULT_TIMEOUT, propagate=False)
        assert result.state == "FAILURE", (result.state, error)
        assert "was never issued" in str(error), error
    assert support.snapshot(db) == before
    assert row(db, apply_id)["state"] == "dispatched"
