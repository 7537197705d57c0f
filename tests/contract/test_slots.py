"""The apply lane (issue 7): applies run on a worker's apply slots, never on the pool that serves
the control plane; a run_apply with no free slot waits in the broker, unredeemed; a worker never
runs more applies than it has slots.

Through an in-process worker (``start_worker``, memory broker) with two apply slots and two
control threads, against real SQLite and MariaDB. The same with real worker processes on Redis
and on the embedded broker is in ``tests/e2e/test_brake.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.result import AsyncResult

from leases import dispatch
from storage import applies, open_database
from storage.database import Database
from tasks import runtime
from tasks.app import app
from tasks.slots import ApplySlots
from tests import support
from tests.celery_fixtures import inprocess_worker, sleep_apply, wait_until
from tests.conftest import STORE_FIXTURES

SLOTS = 2
RESULT_TIMEOUT = 20.0
RUN_APPLY = "leasehold.run_apply"


@pytest.fixture(scope="module", params=list(STORE_FIXTURES))
def worker(request: pytest.FixtureRequest) -> Iterator[Any]:
    url = str(request.getfixturevalue(STORE_FIXTURES[request.param]))
    overrides = {"leasehold_worker_concurrency": SLOTS, "leasehold_heartbeat_interval": 0.1}
    with inprocess_worker(url, overrides=overrides, concurrency=2) as started:
        started.test_url = url
        yield started


@pytest.fixture
def db(worker: Any) -> Iterator[Database]:
    database = open_database(worker.test_url)
    support.wipe(database)
    yield database
    try:
        wait_until(lambda: not runtime._runs, timeout=RESULT_TIMEOUT, what="runs to end")
        wait_until(lambda: lane(worker)["consuming"], timeout=RESULT_TIMEOUT, what="the lane")
    finally:
        database.dispose()


def lane(worker: Any) -> dict[str, Any]:
    info: dict[str, Any] = worker.leasehold_lane.info()
    return info


def state(db: Database, apply_id: int) -> str:
    return str(applies.get(db, apply_id)["state"])


def wait_running(db: Database, ids: list[int]) -> None:
    wait_until(
        lambda: all(state(db, i) == "running" for i in ids),
        timeout=RESULT_TIMEOUT,
        what=f"applies {ids} to run",
    )


def started(db: Database, *seconds: float, **options: Any) -> tuple[int, AsyncResult]:
    """A sleep apply, dispatched and sent to the worker."""
    apply_id = sleep_apply(db, seconds)
    lease = dispatch(db, apply_id)
    result = app.send_task(
        RUN_APPLY, kwargs={"apply_id": apply_id, "lease": lease.to_json()}, **options
    )
    return apply_id, result


def test_slots_are_counted_and_never_given_back_twice() -> None:
    slots = ApplySlots(2)
    assert (slots.take(), slots.take(), slots.take()) == (True, True, False)
    assert slots.busy == 2
    slots.give_back()
    assert slots.take()
    slots.give_back()
    slots.give_back()
    with pytest.raises(RuntimeError, match="never taken"):
        slots.give_back()
    with pytest.raises(ValueError, match="at least one"):
        ApplySlots(0)


def test_the_brake_and_submit_are_served_while_every_slot_is_busy(
    worker: Any, db: Database
) -> None:
    long = [started(db, 30.0) for _ in range(SLOTS)]
    wait_running(db, [apply_id for apply_id, _ in long])
    waiting, waiting_result = started(db, 0.05)  # no slot for it: it waits in the broker
    wait_until(lambda: lane(worker)["bounced"] > 0, what="the lane to give it back")
    assert not lane(worker)["consuming"]

    began = time.monotonic()
    submitted = app.send_task("leasehold.submit_apply", kwargs=_payload(0.05))
    submitted_id = submitted.get(timeout=RESULT_TIMEOUT)["apply_id"]
    submit_took = time.monotonic() - began
    assert state(db, submitted_id) == "dispatched"  # its own line is free; no slot yet

    target, target_result = long[0]
    began = time.monotonic()
    answer = app.send_task(
        "leasehold.control_apply", kwargs={"apply_id": target, "action": "stop"}
    ).get(timeout=RESULT_TIMEOUT)
    assert (answer["request_state"], answer["apply_state"]) == ("pending", "running")
    assert target_result.get(timeout=RESULT_TIMEOUT)["outcome"] == "stopped"
    stop_took = time.monotonic() - began
    # Generous bounds: the point is that neither waits for a 30 s apply.
    assert submit_took < 10, submit_took
    assert stop_took < 10, stop_took

    # The freed slot takes the next waiting run_apply; the other long one still holds its slot.
    finished = {waiting_result.get(timeout=RESULT_TIMEOUT)["apply_id"]}
    wait_until(lambda: state(db, submitted_id) == "completed", what="the submitted apply")
    finished.add(submitted_id)
    assert finished == {waiting, submitted_id}
    app.send_task("leasehold.control_apply", kwargs={"apply_id": long[1][0], "action": "cancel"})
    assert long[1][1].get(timeout=RESULT_TIMEOUT)["outcome"] == "cancelled"


def test_an_apply_waiting_for_a_slot_is_not_redeemed(worker: Any, db: Database) -> None:
    holders = [started(db, 30.0) for _ in range(SLOTS)]
    wait_running(db, [apply_id for apply_id, _ in holders])
    waiting, result = started(db, 0.05)
    wait_until(lambda: lane(worker)["bounced"] > 0, what="the lane to give it back")
    assert state(db, waiting) == "dispatched"
    assert support.log_events(db, waiting) == [(1, "dispatched")]  # nothing written
    assert result.state == "PENDING"  # not even received, for Flower
    for apply_id, _ in holders:
        app.send_task("leasehold.control_apply", kwargs={"apply_id": apply_id, "action": "cancel"})
    assert result.get(timeout=RESULT_TIMEOUT)["outcome"] == "completed"


def test_a_worker_never_runs_more_applies_than_it_has_slots(worker: Any, db: Database) -> None:
    runs = [started(db, 0.3) for _ in range(3 * SLOTS)]
    ids = [apply_id for apply_id, _ in runs]
    peak = 0
    deadline = time.monotonic() + RESULT_TIMEOUT * 2
    while time.monotonic() < deadline:
        now = [state(db, i) for i in ids]
        peak = max(peak, now.count("running"), worker.leasehold_lane.slots.busy)
        if all(s == "completed" for s in now):
            break
        time.sleep(0.01)
    assert [state(db, i) for i in ids] == ["completed"] * len(ids)
    assert peak == SLOTS  # every slot was used, never more
    for _, result in runs:
        assert result.get(timeout=RESULT_TIMEOUT)["outcome"] == "completed"


def test_a_run_apply_sent_to_the_control_queue_is_moved_to_the_apply_queue(
    worker: Any, db: Database
) -> None:
    moved = lane(worker)["moved"]
    apply_id, result = started(db, 0.05, queue=app.conf.leasehold_queue)
    assert result.get(timeout=RESULT_TIMEOUT)["outcome"] == "completed"
    assert lane(worker)["moved"] == moved + 1
    assert state(db, apply_id) == "completed"


def test_a_run_apply_with_an_eta_is_refused_and_writes_nothing(worker: Any, db: Database) -> None:
    refused = lane(worker)["refused"]
    apply_id, result = started(db, 0.05, countdown=60)
    wait_until(lambda: lane(worker)["refused"] == refused + 1, what="the ETA to be refused")
    assert state(db, apply_id) == "dispatched"  # reclaim re-dispatches it after the timeout
    assert support.log_events(db, apply_id) == [(1, "dispatched")]
    assert result.state == "PENDING"


def _payload(seconds: float) -> dict[str, Any]:
    return {
        "database": support.new_database(),
        "environment": "staging",
        "engine": "sleep",
        "tasks": [
            {"table": "t", "ddl": "ALTER TABLE t ADD c INT", "options": {"seconds": seconds}}
        ],
    }
