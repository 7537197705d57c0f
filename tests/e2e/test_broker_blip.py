"""Broker blips (issue 10, part 2): the private ``redis-server`` that is both the broker and the
result backend is SIGKILLed and started again ``BLIP`` seconds later (with no persistence: what
was queued is gone, as after a failover to an empty replica), while applies run.

- No running apply fails: their progress reports to Celery (``tasks/progress.py``) are
  best-effort, and the database is the truth.
- A dispatch attempted while Redis is down (a ``leasehold submit``, a ``leasehold resume``, a
  warm-shutdown handover) is recorded as owed (``tasks/dispatcher.py``) and sent again by the
  next reclaim pass (``tasks/service.py``): the apply starts within the outage, a reclaim
  interval and a few seconds, not after the dispatch timeout, which is set to a minute here so
  that the two paths cannot be confused (an apply re-dispatched by the dispatch timeout would
  show a ``reclaimed`` line).

Redis + MariaDB only: the broker is a server of the test's own.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import support
from tests.conftest import scratch_mysql_database
from tests.e2e.faults import (
    all_ids,
    assert_each_task_done_once,
    assert_history_sound,
    fault_cluster,
    private_deployment,
)
from tests.e2e.helpers import (
    RECLAIM_INTERVAL,
    RESULT_TIMEOUT,
    Stack,
    describe,
    events,
    kill_group,
    owner_worker,
    row,
    sleep_payload,
    submit_cli,
    submit_task,
    wait_log_event,
    wait_progress,
    wait_state,
)
from tests.servers import PrivateRedis, private_redis

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

BLIP = 2.0  # seconds Redis is down (the test's fault window)
DISPATCH_TIMEOUT = 60.0
ENV = {"LEASEHOLD_DISPATCH_TIMEOUT": str(DISPATCH_TIMEOUT)}
# Redis back -> the apply redeemed: a reclaim pass must first reach a worker through the new
# broker (beat and the workers reconnect with their own backoff), then send what is owed.
REDISPATCH_DEADLINE = BLIP + RECLAIM_INTERVAL + RESULT_TIMEOUT


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("broker-blip")


@pytest.fixture(scope="module")
def broker(folder: Path) -> Iterator[PrivateRedis]:
    with private_redis(folder / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def stack(broker: PrivateRedis, folder: Path) -> Iterator[Stack]:
    with (
        scratch_mysql_database("leasehold_blip") as url,
        private_deployment(folder, database_url=url, redis=broker) as deployed,
    ):
        yield deployed


def _no_reclaim(stack: Stack, apply_id: int) -> None:
    assert "reclaimed" not in {e for _, e in events(stack.db, apply_id)}, describe(
        stack.db, apply_id
    )


def test_applies_and_dispatches_ride_out_a_redis_restart(
    stack: Stack, broker: PrivateRedis, request: pytest.FixtureRequest, timing: list[str]
) -> None:
    db = stack.db
    support.wipe(db)
    with fault_cluster(stack, request) as cluster:
        cluster.workers(2, apply_slots=3, env=ENV)
        cluster.beats(1, env=ENV)
        stopped = submit_task(stack, sleep_payload(5.0, 0.5))
        stack.cli("stop", str(stopped))
        wait_state(db, stopped, "stopped", timeout=RESULT_TIMEOUT)
        running = [submit_task(stack, sleep_payload(1.5, 1.5, 1.5)) for _ in range(3)]
        for apply_id in running:
            wait_progress(db, apply_id, 0, 20, timeout=RESULT_TIMEOUT)

        broker.kill()
        down = time.monotonic()
        # Dispatches while the broker is down: each CLI command commits its rotation, fails to
        # ring the broker, records the dispatch as owed and succeeds. (Side by side: outside a
        # worker, Celery's Redis result backend first tries to subscribe to the result of every
        # send for about 20 s before the send fails.)
        with ThreadPoolExecutor(2) as pool:
            submitting = pool.submit(submit_cli, stack, sleep_payload(0.5, 0.5))
            resuming = pool.submit(stack.cli, "resume", str(stopped))
            submitted = submitting.result()
            resumed = json.loads(resuming.result().stdout.strip().splitlines()[-1])
        assert resumed["apply_state"] == "dispatched", resumed
        asked = time.monotonic() - down
        time.sleep(max(0.0, BLIP - asked))  # the rest of the fault window
        broker.start()
        up = time.monotonic()

        redeemed = {}
        for apply_id in (submitted, stopped):
            wait_log_event(db, apply_id, "redeemed", timeout=REDISPATCH_DEADLINE)
            redeemed[apply_id] = time.monotonic() - up
        ids = [*running, stopped, submitted]
        for apply_id in ids:
            wait_state(db, apply_id, "completed", "failed", timeout=RESULT_TIMEOUT)
        done = time.monotonic() - up

        for apply_id in ids:
            assert row(db, apply_id)["error"] is None, describe(db, apply_id)
            assert_each_task_done_once(stack, apply_id)
            _no_reclaim(stack, apply_id)
        assert sorted(all_ids(stack)) == sorted(ids)
        assert_history_sound(stack)
    line = (
        f"redis down {up - down:.1f}s (submit + resume via CLI took {asked:.1f}s of it): "
        f"redis back -> submitted apply redeemed {redeemed[submitted]:.1f}s, resumed apply "
        f"redeemed {redeemed[stopped]:.1f}s (reclaim interval {RECLAIM_INTERVAL:g}s, dispatch "
        f"timeout {DISPATCH_TIMEOUT:g}s); all {len(ids)} completed {done:.1f}s"
    )
    print(line)
    timing.append(line)


def test_a_handover_while_redis_is_down_is_sent_once_it_is_back(
    stack: Stack, broker: PrivateRedis, request: pytest.FixtureRequest, timing: list[str]
) -> None:
    """A worker shut down warmly while Redis is down hands its apply back (a rotation in the
    database) but cannot ring the broker: the dispatch is owed, and the other worker runs the
    apply once Redis is back, without waiting for stale_after or the dispatch timeout."""
    db = stack.db
    support.wipe(db)
    with fault_cluster(stack, request) as cluster:
        procs = cluster.workers(2, env=ENV)
        cluster.beats(1, env=ENV)
        apply_id = submit_task(stack, sleep_payload(0.5, 3.0, 0.5))
        wait_progress(db, apply_id, 1, 10, timeout=RESULT_TIMEOUT)
        before = row(db, apply_id)
        victim = owner_worker(before["lease_owner"], procs)
        survivor = next(p for p in procs if p is not victim)

        broker.kill()
        down = time.monotonic()
        kill_group(victim, signal.SIGTERM)
        handed = wait_log_event(
            db,
            apply_id,
            "handed_back",
            min_epoch=int(before["lease_epoch"]) + 1,
            timeout=RESULT_TIMEOUT,
        )
        time.sleep(max(0.0, BLIP - (time.monotonic() - down)))  # the rest of the fault window
        broker.start()
        up = time.monotonic()
        resumed = wait_log_event(
            db, apply_id, "redeemed", min_epoch=handed.epoch, timeout=REDISPATCH_DEADLINE
        )
        redeemed = time.monotonic() - up
        assert f"/{survivor.pid}/" in resumed.message, resumed
        wait_state(db, apply_id, "completed", "failed", timeout=RESULT_TIMEOUT)
        assert_each_task_done_once(stack, apply_id)
        _no_reclaim(stack, apply_id)
        assert_history_sound(stack)
        assert victim.proc is not None
        assert victim.proc.wait(RESULT_TIMEOUT) == 0, victim.log()[-3000:]
    line = (
        f"handover while redis was down ({up - down:.1f}s): redis back -> redeemed by the "
        f"other worker {redeemed:.1f}s (dispatch timeout {DISPATCH_TIMEOUT:g}s)"
    )
    print(line)
    timing.append(line)
