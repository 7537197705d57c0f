"""Scenarios 2, 3, 5, 6 and the warm-shutdown handover of 7: workers die, freeze, shut down, the
broker loses a message, two beats run at once. Every test starts its own processes, since it
kills, freezes or stops some of them.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from leases import Lease, fence, heartbeat, redeem
from storage import applies, fenced
from storage.errors import LeaseLost
from tests.e2e.helpers import (
    DISPATCH_TIMEOUT,
    RECLAIM_INTERVAL,
    RESULT_TIMEOUT,
    SLACK,
    STALE_AFTER,
    Cluster,
    EventRecorder,
    assert_completed_once,
    describe,
    dispatched_apply,
    events,
    freeze,
    kill_group,
    logs,
    owner_task_id,
    owner_worker,
    reclaimed_from,
    row,
    seconds_between,
    sleep_payload,
    stale_behind_a_table_lock,
    submit_task,
    wait_for,
    wait_log,
    wait_log_event,
    wait_progress,
    wait_state,
)

pytestmark = pytest.mark.slow
# Stacks: failover is reclaim and the fence in the store, so PostgreSQL too; RabbitMQ's side
# of a worker that holds a delivery is test_rabbitmq.py (tests/e2e/conftest.py).
STACKS = frozenset({"redis", "postgres", "sqlite"})

# kill -> resume: staleness, then at most one reclaim interval, then a message delivery (the
# filesystem transport polls once a second) and the redemption.
FAILOVER_BOUND = STALE_AFTER + RECLAIM_INTERVAL + SLACK
HANDOVER_STALE_AFTER = 10.0


def _task_label(position: int, total: int) -> str:
    return f"task {position}/{total}: t{position}"


def test_sigkill_mid_apply_beat_reclaims_and_another_worker_resumes(
    cluster: Cluster, timing: list[str]
) -> None:
    """Scenario 2: SIGKILL the owner while task 2 runs; beat reclaims after stale_after, the
    other worker resumes task 2 from its checkpoint and completes the apply exactly once."""
    stack, db = cluster.stack, cluster.stack.db
    procs = cluster.workers(2)
    cluster.beats(1)
    apply_id = submit_task(stack, sleep_payload(0.3, 4.0, 0.3))
    task2 = wait_progress(db, apply_id, 1, 50, timeout=RESULT_TIMEOUT)
    before = row(db, apply_id)
    old_epoch = int(before["lease_epoch"])
    victim = owner_worker(before["lease_owner"], procs)
    survivor = next(p for p in procs if p is not victim)
    checkpoint = float(task2["checkpoint"]["elapsed"])
    assert checkpoint >= 2.0, describe(db, apply_id)

    kill_group(victim, signal.SIGKILL)
    killed = time.monotonic()
    resumed = wait_log_event(
        db, apply_id, "redeemed", min_epoch=old_epoch + 1, timeout=FAILOVER_BOUND + 10
    )
    kill_to_resume = time.monotonic() - killed
    line = (
        f"[{stack.name}] SIGKILL -> resume (redeem at epoch {resumed.epoch}): "
        f"{kill_to_resume:.2f}s (stale_after {STALE_AFTER:g}s + reclaim {RECLAIM_INTERVAL:g}s, "
        f"bound {FAILOVER_BOUND:g}s)"
    )
    print(line)
    timing.append(line)
    assert kill_to_resume <= FAILOVER_BOUND, describe(db, apply_id)

    wait_state(db, apply_id, "completed", timeout=RESULT_TIMEOUT)
    assert_completed_once(db, apply_id)
    assert reclaimed_from(db, apply_id) == [old_epoch]
    new_epoch = old_epoch + 1
    assert resumed.epoch == new_epoch
    assert f"/{survivor.pid}/" in resumed.message, resumed
    after = [e for e in logs(db, apply_id) if e.epoch == new_epoch]
    assert [e.event for e in after][:3] == ["reclaimed", "redeemed", "task_started"]
    # Task 1 was not run again; task 2 resumed from its checkpoint: it took the new holder
    # clearly less than the task's full 4 s (it had >= 2 s left).
    started = [e for e in after if e.event == "task_started"]
    assert started[0].message == _task_label(2, 3), after
    done2 = next(e for e in after if e.event == "task_completed" and "t2" in e.message)
    assert seconds_between(started[0].created_at, done2.created_at) < 4.0 - 0.5, describe(
        db, apply_id
    )
    assert victim.proc is not None
    assert victim.proc.wait(10) == -signal.SIGKILL


def test_sigstop_past_stale_after_then_sigcont_is_fenced(cluster: Cluster) -> None:
    """Scenario 3: a worker frozen (SIGSTOP) past stale_after is reclaimed and another finishes
    the apply; after SIGCONT the old worker's next write and heartbeat are refused, its
    run_apply ends LEASE_LOST, and no line of the old epoch follows the reclaim."""
    stack, db = cluster.stack, cluster.stack.db
    procs = cluster.workers(2)
    cluster.beats(1)
    with EventRecorder(stack.client) as recorder:
        apply_id = submit_task(stack, sleep_payload(0.3, 3.0, 0.3))
        wait_progress(db, apply_id, 1, 20, timeout=RESULT_TIMEOUT)
        before = row(db, apply_id)
        old = Lease(apply_id, int(before["lease_epoch"]), str(before["lease_token"]))
        victim = owner_worker(before["lease_owner"], procs)
        old_task_id = owner_task_id(before["lease_owner"])

        freeze(stack, victim, apply_id)
        frozen_at = time.monotonic()
        wait_state(db, apply_id, "completed", timeout=FAILOVER_BOUND + RESULT_TIMEOUT)
        assert time.monotonic() - frozen_at > STALE_AFTER
        assert reclaimed_from(db, apply_id) == [old.epoch]
        written = logs(db, apply_id)

        kill_group(victim, signal.SIGCONT)
        result = stack.client.AsyncResult(old_task_id)
        wait_for(
            f"the frozen worker's run_apply {old_task_id} to end LEASE_LOST",
            lambda: result.state == "LEASE_LOST",
            timeout=RESULT_TIMEOUT,
            diagnose=lambda: f"state {result.state}\n{victim.log()[-3000:]}",
        )
        wait_for(
            "Flower's view of the frozen worker's run_apply: LEASE_LOST",
            lambda: (t := recorder.task(old_task_id)) is not None and t.state == "LEASE_LOST",
            timeout=RESULT_TIMEOUT,
            diagnose=lambda: str(recorder.event_types(old_task_id)),
        )
    assert result.info["epoch"] == old.epoch
    assert f"lease epoch {old.epoch} lost" in result.info["reason"]
    wait_log(victim, "lease lost, stopping without further writes")
    # The old worker's first statements after waking were refused by the fence.
    assert re.search(rf"lease epoch {old.epoch} lost", victim.log()), victim.log()[-3000:]
    assert "task-lease_lost" in recorder.event_types(old_task_id)

    # It wrote nothing after waking up, and its lease opens no write and no heartbeat.
    assert logs(db, apply_id) == written
    with pytest.raises(LeaseLost):
        heartbeat(db, old)
    with pytest.raises(LeaseLost), fence(db, old) as fx:
        fenced.append_log(fx, "stale_write", "must never be written")
    assert logs(db, apply_id) == written

    assert_completed_once(db, apply_id)
    reclaim = next(e for e in written if e.event == "reclaimed")
    assert all(e.epoch > old.epoch for e in written if e.id > reclaim.id), describe(db, apply_id)
    assert victim.proc is not None
    assert victim.proc.poll() is None  # fenced, not crashed


def test_lost_dispatch_is_reclaimed_after_the_dispatch_timeout(
    cluster: Cluster, timing: list[str]
) -> None:
    """Scenario 5: a dispatch whose message the broker lost: beat reclaims it once it has been
    dispatched for LEASEHOLD_DISPATCH_TIMEOUT, and a worker completes it. The lost message,
    turning up late, is refused."""
    stack, db = cluster.stack, cluster.stack.db
    cluster.workers(1)
    cluster.beats(1)
    lost = dispatched_apply(db, 0.3, 0.3)  # the run_apply message is never sent
    apply_id = lost.apply_id

    wait_state(db, apply_id, "completed", timeout=DISPATCH_TIMEOUT + RESULT_TIMEOUT)
    assert events(db, apply_id) == [
        (1, "dispatched"),
        (2, "reclaimed"),
        (2, "redeemed"),
        *[(2, "task_started"), (2, "task_completed")] * 2,
        (3, "completed"),
    ]
    assert_completed_once(db, apply_id)
    entries = logs(db, apply_id)
    waited = seconds_between(entries[0].created_at, entries[1].created_at)
    line = (
        f"[{stack.name}] lost dispatch reclaimed after {waited:.2f}s "
        f"(dispatch timeout {DISPATCH_TIMEOUT:g}s)"
    )
    print(line)
    timing.append(line)
    assert "dispatch stale" in entries[1].message
    assert DISPATCH_TIMEOUT <= waited <= DISPATCH_TIMEOUT + RECLAIM_INTERVAL + SLACK
    assert row(db, apply_id)["reclaim_count"] == 1

    late = stack.client.send_task(
        "leasehold.run_apply", kwargs={"apply_id": apply_id, "lease": lost.to_json()}
    )
    assert late.get(timeout=RESULT_TIMEOUT)["outcome"] == "not_redeemed"
    assert logs(db, apply_id) == entries


_SENT = "Sending due task reclaim-stale-applies"
_RECLAIM_RESULT = re.compile(
    r"leasehold\.reclaim_stale_applies\[[^\]]+\] succeeded in [^:]+: (\d+)"
)


def test_two_beats_rotate_each_stale_apply_once(cluster: Cluster) -> None:
    """Scenario 6: two beat processes (separate schedule files) at once: every apply whose
    holder went silent is rotated exactly once for that staleness.

    The staleness is staged behind a table lock, so that several reclaim passes of both beats
    are in flight together when the applies turn stale: they race for the same rows (MariaDB:
    ``FOR UPDATE SKIP LOCKED``; SQLite: the write lock)."""
    db = cluster.stack.db
    procs = cluster.workers(2, apply_slots=4)
    beats = cluster.beats(2)
    ids = []
    ghost_epochs = {}
    for _ in range(8):
        lease = dispatched_apply(db, 0.2)
        redeem(db, lease, f"ghost/{lease.apply_id}/killed-worker")  # a holder that died at once
        ids.append(lease.apply_id)
        ghost_epochs[lease.apply_id] = lease.epoch

    with stale_behind_a_table_lock(cluster.stack, ids, STALE_AFTER + 1):
        sent = [p.log().count(_SENT) for p in beats]
        wait_for(
            "both beats to send two reclaim passes that now wait for the lock",
            lambda: all(p.log().count(_SENT) >= n + 2 for p, n in zip(beats, sent, strict=True)),
            timeout=RESULT_TIMEOUT,
        )

    for apply_id in ids:
        wait_state(db, apply_id, "completed", timeout=RESULT_TIMEOUT)
    total = 0
    for apply_id in ids:
        assert_completed_once(db, apply_id)
        previous = reclaimed_from(db, apply_id)
        assert previous.count(ghost_epochs[apply_id]) == 1, describe(db, apply_id)
        assert len(previous) == len(set(previous)), describe(db, apply_id)
        total += len(previous)

    # Every rotation was made by exactly one reclaim pass: the passes' results add up.
    def passes() -> list[int]:
        return [int(n) for p in procs for n in _RECLAIM_RESULT.findall(p.log())]

    wait_for(
        f"the reclaim passes' results to add up to {total} rotations",
        lambda: sum(passes()) == total,
        timeout=10,
        diagnose=lambda: str(passes()),
    )
    assert len(passes()) >= 4, passes()


def test_warm_shutdown_hands_the_apply_back_at_once(cluster: Cluster, timing: list[str]) -> None:
    """Scenario 7 (handover): SIGTERM the owner mid-apply while another worker runs: the apply
    is handed back at a safe point and the other worker resumes it long before the old
    heartbeat could have gone stale (by the database's timestamps). A longer stale_after here
    leaves no doubt which of the two paths resumed it."""
    stack, db = cluster.stack, cluster.stack.db
    slow_reclaim = {"LEASEHOLD_STALE_AFTER": str(HANDOVER_STALE_AFTER)}
    procs = cluster.workers(2, env=slow_reclaim)
    cluster.beats(1, env=slow_reclaim)
    apply_id = submit_task(stack, sleep_payload(0.3, 4.0, 0.3))
    wait_progress(db, apply_id, 1, 25, timeout=RESULT_TIMEOUT)
    before = row(db, apply_id)
    old_epoch = int(before["lease_epoch"])
    victim = owner_worker(before["lease_owner"], procs)
    survivor = next(p for p in procs if p is not victim)

    kill_group(victim, signal.SIGTERM)
    handed = wait_log_event(db, apply_id, "handed_back", min_epoch=old_epoch + 1, timeout=10)
    resumed = wait_log_event(db, apply_id, "redeemed", min_epoch=old_epoch + 1, timeout=10)
    # The old holder's last heartbeat is no older than the one read before SIGTERM: reclaim
    # could not have resumed the apply before that + stale_after.
    since_heartbeat = seconds_between(before["heartbeat_at"], resumed.created_at)
    handover = seconds_between(handed.created_at, resumed.created_at)
    line = (
        f"[{stack.name}] warm-shutdown handover: handed_back -> redeem {handover:.2f}s; "
        f"last seen heartbeat -> redeem {since_heartbeat:.2f}s "
        f"(stale_after {HANDOVER_STALE_AFTER:g}s)"
    )
    print(line)
    timing.append(line)
    assert since_heartbeat < HANDOVER_STALE_AFTER / 2, describe(db, apply_id)
    assert f"/{survivor.pid}/" in resumed.message, resumed
    assert handed.epoch == resumed.epoch == old_epoch + 1

    wait_state(db, apply_id, "completed", timeout=RESULT_TIMEOUT)
    assert_completed_once(db, apply_id)
    assert reclaimed_from(db, apply_id) == []
    after = [e for e in logs(db, apply_id) if e.epoch == old_epoch + 1]
    assert [e.event for e in after][:3] == ["handed_back", "redeemed", "task_started"]
    assert after[2].message == _task_label(2, 3)
    tasks = applies.tasks(db, apply_id)
    assert [t["lease_epoch"] for t in tasks] == [old_epoch, old_epoch + 1, old_epoch + 1]
    assert victim.proc is not None
    assert victim.proc.wait(RESULT_TIMEOUT) == 0, victim.log()[-3000:]
