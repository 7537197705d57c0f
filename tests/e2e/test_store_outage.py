"""A store outage (issue 10, part 8): the private ``mariadbd`` that is leasehold's own database is
crashed (SIGKILL) mid-apply and started again ``OUTAGE`` seconds later, while two workers run four
sleep applies and beat reclaims. No apply fails because of it, every apply resumes and completes
once, and nothing is written twice.

Two outage lengths around ``stale_after``, each a different path:

- **longer than stale_after** (8 s outage, stale_after 3 s, the suite's default): every owner
  presumes its lease lost (no heartbeat succeeded for stale_after) and stops; once the store is
  back, beat finds every running apply stale and reclaims it, and a worker resumes it from its
  checkpoint. This is the path a real outage of a minute or more takes.
- **shorter than stale_after** (8 s outage, stale_after 20 s): the owners' owned writes and
  heartbeats are retried through the outage and the applies go on under their leases; nothing is
  reclaimed.

SIGKILL rather than a clean stop: a crash is what a failover or an OOM kill looks like, and a
clean shutdown only adds error 1927 ("connection was killed") to the errors seen.
Redis + MariaDB only: the store is a server of the test's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support
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
    SLACK,
    Stack,
    describe,
    row,
    sleep_payload,
    submit_task,
    wait_for,
    wait_progress,
    wait_state,
)
from tests.servers import PrivateMariaDB, PrivateRedis, private_mariadb, private_redis

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

OUTAGE = 8.0  # seconds the store is down (the test's fault window), plus its start-up
APPLIES = 4
TASK_SECONDS = (1.5, 1.5, 1.5)


@pytest.fixture(scope="module")
def store_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store-outage")


@pytest.fixture(scope="module")
def store(store_folder: Path) -> Iterator[PrivateMariaDB]:
    with private_mariadb(store_folder / "mariadb") as server:
        yield server


@pytest.fixture(scope="module")
def broker(store_folder: Path) -> Iterator[PrivateRedis]:
    with private_redis(store_folder / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def stack(store: PrivateMariaDB, broker: PrivateRedis, store_folder: Path) -> Iterator[Stack]:
    url = store.create_database("leasehold")
    with private_deployment(store_folder, database_url=url, redis=broker) as deployed:
        yield deployed


@pytest.mark.parametrize(
    "stale_after",
    [pytest.param(3.0, id="longer-than-stale-after"), pytest.param(20.0, id="shorter")],
)
def test_store_crash_mid_apply_loses_and_doubles_nothing(
    stack: Stack,
    store: PrivateMariaDB,
    stale_after: float,
    request: pytest.FixtureRequest,
    timing: list[str],
) -> None:
    db = stack.db
    support.wipe(db)
    env = {"LEASEHOLD_STALE_AFTER": str(stale_after)}
    with fault_cluster(stack, request) as cluster:
        cluster.workers(2, apply_slots=APPLIES // 2, env=env)
        cluster.beats(1, env=env)
        ids = [submit_task(stack, sleep_payload(*TASK_SECONDS)) for _ in range(APPLIES)]
        for apply_id in ids:
            wait_progress(db, apply_id, 0, 20, timeout=RESULT_TIMEOUT)
        epochs = {i: int(row(db, i)["lease_epoch"]) for i in ids}

        store.kill()
        down = time.monotonic()
        time.sleep(OUTAGE)  # the fault window, not a wait for an outcome
        store.start()
        up = time.monotonic()

        deadline = stale_after + RECLAIM_INTERVAL + sum(TASK_SECONDS) + SLACK + RESULT_TIMEOUT
        for apply_id in ids:
            wait_state(db, apply_id, "completed", "failed", "cancelled", timeout=deadline)
        done = time.monotonic()

        for apply_id in ids:
            assert row(db, apply_id)["error"] is None, describe(db, apply_id)
            assert_each_task_done_once(stack, apply_id)
        reclaims = {i: int(row(db, i)["reclaim_count"]) for i in ids}
        if stale_after < OUTAGE:
            # Every owner presumed its lease lost; each apply was taken over after the restart.
            for apply_id in ids:
                assert reclaims[apply_id] >= 1, describe(db, apply_id)
                assert int(row(db, apply_id)["lease_epoch"]) > epochs[apply_id] + 1
        else:
            # The owners rode the outage out under their leases.
            assert set(reclaims.values()) == {0}, "\n".join(describe(db, i) for i in ids)
        assert all_ids(stack) == ids
        assert_history_sound(stack)

    line = (
        f"store outage {up - down:.1f}s (SIGKILL, {OUTAGE:g}s down + start-up; stale_after "
        f"{stale_after:g}s): store back -> all {APPLIES} applies completed {done - up:.1f}s; "
        f"reclaims per apply {sorted(reclaims.values())}"
    )
    print(line)
    timing.append(line)


def test_a_store_that_is_down_at_submit_time_is_waited_for(
    stack: Stack, store: PrivateMariaDB, request: pytest.FixtureRequest, timing: list[str]
) -> None:
    """A submit (another app's ``send_task``) that reaches a worker while the store is down is
    not lost: it fails like any call to a service that is down, the caller retries after the
    outage, and that apply runs."""
    db = stack.db
    support.wipe(db)
    with fault_cluster(stack, request) as cluster:
        cluster.workers(1)
        cluster.beats(1)
        store.kill()
        try:
            result = stack.client.send_task("leasehold.submit_apply", kwargs=sleep_payload(0.3))
            wait_for(
                "the submit to fail while the store is down",
                lambda: result.ready(),
                timeout=RESULT_TIMEOUT,
            )
            assert result.failed(), result.result
            assert "database unavailable" in str(result.result), result.result
        finally:
            store.start()
        up = time.monotonic()
        apply_id = submit_task(stack, sleep_payload(0.3))
        wait_state(db, apply_id, "completed", timeout=RESULT_TIMEOUT)
        assert_each_task_done_once(stack, apply_id)
        assert all_ids(stack) == [apply_id]
        assert_history_sound(stack)
    timing.append(f"submit after the store came back: completed {time.monotonic() - up:.1f}s")
