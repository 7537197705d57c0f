"""Issue 7 with real worker and beat processes: the brake works on a fleet whose every apply
slot is busy, waiting applies wait in the broker (not behind a busy worker's prefetch) and take
the next free slot, and one apply per (database, environment) runs at a time.

The timings go to the "leasehold e2e timings" summary; the asserted bounds are generous (a
loaded two-core machine); ``bench/control_latency.py`` measures the stop latency properly.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from typing import Any

import pytest
import redis

from storage import applies
from tests.e2e import rabbitmq
from tests.e2e.helpers import (
    HEARTBEAT_INTERVAL,
    RECLAIM_INTERVAL,
    RESULT_TIMEOUT,
    SLACK,
    STALE_AFTER,
    Cluster,
    Stack,
    assert_completed_once,
    describe,
    events,
    kill_group,
    logs,
    owner_worker,
    row,
    seconds_between,
    sleep_payload,
    submit_task,
    wait_for,
    wait_log_event,
    wait_state,
)

pytestmark = pytest.mark.slow
# Stacks: slots and the apply queue are the broker's business (ready and unacknowledged
# messages on Redis and RabbitMQ); the store's part is as on Redis + MariaDB
# (tests/e2e/conftest.py).
STACKS = frozenset({"redis", "rabbitmq", "sqlite"})

LONG = 120.0  # an apply that outlives the test unless stopped
# The goals, with room for a loaded machine: generous, not tight.
CONTROL_BOUND = 2 * (HEARTBEAT_INTERVAL + 2.0) + SLACK
SUBMIT_BOUND = 2 * 2.0 + SLACK
RECLAIM_BOUND = STALE_AFTER + RECLAIM_INTERVAL + 2 * SLACK


def _control(stack: Stack, apply_id: int, action: str) -> dict[str, Any]:
    result = stack.client.send_task(
        "leasehold.control_apply", kwargs={"apply_id": apply_id, "action": action}
    )
    answer: dict[str, Any] = result.get(timeout=RESULT_TIMEOUT)
    return answer


def _timed(what: str, fn: Any) -> tuple[Any, float]:
    began = time.monotonic()
    value = fn()
    return value, time.monotonic() - began


def _took_effect(stack: Stack, apply_id: int, action: str, state: str) -> float:
    """Seconds from sending a stop or cancel of a running apply until the apply is ``state``."""
    began = time.monotonic()
    answer = _control(stack, apply_id, action)
    assert (answer["request_state"], answer["apply_state"]) == ("pending", "running"), answer
    wait_state(stack.db, apply_id, state, timeout=RESULT_TIMEOUT)
    return time.monotonic() - began


def _wait_running(stack: Stack, ids: Iterable[int]) -> None:
    for apply_id in ids:
        wait_state(stack.db, apply_id, "running", timeout=RESULT_TIMEOUT)


def _unacked(stack: Stack) -> int:
    """run_apply messages a Redis broker holds as delivered but unacknowledged."""
    client = redis.Redis.from_url(stack.env["LEASEHOLD_BROKER_URL"])
    try:
        return int(client.hlen("unacked"))
    finally:
        client.close()


def _queued_in_broker(stack: Stack, queue: str = "leasehold.applies") -> int:
    client = redis.Redis.from_url(stack.env["LEASEHOLD_BROKER_URL"])
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def test_the_brake_works_while_every_apply_slot_is_busy(
    cluster: Cluster, timing: list[str]
) -> None:
    """Two workers of one apply slot each run two long applies; two more wait for a slot. Stop,
    cancel, resume and submit are each served at once, and a SIGKILLed worker's apply is
    reclaimed on time, although no apply slot is free anywhere."""
    stack, db = cluster.stack, cluster.stack.db
    procs = cluster.workers(2, apply_slots=1)
    cluster.beats(1)
    holders = [submit_task(stack, sleep_payload(LONG)) for _ in procs]
    _wait_running(stack, holders)
    waiting = [submit_task(stack, sleep_payload(0.2)) for _ in range(2)]
    for apply_id in waiting:
        assert row(db, apply_id)["state"] == "dispatched"
    if stack.redis:
        # The waiting ones wait in the broker's queue, not unacknowledged in a busy worker.
        wait_for(
            "the waiting run_apply messages to be back in the queue, none unacknowledged",
            lambda: _unacked(stack) == 0 and _queued_in_broker(stack) == len(waiting),
            timeout=RESULT_TIMEOUT,
            diagnose=lambda: f"unacked {_unacked(stack)}, queued {_queued_in_broker(stack)}",
        )
    elif rabbitmq.is_amqp(stack):
        vhost = rabbitmq.vhost_of(rabbitmq.broker_url(stack))
        expected = rabbitmq.Depth(ready=len(waiting), unacked=0)
        wait_for(
            "the waiting run_apply messages to be ready in the queue, none unacknowledged",
            lambda: rabbitmq.depth(vhost, "leasehold.applies") == expected,
            timeout=RESULT_TIMEOUT,
            interval=0.5,  # each look is a rabbitmqctl run
            diagnose=lambda: str(rabbitmq.depth(vhost, "leasehold.applies")),
        )
    assert all(row(db, a)["state"] == "dispatched" for a in waiting)
    assert all(events(db, a) == [(1, "dispatched")] for a in waiting)  # nobody redeemed them

    submitted, submit_took = _timed(
        "submit", lambda: submit_task(stack, sleep_payload(0.2, database="brake-extra"))
    )

    stopped_id, cancelled_id = holders
    stop_took = _took_effect(stack, stopped_id, "stop", "stopped")
    cancel_took = _took_effect(stack, cancelled_id, "cancel", "cancelled")

    # Both slots freed: the waiting applies (and the submitted one) take them in turn.
    for apply_id in [*waiting, submitted]:
        wait_state(db, apply_id, "completed", timeout=RESULT_TIMEOUT)
        assert_completed_once(db, apply_id)

    # Saturate again, then resume the stopped apply: it is dispatched at once and waits for a
    # slot like any other; and SIGKILL one worker: beat reclaims its apply on time.
    again = [submit_task(stack, sleep_payload(LONG)) for _ in procs]
    _wait_running(stack, again)
    answer, resume_took = _timed("resume", lambda: _control(stack, stopped_id, "resume"))
    assert (answer["request_state"], answer["apply_state"]) == ("completed", "dispatched")
    victim_apply = again[0]
    before = row(db, victim_apply)
    victim = owner_worker(before["lease_owner"], procs)
    kill_group(victim, signal.SIGKILL)
    killed = time.monotonic()
    wait_log_event(
        db,
        victim_apply,
        "reclaimed",
        min_epoch=int(before["lease_epoch"]) + 1,
        timeout=RECLAIM_BOUND + 10,
    )
    reclaim_took = time.monotonic() - killed

    lines = [
        f"[{stack.name}] all apply slots busy: submit answered in {submit_took:.2f}s "
        f"(bound {SUBMIT_BOUND:g}s)",
        f"[{stack.name}] all apply slots busy: stop took effect in {stop_took:.2f}s "
        f"(heartbeat {HEARTBEAT_INTERVAL:g}s; bound {CONTROL_BOUND:g}s)",
        f"[{stack.name}] all apply slots busy: cancel took effect in {cancel_took:.2f}s "
        f"(bound {CONTROL_BOUND:g}s)",
        f"[{stack.name}] all apply slots busy: resume answered (dispatched) in {resume_took:.2f}s",
        f"[{stack.name}] all apply slots busy: SIGKILL -> reclaimed in {reclaim_took:.2f}s "
        f"(stale_after {STALE_AFTER:g}s + reclaim {RECLAIM_INTERVAL:g}s; bound "
        f"{RECLAIM_BOUND:g}s)",
    ]
    for line in lines:
        print(line)
    timing.extend(lines)
    assert submit_took <= SUBMIT_BOUND
    assert stop_took <= CONTROL_BOUND
    assert cancel_took <= CONTROL_BOUND
    assert resume_took <= CONTROL_BOUND
    assert reclaim_took <= RECLAIM_BOUND
    for apply_id in (*again, stopped_id):  # end the long ones
        _control(stack, apply_id, "cancel")


def test_waiting_applies_take_the_next_free_slot_of_any_worker(
    cluster: Cluster, timing: list[str]
) -> None:
    """As many apply slots as applies (two workers of two): every worker takes two, none takes
    a third, and all four run at once; a fifth waits in the broker for the first free slot."""
    stack, db = cluster.stack, cluster.stack.db
    procs = cluster.workers(2, apply_slots=2)
    began = time.monotonic()
    first = [submit_task(stack, sleep_payload(3.0)) for _ in range(4)]
    _wait_running(stack, first)
    all_running = time.monotonic() - began
    owners = [owner_worker(row(db, a)["lease_owner"], procs) for a in first]
    assert sorted(owners.count(p) for p in procs) == [2, 2]
    fifth = submit_task(stack, sleep_payload(0.2))
    done = wait_state(db, fifth, "completed", timeout=RESULT_TIMEOUT)
    redeemed = next(e for e in logs(db, fifth) if e.event == "redeemed")
    first_done = min(
        next(e.created_at for e in logs(db, a) if e.event == "completed")
        for a in first
        if row(db, a)["state"] == "completed"
    )
    # It started after a slot freed, not after the dispatch timeout.
    assert seconds_between(first_done, redeemed.created_at) < 2 * SLACK, describe(db, fifth)
    assert done["reclaim_count"] == 0
    line = f"[{stack.name}] 4 applies on 2 x 2 apply slots all running after {all_running:.2f}s"
    print(line)
    timing.append(line)


def test_one_apply_per_database_at_a_time(cluster: Cluster, timing: list[str]) -> None:
    """Two applies for one database wait in submission order: the second is dispatched in the
    transaction that completes the first. Another database's apply runs beside them."""
    stack, db = cluster.stack, cluster.stack.db
    cluster.workers(2, apply_slots=2)
    first = submit_task(stack, sleep_payload(5.0, database="orders"))
    second = submit_task(stack, sleep_payload(0.2, database="orders"))
    other = submit_task(stack, sleep_payload(0.5, database="billing"))
    assert row(db, second)["state"] == "queued"
    status = stack.cli("status", str(second)).stdout
    assert f"#2 in line on orders/e2e, behind apply {first}" in status, status
    wait_state(db, other, "completed", timeout=RESULT_TIMEOUT)
    assert row(db, first)["state"] == "running"
    assert row(db, second)["state"] == "queued"  # slots are free, but it is not its turn
    wait_state(db, second, "completed", timeout=RESULT_TIMEOUT)
    completed = next(e for e in logs(db, first) if e.event == "completed")
    dispatched = next(e for e in logs(db, second) if e.event == "dispatched")
    redeemed = next(e for e in logs(db, second) if e.event == "redeemed")
    # The contract tests prove it is one transaction; here, that nothing waited in between.
    assert seconds_between(completed.created_at, dispatched.created_at) < 1.0
    handoff = seconds_between(completed.created_at, redeemed.created_at)
    for apply_id in (first, second, other):
        assert_completed_once(db, apply_id)
    line = f"[{stack.name}] same database: next apply redeemed {handoff:.2f}s after the first ended"
    print(line)
    timing.append(line)
    assert applies.place(db, second) is None
