"""The control request -> interrupt mapping, in one place for the runner and the heartbeat."""

from __future__ import annotations

import pytest

from storage.control import ControlRequest
from storage.errors import LeaseLost
from storage.states import ControlAction
from tasks.interrupts import Interrupts, Reason, reason_for


@pytest.mark.parametrize(
    ("action", "reason"),
    [
        (ControlAction.STOP, Reason.STOP),
        (ControlAction.CANCEL, Reason.CANCEL),
        (ControlAction.RESUME, None),  # settled where requested: never the owner's to act on
    ],
)
def test_each_control_action_maps_to_its_interrupt(
    action: ControlAction, reason: Reason | None
) -> None:
    assert reason_for(action) is reason


def test_every_control_action_is_mapped_or_deliberately_not() -> None:
    assert {a for a in ControlAction if reason_for(a) is not None} == {
        ControlAction.STOP,
        ControlAction.CANCEL,
    }


def test_requested_interrupts_with_the_request_id() -> None:
    interrupts = Interrupts()
    interrupts.requested([ControlRequest(7, 1, ControlAction.STOP)])
    assert (interrupts.reason, interrupts.request_id) == (Reason.STOP, 7)
    assert interrupts.event.is_set()


def test_requested_ignores_a_resume() -> None:
    interrupts = Interrupts()
    interrupts.requested([ControlRequest(7, 1, ControlAction.RESUME)])
    assert interrupts.reason is None
    assert not interrupts.event.is_set()


@pytest.mark.parametrize("order", [(1, 2), (2, 1)], ids=["stop-first", "cancel-first"])
def test_requested_cancel_outranks_stop_in_any_order(order: tuple[int, int]) -> None:
    by_id = {
        1: ControlRequest(1, 1, ControlAction.STOP),
        2: ControlRequest(2, 1, ControlAction.CANCEL),
    }
    interrupts = Interrupts()
    interrupts.requested([by_id[i] for i in order])
    assert (interrupts.reason, interrupts.request_id) == (Reason.CANCEL, 2)


def test_a_lost_lease_outranks_any_request() -> None:
    interrupts = Interrupts()
    interrupts.lease_lost(LeaseLost(1, 1))
    interrupts.requested([ControlRequest(2, 1, ControlAction.CANCEL)])
    assert interrupts.reason == Reason.LEASE_LOST
    assert interrupts.request_id is None


def test_a_warm_shutdown_counts_the_runs_it_hands_back_not_those_already_ending() -> None:
    """``hand_back_all`` asks every registered run; its count (the shutdown's log line) leaves
    out a run already ending its apply, which only has its cleanup left."""
    from tasks import runtime

    running, ending = Interrupts(), Interrupts()
    ending.ending = True
    runtime.register_run("unit-running", running)
    runtime.register_run("unit-ending", ending)
    try:
        assert runtime.hand_back_all() == 1
    finally:
        runtime.unregister_run("unit-running")
        runtime.unregister_run("unit-ending")
    assert running.reason is ending.reason is Reason.HANDOVER
