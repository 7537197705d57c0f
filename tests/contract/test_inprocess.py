"""The public Celery tasks, driven by name through an in-process worker (``start_worker``, threads
pool) on the memory broker and the in-memory result backend, against real SQLite and MariaDB.

One worker per backend serves the whole module: starting and stopping one costs seconds (the
consumer drains with a 2 s timeout), so every test leaves no run in flight for the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery.result import AsyncResult
from sqlalchemy import update

from leases import Lease, dispatch, mint_token, redeem
from storage import applies, control, open_database
from storage.database import Database
from storage.states import ControlState
from storage.tables import apply_tasks
from tasks import runtime
from tasks.app import app
from tests import support
from tests.celery_fixtures import inprocess_worker, sleep_apply, task_rows, wait_until
from tests.conftest import STORE_FIXTURES
from tests.support import hand_back

RESULT_TIMEOUT = 20.0
RUN_APPLY = "leasehold.run_apply"
SUBMIT = "leasehold.submit_apply"
CONTROL = "leasehold.control_apply"
RECLAIM = "leasehold.reclaim_stale_applies"


@pytest.fixture(scope="module", params=list(STORE_FIXTURES))
def worker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    url = str(request.getfixturevalue(STORE_FIXTURES[request.param]))
    with inprocess_worker(url):
        yield url


@pytest.fixture
def db(worker_url: str) -> Iterator[Database]:
    """The worker's database, emptied; no run may still be in flight when the test ends."""
    database = open_database(worker_url)
    support.wipe(database)
    yield database
    try:
        wait_until(lambda: not runtime._runs, what="the worker's runs to end")
    finally:
        database.dispose()


def send(name: str, **kwargs: Any) -> AsyncResult:
    return app.send_task(name, kwargs=kwargs)


def outcome_of(result: AsyncResult, *, propagate: bool = True) -> Any:
    return result.get(timeout=RESULT_TIMEOUT, interval=0.01, propagate=propagate)


def state_of(db: Database, apply_id: int) -> str:
    return str(applies.get(db, apply_id)["state"])


def wait_state(db: Database, apply_id: int, state: str, timeout: float = RESULT_TIMEOUT) -> None:
    wait_until(
        lambda: state_of(db, apply_id) == state,
        timeout=timeout,
        what=f"apply {apply_id} to be {state} (is {state_of(db, apply_id)})",
    )


def payload(*seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "database": "shop",
        "environment": "staging",
        "engine": "sleep",
        "tasks": [
            {"table": f"t{i}", "ddl": f"ALTER TABLE t{i} ADD c INT", "options": {"seconds": s}}
            for i, s in enumerate(seconds)
        ],
        **extra,
    }


def run(lease: Lease, apply_id: int | None = None) -> AsyncResult:
    return send(
        RUN_APPLY,
        apply_id=lease.apply_id if apply_id is None else apply_id,
        lease=lease.to_json(),
    )


def test_submit_runs_to_completion(db: Database) -> None:
    result = send(SUBMIT, **payload(0.05, 0.05, request_id="inproc-1"))
    apply_id = outcome_of(result)["apply_id"]
    assert result.state == "SUCCESS"
    wait_state(db, apply_id, "completed")
    assert [t["state"] for t in task_rows(db, apply_id)] == ["completed", "completed"]
    events = support.log_events(db, apply_id)
    assert events == [
        (1, "dispatched"),
        (1, "redeemed"),
        (1, "task_started"),
        (1, "task_completed"),
        (1, "task_started"),
        (1, "task_completed"),
        (2, "completed"),
    ]
    # A repeated submission (same request_id) returns the same apply and runs nothing again.
    before = support.snapshot(db)
    again = send(SUBMIT, **payload(0.05, 0.05, request_id="inproc-1"))
    assert outcome_of(again) == {"apply_id": apply_id}
    assert support.snapshot(db) == before


def test_a_duplicated_run_apply_message_runs_once(db: Database) -> None:
    apply_id = sleep_apply(db, (0.2,))
    lease = dispatch(db, apply_id)
    first, second = run(lease), run(lease)
    outcomes = sorted(outcome_of(r)["outcome"] for r in (first, second))
    assert outcomes == ["completed", "not_redeemed"]
    assert [ev for _, ev in support.log_events(db, apply_id)].count("redeemed") == 1
    assert [ev for _, ev in support.log_events(db, apply_id)].count("task_started") == 1
    # And once more, long after: still nothing.
    before = support.snapshot(db)
    late = outcome_of(run(lease))
    assert late == {"apply_id": apply_id, "epoch": lease.epoch, "outcome": "not_redeemed"}
    assert support.snapshot(db) == before


def test_bad_messages_fail_clearly_and_write_nothing(db: Database) -> None:
    apply_id, other_id = sleep_apply(db, (0.05,)), sleep_apply(db, (0.05,))
    current = dispatch(db, apply_id)  # dispatched but never sent: nobody redeems it
    other = dispatch(db, other_id)
    good = current.to_json()
    before = support.snapshot(db)
    cases: list[tuple[str, dict[str, Any], str]] = [
        (RUN_APPLY, {"apply_id": str(apply_id), "lease": good}, "apply_id must be a positive"),
        (RUN_APPLY, {"apply_id": True, "lease": good}, "apply_id must be a positive integer"),
        (RUN_APPLY, {"apply_id": apply_id, "lease": "token"}, "lease must be a JSON object"),
        (RUN_APPLY, {"apply_id": apply_id, "lease": {**good, "x": 1}}, "unknown ['x']"),
        (
            RUN_APPLY,
            {"apply_id": apply_id, "lease": {k: v for k, v in good.items() if k != "token"}},
            "missing ['token']",
        ),
        (RUN_APPLY, {"apply_id": apply_id, "lease": {**good, "token": 7}}, "32 lowercase hex"),
        (RUN_APPLY, {"apply_id": apply_id, "lease": {**good, "epoch": "1"}}, "epoch must be an"),
        (
            RUN_APPLY,
            {"apply_id": apply_id, "lease": {**good, "token": good["token"].upper()}},
            "32 lowercase hex",
        ),
        (
            RUN_APPLY,
            {"apply_id": 987654, "lease": Lease(987654, 1, mint_token()).to_json()},
            "apply 987654 does not exist",
        ),
        (
            RUN_APPLY,
            {"apply_id": apply_id, "lease": other.to_json()},
            f"lease is for apply {other_id}, not {apply_id}",
        ),
        (RUN_APPLY, {"apply_id": apply_id, "lease": good, "extra": 1}, "unexpected keyword"),
        (SUBMIT, {**payload(0.1), "callback": "http://x"}, "unknown payload keys: ['callback']"),
        (SUBMIT, {**payload(0.1), "database": 5}, "database must be a str, not int"),
        (SUBMIT, {**payload(0.1), "tasks": []}, "tasks must hold 1 to 100 entries"),
        (SUBMIT, {**payload(0.1), "environment": "e" * 300_000}, "the limit is 262144"),
        (CONTROL, {"apply_id": apply_id, "action": "destroy"}, "action must be one of"),
        (CONTROL, {"apply_id": [apply_id], "action": "stop"}, "apply_id must be a positive"),
        (CONTROL, {"apply_id": 987654, "action": "stop"}, "apply 987654 does not exist"),
    ]
    sent = [(name, kwargs, fragment, send(name, **kwargs)) for name, kwargs, fragment in cases]
    wrong = []
    for name, kwargs, fragment, result in sent:
        error = outcome_of(result, propagate=False)
        if result.state != "FAILURE" or fragment not in str(error):
            wrong.append(f"{name}({str(kwargs)[:100]}): {result.state} {error!r}")
    assert not wrong, "\n".join(wrong)
    assert support.snapshot(db) == before

    # A lease with the right shape that was never issued (a later epoch, or the current epoch
    # with a made-up token) is refused by the redemption CAS and fails as never issued, writing
    # nothing. (Only an older epoch is indistinguishable from a stale message.)
    for forged in (
        Lease(apply_id, current.epoch + 1, mint_token()),
        Lease(apply_id, current.epoch, mint_token()),
    ):
        result = run(forged)
        error = outcome_of(result, propagate=False)
        assert result.state == "FAILURE"
        assert "was never issued" in str(error)
    assert support.snapshot(db) == before
    assert state_of(db, apply_id) == "dispatched"


def test_progress_is_visible_while_running_then_stop_and_resume(db: Database) -> None:
    """The second task sleeps 60 s, so the stop lands inside it however slow the machine is (a
    stop takes effect at the owner's next heartbeat and safe point). Before the resume its
    checkpoint is moved to 0.1 s before its end, as if it had run that long: the resumed run then
    completes within ``RESULT_TIMEOUT`` only because it continues from the checkpoint."""
    apply_id = sleep_apply(db, (0.05, 60.0))
    lease = dispatch(db, apply_id)
    result = run(lease)

    def progress_on_second_task() -> dict[str, Any] | None:
        info = result.info
        if result.state == "PROGRESS" and info["task"] == 2 and info["percent"] > 0:
            return dict(info)
        return None

    info = wait_until(progress_on_second_task, timeout=RESULT_TIMEOUT, what="PROGRESS meta")
    assert info["apply_id"] == apply_id
    assert info["epoch"] == lease.epoch
    assert (info["task"], info["tasks"], info["table"]) == (2, 2, "t1")
    assert 0 < info["percent"] < 100

    stop = send(CONTROL, apply_id=apply_id, action="stop", requested_by="ops")
    answer = outcome_of(stop)
    assert (answer["request_state"], answer["apply_state"]) == ("pending", "running")
    outcome = outcome_of(result)
    assert outcome == {
        "apply_id": apply_id,
        "epoch": lease.epoch,
        "outcome": "stopped",
        "error": None,
    }
    assert state_of(db, apply_id) == "stopped"
    assert control.get(db, answer["request_id"]).state == ControlState.COMPLETED
    stopped_task = task_rows(db, apply_id)[1]
    assert stopped_task["state"] == "pending"
    assert 0 < stopped_task["checkpoint"]["elapsed"] < 60
    with db.transaction() as conn:
        conn.execute(
            update(apply_tasks)
            .where(apply_tasks.c.id == stopped_task["id"])
            .values(checkpoint={"elapsed": 59.9})
        )

    resumed = outcome_of(send(CONTROL, apply_id=apply_id, action="resume"))
    assert (resumed["request_state"], resumed["apply_state"]) == ("completed", "dispatched")
    wait_state(db, apply_id, "completed")
    events = support.log_events(db, apply_id)
    resumed_epoch = lease.epoch + 2  # stopped at +1, dispatched again at +2
    assert [ev for e, ev in events if e == resumed_epoch].count("task_started") == 1  # t1 only
    epochs = [e for e, _ in events]
    assert epochs == sorted(epochs)


def test_a_rotation_mid_run_ends_the_task_lease_lost(db: Database) -> None:
    apply_id = sleep_apply(db, (10.0,))
    lease = dispatch(db, apply_id)
    result = run(lease)
    wait_until(lambda: result.state == "PROGRESS", timeout=RESULT_TIMEOUT, what="PROGRESS")
    new = hand_back(db, lease, reason="test: another party rotates")
    after_rotation = support.snapshot(db)
    wait_until(lambda: result.state == "LEASE_LOST", timeout=RESULT_TIMEOUT, what="LEASE_LOST")
    info = result.info
    assert (info["apply_id"], info["epoch"]) == (apply_id, lease.epoch)
    assert f"current epoch {new.epoch}" in info["reason"]
    wait_until(lambda: not runtime._runs, what="the run to end")
    assert support.snapshot(db) == after_rotation
    assert result.state == "LEASE_LOST"  # final: not overwritten by a success or failure


def test_handover_passes_the_apply_to_the_next_run(db: Database) -> None:
    """What a warm shutdown does (``runtime.hand_back_all``): the running apply stops at a safe
    point, its new lease is sent at once, and a worker resumes it from its checkpoint."""
    apply_id = sleep_apply(db, (3.0,))  # long enough to be running still at hand_back_all()
    lease = dispatch(db, apply_id)
    result = run(lease)
    wait_until(lambda: result.state == "PROGRESS", timeout=RESULT_TIMEOUT, what="PROGRESS")
    assert runtime.hand_back_all() == 1
    outcome = outcome_of(result)
    assert outcome["outcome"] == "dispatched"
    wait_state(db, apply_id, "completed")
    events = support.log_events(db, apply_id)
    assert (lease.epoch + 1, "handed_back") in events
    assert (lease.epoch + 1, "redeemed") in events
    assert events[-1] == (lease.epoch + 2, "completed")


def test_reclaim_task_rotates_a_silent_apply_and_a_worker_finishes_it(db: Database) -> None:
    apply_id = sleep_apply(db, (0.05,))
    silent = dispatch(db, apply_id)
    redeem(db, silent, "dead-worker")
    support.age_heartbeat(db, apply_id, 60)  # stale_after is 5 s in this worker
    assert outcome_of(send(RECLAIM)) == 1
    wait_state(db, apply_id, "completed")
    events = support.log_events(db, apply_id)
    assert (silent.epoch + 1, "reclaimed") in events
    assert applies.get(db, apply_id)["reclaim_count"] == 1
    assert outcome_of(send(RECLAIM)) == 0


def test_control_of_an_apply_without_owner(db: Database) -> None:
    apply_id = sleep_apply(db, (0.05,))
    outstanding = dispatch(db, apply_id)
    answer = outcome_of(send(CONTROL, apply_id=apply_id, action="cancel"))
    assert (answer["request_state"], answer["apply_state"]) == ("completed", "cancelled")
    assert [t["state"] for t in task_rows(db, apply_id)] == ["cancelled"]
    before = support.snapshot(db)
    assert outcome_of(run(outstanding))["outcome"] == "not_redeemed"
    assert support.snapshot(db) == before


def test_get_apply_by_name_reads_and_refuses_bad_ids(db: Database) -> None:
    apply_id = outcome_of(send(SUBMIT, **payload(0.05)))["apply_id"]
    wait_state(db, apply_id, "completed")
    before = support.snapshot(db)
    view = outcome_of(send("leasehold.get_apply", apply_id=apply_id))
    assert (view["apply_id"], view["state"], view["epoch"]) == (apply_id, "completed", 2)
    assert view["tasks"] == [{"table": "t0", "state": "completed", "progress": 100}]
    for kwargs, fragment in (
        ({"apply_id": 987654}, "apply 987654 does not exist"),
        ({"apply_id": "1"}, "apply_id must be a positive integer"),
        ({"apply_id": 1, "extra": 2}, "unexpected keyword"),
    ):
        result = send("leasehold.get_apply", **kwargs)
        error = outcome_of(result, propagate=False)
        assert result.state == "FAILURE"
        assert fragment in str(error)
    assert support.snapshot(db) == before
