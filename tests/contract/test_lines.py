"""Lines (issue 7): at most one apply per (database, environment) is dispatched or running; the
others wait, ``queued``, in submission order; each starts in the transaction that ends the one
before it. And every control request ends. On real SQLite and MariaDB.

Deterministic interleavings of these transitions are in ``test_line_races.py``.
"""

from __future__ import annotations

import pytest

import leases
from leases import Lease, fence, mint_token, redeem
from leases.control import settle_unowned
from storage import applies, control, fenced
from storage.applies import NewApply, NewTask
from storage.database import Database
from storage.errors import InvalidTransition, LeaseLost
from storage.states import ApplyState, ControlAction, ControlState
from tasks import service
from tasks.engines.sleep import SleepEngine
from tasks.interrupts import Interrupts, Reason
from tasks.runner import ApplyRunner
from tasks.settings import Settings
from tests import support
from tests.celery_fixtures import RecordingReporter, SentLeases


def new(database: str, *, seconds: float = 0.01, request_id: str | None = None) -> NewApply:
    return NewApply(
        database_name=database,
        environment="production",
        engine="sleep",
        tasks=[NewTask("orders", "ALTER TABLE orders ADD c INT", {"seconds": seconds})],
        request_id=request_id,
    )


def state(db: Database, apply_id: int) -> str:
    return str(applies.get(db, apply_id)["state"])


def states(db: Database, *ids: int) -> list[str]:
    return [state(db, i) for i in ids]


def line_of_three(db: Database) -> tuple[Lease, int, int]:
    """A running apply (its lease) with two queued behind it, on one database."""
    database = support.new_database()
    first = leases.submit(db, new(database))
    assert first.lease is not None
    redeem(db, first.lease, "worker-1")
    second, third = leases.submit(db, new(database)), leases.submit(db, new(database))
    assert (second.lease, third.lease) == (None, None)
    return first.lease, second.apply_id, third.apply_id


def finish(db: Database, lease: Lease, to_state: ApplyState = ApplyState.COMPLETED) -> Lease | None:
    """What the runner's terminal transaction does; returns the successor's lease, if any."""
    token = mint_token()
    with fence(db, lease, finishing=True) as fx:
        done = fenced.finish(
            fx,
            new_token=mint_token(),
            successor_token=token,
            to_state=to_state,
            event=str(to_state),
            reason="tests",
        )
    if done.successor is None:
        return None
    return Lease(done.successor.apply_id, done.successor.epoch, token)


def _settings(db: Database, **overrides: object) -> Settings:
    return support.settings(str(db.engine.url), **overrides)


# --- submit ---------------------------------------------------------------------------------------


def test_submit_takes_a_free_line_and_queues_behind_a_busy_one(db: Database) -> None:
    database = support.new_database()
    first = leases.submit(db, new(database))
    assert first.created
    assert first.lease is not None
    assert (first.lease.apply_id, first.lease.epoch) == (first.apply_id, 1)
    assert support.lease_of(db, first.apply_id)[:2] == ("dispatched", 1)
    assert support.log_events(db, first.apply_id) == [(1, "dispatched")]

    second = leases.submit(db, new(database))
    assert (second.created, second.lease) == (True, None)
    assert support.lease_of(db, second.apply_id) == ("queued", 0, None, None)
    (queued,) = applies.logs(db, second.apply_id)
    assert (queued["lease_epoch"], queued["event"]) == (0, "queued")
    assert queued["message"] == (
        f"queued on {database}/production: #2 in line, behind apply {first.apply_id} (dispatched)"
    )
    place = applies.place(db, second.apply_id)
    assert place is not None
    assert (place.position, place.head.apply_id) == (2, first.apply_id)
    assert applies.place(db, first.apply_id) is None  # the head is not waiting

    # Another environment of the same database is another line.
    staging = leases.submit(db, _staging(database))
    assert staging.lease is not None


def _staging(database: str) -> NewApply:
    return NewApply(
        database_name=database,
        environment="staging",
        engine="sleep",
        tasks=[NewTask("orders", "ALTER TABLE orders ADD c INT")],
    )


def test_a_repeated_submit_returns_the_same_apply_and_dispatches_nothing(db: Database) -> None:
    database = support.new_database()
    first = leases.submit(db, new(database, request_id="deploy-1"))
    before = support.snapshot(db)
    again = leases.submit(db, new(database, request_id="deploy-1"))
    assert (again.apply_id, again.created, again.lease) == (first.apply_id, False, None)
    assert support.snapshot(db) == before


def test_dispatch_refuses_an_apply_behind_another(db: Database) -> None:
    running, second, _ = line_of_three(db)
    before = support.snapshot(db)
    with pytest.raises(InvalidTransition, match=f"apply {running.apply_id} .running. is ahead"):
        leases.dispatch(db, second)
    assert support.snapshot(db) == before


def test_the_lease_table_shows_each_waiting_apply_s_place(db: Database) -> None:
    running, second, third = line_of_three(db)
    rows = {int(r["id"]): r for r in applies.lease_table(db)}
    assert rows[running.apply_id]["line_position"] is None
    assert (rows[second]["line_position"], rows[third]["line_position"]) == (2, 3)


# --- the end of an apply passes the turn on -------------------------------------------------------


@pytest.mark.parametrize(
    "to_state", [ApplyState.COMPLETED, ApplyState.FAILED, ApplyState.CANCELLED]
)
def test_finishing_dispatches_the_next_apply_in_the_same_transaction(
    db: Database, to_state: ApplyState
) -> None:
    running, second, third = line_of_three(db)
    successor = finish(db, running, to_state)
    assert successor is not None
    assert (successor.apply_id, successor.epoch) == (second, 1)
    assert states(db, running.apply_id, second, third) == [to_state, "dispatched", "queued"]
    assert support.log_events(db, second) == [(0, "queued"), (1, "dispatched")]
    redeem(db, successor, "worker-2")  # the lease minted in the finishing transaction is good


def test_a_finishing_transaction_that_rolls_back_passes_nothing_on(db: Database) -> None:
    running, second, _ = line_of_three(db)
    before = support.snapshot(db)

    def finish_then_fail() -> None:
        with fence(db, running, finishing=True) as fx:
            fenced.finish(
                fx,
                new_token=mint_token(),
                successor_token=mint_token(),
                to_state=ApplyState.COMPLETED,
                event="completed",
                reason="tests",
            )
            raise RuntimeError("after finish, before commit")

    with pytest.raises(RuntimeError, match="after finish"):
        finish_then_fail()
    assert support.snapshot(db) == before
    assert state(db, second) == "queued"


def test_the_runner_dispatches_the_next_apply_as_it_ends(db: Database) -> None:
    running, second, third = line_of_three(db)
    outcome = ApplyRunner(db, running, SleepEngine(), Interrupts(), RecordingReporter()).run()
    assert outcome.state == ApplyState.COMPLETED
    assert outcome.successor is not None
    assert outcome.successor.apply_id == second
    assert states(db, running.apply_id, second, third) == ["completed", "dispatched", "queued"]
    assert support.log_events(db, running.apply_id)[-1] == (running.epoch + 1, "completed")


def test_a_handover_keeps_the_turn(db: Database) -> None:
    running, second, _ = line_of_three(db)
    interrupts = Interrupts()
    interrupts.interrupt(Reason.HANDOVER)
    outcome = ApplyRunner(db, running, SleepEngine(), interrupts, RecordingReporter()).run()
    assert (outcome.state, outcome.successor) == (ApplyState.DISPATCHED, None)
    assert outcome.lease is not None
    assert states(db, running.apply_id, second) == ["dispatched", "queued"]


# --- stop, cancel and resume ----------------------------------------------------------------------


def _request(db: Database, apply_id: int, action: str) -> dict[str, object]:
    sent = SentLeases()
    result = service.control_apply(db, apply_id, action, "ops", sent)
    result["sent"] = [(lease.apply_id, lease.epoch) for lease in sent.leases]
    return result


def test_a_stopped_head_holds_its_line_until_it_is_cancelled(db: Database) -> None:
    running, second, third = line_of_three(db)
    interrupts = Interrupts()
    interrupts.interrupt(Reason.STOP)
    outcome = ApplyRunner(db, running, SleepEngine(), interrupts, RecordingReporter()).run()
    assert (outcome.state, outcome.successor) == (ApplyState.STOPPED, None)
    assert states(db, running.apply_id, second, third) == ["stopped", "queued", "queued"]
    assert leases.dispatch_waiting(db) == []  # the stopped head keeps its place

    cancelled = _request(db, running.apply_id, "cancel")
    assert (cancelled["request_state"], cancelled["apply_state"]) == ("completed", "cancelled")
    assert cancelled["sent"] == [(second, 1)]
    assert states(db, running.apply_id, second, third) == ["cancelled", "dispatched", "queued"]


def test_a_stopped_head_resumes_at_once(db: Database) -> None:
    running, second, _ = line_of_three(db)
    support.release(db, running, to_state=ApplyState.STOPPED, reason="tests: stopped")
    epoch = int(applies.get(db, running.apply_id)["lease_epoch"])
    resumed = _request(db, running.apply_id, "resume")
    assert (resumed["request_state"], resumed["apply_state"]) == ("completed", "dispatched")
    assert resumed["sent"] == [(running.apply_id, epoch + 1)]
    assert state(db, second) == "queued"


def test_stop_cancel_and_resume_of_a_waiting_apply(db: Database) -> None:
    running, second, third = line_of_three(db)
    stopped = _request(db, second, "stop")
    assert (stopped["request_state"], stopped["apply_state"], stopped["sent"]) == (
        "completed",
        "stopped",
        [],
    )
    # Resumed while the head still runs: back in line, in its place (before the third).
    resumed = _request(db, second, "resume")
    assert (resumed["request_state"], resumed["apply_state"], resumed["sent"]) == (
        "completed",
        "queued",
        [],
    )
    assert support.log_events(db, second)[-1] == (2, "resumed")
    assert (
        f"queued behind apply {running.apply_id} (running)"
        in applies.logs(db, second)[-1]["message"]
    )
    assert states(db, second, third) == ["queued", "queued"]

    # A waiting apply stopped again holds back those behind it once it heads the line.
    _request(db, second, "stop")
    assert finish(db, running) is None
    assert states(db, second, third) == ["stopped", "queued"]
    # Cancelled: the turn passes to the third.
    cancelled = _request(db, second, "cancel")
    assert (cancelled["apply_state"], cancelled["sent"]) == ("cancelled", [(third, 1)])
    assert state(db, third) == "dispatched"


def test_a_cancelled_waiting_apply_leaves_its_line(db: Database) -> None:
    running, second, third = line_of_three(db)
    cancelled = _request(db, second, "cancel")
    assert (cancelled["apply_state"], cancelled["sent"]) == ("cancelled", [])
    successor = finish(db, running)
    assert successor is not None
    assert successor.apply_id == third


# --- reclaim --------------------------------------------------------------------------------------


def test_a_reclaimed_apply_keeps_its_place(db: Database) -> None:
    running, second, _ = line_of_three(db)
    support.age_heartbeat(db, running.apply_id, 120)
    sent = SentLeases()
    assert service.reclaim_stale(db, _settings(db, stale_after=30.0), sent) == 1
    assert [(lease.apply_id, lease.epoch) for lease in sent.leases] == [
        (running.apply_id, running.epoch + 1)
    ]
    assert states(db, running.apply_id, second) == ["dispatched", "queued"]


def test_reclaim_dispatches_the_next_apply_after_an_abandoned_one(db: Database) -> None:
    running, second, third = line_of_three(db)
    stop = support.insert_control_request(db, running.apply_id, action="stop")
    support.age_heartbeat(db, running.apply_id, 120)
    sent = SentLeases()
    settings = _settings(db, stale_after=30.0, max_reclaims=0)
    assert service.reclaim_stale(db, settings, sent) == 1
    assert [(lease.apply_id, lease.epoch) for lease in sent.leases] == [(second, 1)]
    assert states(db, running.apply_id, second, third) == ["failed", "dispatched", "queued"]
    assert support.log_events(db, running.apply_id)[-1] == (running.epoch + 1, "abandoned")
    request = control.get(db, stop)
    assert (request.state, request.error) == (
        ControlState.FAILED,
        "apply failed before the stop took effect",
    )


def test_dispatch_waiting_only_reads_lines_whose_head_is_busy(db: Database) -> None:
    line_of_three(db)
    before = support.snapshot(db)
    assert leases.dispatch_waiting(db) == []
    assert support.snapshot(db) == before


# --- every request ends ---------------------------------------------------------------------------


def test_a_stop_that_arrives_as_the_apply_completes_fails_saying_so(db: Database) -> None:
    """The stop is recorded after the owner's last heartbeat looked: the apply completes, and the
    request fails in the same transaction instead of staying pending forever."""
    running, _, _ = line_of_three(db)
    requests: list[int] = []

    def stop_now(report: object) -> None:
        if not requests and getattr(report, "percent", 0) == 100:
            requests.append(support.insert_control_request(db, running.apply_id, action="stop"))

    ApplyRunner(db, running, SleepEngine(), Interrupts(), RecordingReporter(stop_now)).run()
    assert state(db, running.apply_id) == "completed"
    (request_id,) = requests
    request = control.get(db, request_id)
    assert (request.state, request.error) == (
        ControlState.FAILED,
        "apply completed before the stop took effect",
    )
    assert control.pending(db, running.apply_id) == []
    assert applies.pending_requests(db, running.apply_id) == []


def test_a_cancel_completes_and_fails_the_stop_still_pending(db: Database) -> None:
    running, _, _ = line_of_three(db)
    stop = control.request(db, running.apply_id, ControlAction.STOP, requested_by="a")[0]
    cancel = control.request(db, running.apply_id, ControlAction.CANCEL, requested_by="b")[0]
    assert [r["action"] for r in applies.pending_requests(db, running.apply_id)] == [
        "stop",
        "cancel",
    ]
    interrupts = Interrupts()
    interrupts.interrupt(Reason.CANCEL, request_id=cancel.id)
    outcome = ApplyRunner(db, running, SleepEngine(), interrupts, RecordingReporter()).run()
    assert outcome.state == ApplyState.CANCELLED
    assert control.get(db, cancel.id).state == ControlState.COMPLETED
    assert (control.get(db, stop.id).state, control.get(db, stop.id).error) == (
        ControlState.FAILED,
        "apply cancelled before the stop took effect",
    )


def test_settling_a_cancel_without_an_owner_fails_other_pending_requests(db: Database) -> None:
    running, _, _ = line_of_three(db)
    stop = support.insert_control_request(db, running.apply_id, action="stop")
    support.hand_back(db, running, reason="tests: its owner went away")  # dispatched, no owner
    cancel = control.request(db, running.apply_id, ControlAction.CANCEL, requested_by="ops")[0]
    settled = settle_unowned(db, cancel)
    assert (settled.request.state, settled.apply_state) == (
        ControlState.COMPLETED,
        ApplyState.CANCELLED,
    )
    assert control.get(db, stop).error == "apply cancelled before the stop took effect"


def test_a_late_redeem_of_a_cancelled_successor_is_refused(db: Database) -> None:
    running, second, third = line_of_three(db)
    successor = finish(db, running)
    assert successor is not None
    _request(db, second, "cancel")
    with pytest.raises(LeaseLost):
        redeem(db, successor, "late-worker")
    assert state(db, third) == "dispatched"
