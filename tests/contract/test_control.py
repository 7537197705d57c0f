"""Control requests for applies with no owner (``leases.control.settle_unowned``) and the public
``service.control_apply``, on both backends: a CAS on the apply's state, completed in the same
transaction; a running apply's request stays pending for its owner."""

from __future__ import annotations

from typing import Any

import pytest

from leases import Lease, dispatch, fence, redeem
from leases.control import settle_unowned
from storage import applies, control, fenced
from storage.database import Database
from storage.errors import ApplyNotFound, InvalidInput, LeaseLost
from storage.states import ApplyState, ControlAction, ControlState, TaskState
from tasks import service
from tests import support
from tests.celery_fixtures import SentLeases, run_lease, sleep_apply, task_rows
from tests.support import release


def _control(db: Database, apply_id: Any, action: Any, by: Any = "ops") -> dict[str, Any]:
    return service.control_apply(db, apply_id, action, by, _sent)


_sent = SentLeases()


@pytest.fixture(autouse=True)
def _fresh_sent() -> None:
    _sent.leases.clear()


def _stage(db: Database, state: str) -> tuple[int, Lease | None]:
    """An apply of three tasks in ``state``, with the lease outstanding for it (if any)."""
    apply_id = sleep_apply(db, (0.01, 0.01, 0.01))
    if state == "queued":
        return apply_id, None
    if state == "pending":  # left by a leasehold older than lines
        support.set_state(db, apply_id, state)
        return apply_id, None
    lease = dispatch(db, apply_id)
    if state == "dispatched":
        return apply_id, lease
    redeem(db, lease, "worker-1")
    if state == "running":
        return apply_id, lease
    release(db, lease, to_state=ApplyState(state), reason=f"test: {state}")
    return apply_id, None


def _apply_row(db: Database, apply_id: int) -> dict[str, Any]:
    row = dict(applies.get(db, apply_id))
    row.pop("heartbeat_age")  # moves with the clock
    return row


def _requests(db: Database, apply_id: int) -> list[tuple[Any, ...]]:
    return [r for r in support.snapshot(db)["control_requests"] if r[1] == apply_id]


@pytest.mark.parametrize("state", ["queued", "pending", "dispatched"])
def test_stop_without_an_owner_stops_and_rotates(db: Database, state: str) -> None:
    apply_id, outstanding = _stage(db, state)
    _, epoch, token, _ = support.lease_of(db, apply_id)
    result = _control(db, apply_id, "stop")
    assert result["apply_id"] == apply_id
    assert result["action"] == "stop"
    assert (result["request_state"], result["apply_state"], result["error"]) == (
        "completed",
        "stopped",
        None,
    )
    request = control.get(db, result["request_id"])
    assert (request.action, request.state) == (ControlAction.STOP, ControlState.COMPLETED)
    new_state, new_epoch, new_token, owner = support.lease_of(db, apply_id)
    assert (new_state, new_epoch, owner) == ("stopped", epoch + 1, None)
    assert new_token is not None
    assert new_token != token
    assert support.log_events(db, apply_id)[-1] == (new_epoch, "stopped")
    assert _sent.leases == []
    assert [t["state"] for t in task_rows(db, apply_id)] == ["pending"] * 3
    if outstanding is not None:
        before = support.snapshot(db)
        with pytest.raises(LeaseLost):
            redeem(db, outstanding, "late-worker")  # the message still in the broker
        assert support.snapshot(db) == before


def test_stop_of_a_stopped_apply_is_a_completed_no_op(db: Database) -> None:
    apply_id, _ = _stage(db, "stopped")
    before = _apply_row(db, apply_id)
    logs = support.log_events(db, apply_id)
    result = _control(db, apply_id, "stop")
    assert (result["request_state"], result["apply_state"], result["error"]) == (
        "completed",
        "stopped",
        None,
    )
    assert _apply_row(db, apply_id) == before
    assert support.log_events(db, apply_id) == logs


@pytest.mark.parametrize(
    ("state", "action", "error"),
    [
        ("completed", "stop", "apply is completed: nothing to stop"),
        ("failed", "stop", "apply is failed: nothing to stop"),
        ("cancelled", "stop", "apply is cancelled: nothing to stop"),
        ("completed", "cancel", "apply is completed: nothing to cancel"),
        ("cancelled", "cancel", "apply is cancelled: nothing to cancel"),
        ("completed", "resume", "apply is completed, not stopped: nothing to resume"),
        ("queued", "resume", "apply is queued, not stopped: nothing to resume"),
        ("dispatched", "resume", "apply is dispatched, not stopped: nothing to resume"),
        ("running", "resume", "apply is running, not stopped: nothing to resume"),
    ],
)
def test_a_request_that_cannot_apply_fails_with_a_clear_error(
    db: Database, state: str, action: str, error: str
) -> None:
    apply_id, _ = _stage(db, state)
    before = _apply_row(db, apply_id)
    tasks = task_rows(db, apply_id)
    logs = support.log_events(db, apply_id)
    result = _control(db, apply_id, action)
    assert (result["request_state"], result["apply_state"], result["error"]) == (
        "failed",
        state,
        error,
    )
    request = control.get(db, result["request_id"])
    assert (request.state, request.error) == (ControlState.FAILED, error)
    assert _apply_row(db, apply_id) == before
    assert task_rows(db, apply_id) == tasks
    assert support.log_events(db, apply_id) == logs
    assert _sent.leases == []
    # A failed request is not pending: the next one is a new request.
    assert _control(db, apply_id, action)["request_id"] != result["request_id"]


@pytest.mark.parametrize("state", ["queued", "pending", "dispatched", "stopped"])
def test_cancel_without_an_owner_cancels_the_apply_and_its_tasks(db: Database, state: str) -> None:
    apply_id, outstanding = _stage(db, state)
    _, epoch, _, _ = support.lease_of(db, apply_id)
    result = _control(db, apply_id, "cancel")
    assert (result["request_state"], result["apply_state"]) == ("completed", "cancelled")
    row = applies.get(db, apply_id)
    assert (row["state"], row["lease_epoch"], row["lease_owner"]) == ("cancelled", epoch + 1, None)
    assert row["finished_at"] is not None
    for task in task_rows(db, apply_id):
        assert (task["state"], task["lease_epoch"]) == ("cancelled", epoch + 1)
        assert task["finished_at"] is not None
    assert support.log_events(db, apply_id)[-1] == (epoch + 1, "cancelled")
    if outstanding is not None:
        with pytest.raises(LeaseLost):
            redeem(db, outstanding, "late-worker")


def test_cancel_keeps_completed_tasks_completed(db: Database) -> None:
    apply_id = sleep_apply(db, (0.01, 0.01))
    lease = run_lease(db, apply_id)
    first = task_rows(db, apply_id)[0]["id"]
    with fence(db, lease) as fx:
        fenced.finish_task(fx, first, TaskState.COMPLETED)
    release(db, lease, reason="test: stopped")
    _control(db, apply_id, "cancel")
    assert [t["state"] for t in task_rows(db, apply_id)] == ["completed", "cancelled"]


def test_resume_of_a_stopped_apply_dispatches_a_new_lease(db: Database) -> None:
    apply_id, _ = _stage(db, "stopped")
    _, epoch, _, _ = support.lease_of(db, apply_id)
    result = _control(db, apply_id, "resume")
    assert (result["request_state"], result["apply_state"]) == ("completed", "dispatched")
    (lease,) = _sent.leases
    state, new_epoch, token, owner = support.lease_of(db, apply_id)
    assert (state, new_epoch, token, owner) == ("dispatched", epoch + 1, lease.token, None)
    assert (lease.apply_id, lease.epoch) == (apply_id, epoch + 1)
    assert support.log_events(db, apply_id)[-1] == (epoch + 1, "resumed")
    redeem(db, lease, "worker-2")  # the lease sent to a worker is good
    assert support.lease_of(db, apply_id)[0] == "running"


def test_stop_then_resume_of_a_dispatched_apply(db: Database) -> None:
    apply_id, first = _stage(db, "dispatched")
    _control(db, apply_id, "stop")
    _control(db, apply_id, "resume")
    (second,) = _sent.leases
    assert first is not None
    assert second.epoch == first.epoch + 2
    with pytest.raises(LeaseLost):
        redeem(db, first, "late-worker")
    redeem(db, second, "worker-2")


@pytest.mark.parametrize("action", ["stop", "cancel"])
def test_a_running_apply_keeps_the_request_pending_for_its_owner(db: Database, action: str) -> None:
    apply_id, lease = _stage(db, "running")
    before = support.snapshot(db)
    result = _control(db, apply_id, action)
    assert (result["request_state"], result["apply_state"], result["error"]) == (
        "pending",
        "running",
        None,
    )
    after = support.snapshot(db)
    assert {k: v for k, v in after.items() if k != "control_requests"} == {
        k: v for k, v in before.items() if k != "control_requests"
    }
    assert [r.id for r in control.pending(db, apply_id)] == [result["request_id"]]
    assert _sent.leases == []
    # A duplicate while it is pending returns the same request, not a second one.
    again = _control(db, apply_id, action, by="someone-else")
    assert again["request_id"] == result["request_id"]
    assert again["request_state"] == "pending"
    assert len(_requests(db, apply_id)) == 1
    # The owner's lease is untouched.
    assert lease is not None
    assert support.lease_of(db, apply_id)[1:3] == (lease.epoch, lease.token)


def test_a_pending_request_is_settled_once_the_owner_is_gone(db: Database) -> None:
    """The owner died with the stop pending; its lease was released (as a stop by it would)."""
    apply_id, lease = _stage(db, "running")
    assert lease is not None
    pending = _control(db, apply_id, "cancel")
    release(db, lease, reason="test: the owner stopped without acting on it")
    again = _control(db, apply_id, "cancel")
    assert again["request_id"] == pending["request_id"]
    assert (again["request_state"], again["apply_state"]) == ("completed", "cancelled")
    assert control.pending(db, apply_id) == []


def test_settle_unowned_directly(db: Database) -> None:
    apply_id, _ = _stage(db, "stopped")
    request, created = control.request(db, apply_id, ControlAction.RESUME, requested_by=None)
    assert created
    settled = settle_unowned(db, request)
    assert settled.apply_state == ApplyState.DISPATCHED
    assert settled.request.state == ControlState.COMPLETED
    assert settled.lease is not None
    assert settled.lease.epoch == support.lease_of(db, apply_id)[1]


REAL = object()  # stands for the id of a real apply

BAD = [
    pytest.param(REAL, "pause", "ops", InvalidInput, "action must be one of", id="action-unknown"),
    pytest.param(REAL, "STOP", "ops", InvalidInput, "action must be one of", id="action-case"),
    pytest.param(REAL, 1, "ops", InvalidInput, "action must be one of", id="action-int"),
    pytest.param(REAL, None, "ops", InvalidInput, "action must be one of", id="action-null"),
    pytest.param(REAL, ["stop"], "ops", InvalidInput, "action must be one of", id="action-list"),
    pytest.param("1", "stop", "ops", InvalidInput, "apply_id must be a positive", id="id-str"),
    pytest.param(True, "stop", "ops", InvalidInput, "apply_id must be a positive", id="id-bool"),
    pytest.param(0, "stop", "ops", InvalidInput, "apply_id must be a positive", id="id-zero"),
    pytest.param(-3, "stop", "ops", InvalidInput, "apply_id must be a positive", id="id-neg"),
    pytest.param(1.0, "stop", "ops", InvalidInput, "apply_id must be a positive", id="id-float"),
    pytest.param(2**63, "stop", "ops", InvalidInput, "apply_id must be a positive", id="id-huge"),
    pytest.param(None, "stop", "ops", InvalidInput, "apply_id must be a positive", id="id-null"),
    pytest.param(REAL, "stop", 7, InvalidInput, "requested_by must be a string", id="by-int"),
    pytest.param(REAL, "stop", "x" * 256, InvalidInput, "1 to 255 characters", id="by-long"),
    pytest.param(REAL, "stop", "ops\nstop by root", InvalidInput, "printable", id="by-newline"),
    pytest.param(987654, "stop", "ops", ApplyNotFound, "apply 987654 does not exist", id="unknown"),
]


@pytest.mark.parametrize(("apply_id", "action", "by", "error", "message"), BAD)
def test_bad_requests_are_refused_and_write_nothing(
    db: Database, apply_id: Any, action: Any, by: Any, error: type[Exception], message: str
) -> None:
    real, _ = _stage(db, "dispatched")
    if apply_id is REAL:
        apply_id = real
    before = support.snapshot(db)
    with pytest.raises(error, match=message):
        _control(db, apply_id, action, by=by)
    assert support.snapshot(db) == before
    assert _sent.leases == []
