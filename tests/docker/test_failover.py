"""Failover across containers (tests/e2e/test_failover.py's scenario 2, on the production image):
SIGKILL the worker container that holds an apply mid-task; beat reclaims the stale lease and the
other worker container resumes the apply from its checkpoint and completes it, once."""

from __future__ import annotations

import time

import pytest
from pytest_celery import CeleryTestSetup, CeleryTestWorker

from storage import applies
from storage.database import Database
from tests.docker.stack import TEST_TIMEOUT, LeaseholdBeatContainer
from tests.e2e.helpers import (
    RECLAIM_INTERVAL,
    RESULT_TIMEOUT,
    SLACK,
    STALE_AFTER,
    assert_completed_once,
    describe,
    logs,
    reclaimed_from,
    row,
    sleep_payload,
    wait_for,
    wait_log_event,
    wait_progress,
    wait_state,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(TEST_TIMEOUT)]

FAILOVER_BOUND = STALE_AFTER + RECLAIM_INTERVAL + SLACK


def _holder(owner: str, workers: list[CeleryTestWorker]) -> CeleryTestWorker:
    """The worker whose Celery node holds a lease (owner: ``node name/pid/task id``)."""
    node = owner.split("/", 1)[0]
    for worker in workers:
        if worker.hostname() == node:
            return worker
    raise AssertionError(f"no worker container of ours holds the lease ({owner})")


def _exited(worker: CeleryTestWorker) -> bool:
    worker.container.reload()
    return bool(worker.container.status == "exited")


def _each_task_completed_once(db: Database, apply_id: int) -> None:
    tasks = applies.tasks(db, apply_id)
    entries = logs(db, apply_id)
    for task in tasks:
        label = f"{task['position'] + 1}/{len(tasks)}: {task['table_name']}"
        done = [e for e in entries if e.event == "task_completed" and e.message.endswith(label)]
        assert len(done) == 1, describe(db, apply_id)


def test_sigkill_a_worker_container_mid_apply_and_the_other_completes_it(
    celery_setup: CeleryTestSetup,
    leasehold_beat: LeaseholdBeatContainer,
    store: Database,
    request: pytest.FixtureRequest,  # pytest-docker-tools adds the containers' logs on failure
) -> None:
    workers = list(celery_setup.worker_cluster)
    assert len(workers) == 2
    submitted = celery_setup.app.send_task(
        "leasehold.submit_apply", kwargs=sleep_payload(0.3, 4.0, 0.3)
    )
    apply_id = int(submitted.get(timeout=RESULT_TIMEOUT)["apply_id"])
    task2 = wait_progress(store, apply_id, 1, 50, timeout=RESULT_TIMEOUT)
    before = row(store, apply_id)
    old_epoch = int(before["lease_epoch"])
    victim = _holder(str(before["lease_owner"]), workers)
    survivor = next(w for w in workers if w is not victim)
    assert float(task2["checkpoint"]["elapsed"]) >= 2.0, describe(store, apply_id)

    victim.kill()  # SIGKILL to the container: the worker gets no chance to hand anything back
    killed = time.monotonic()
    wait_for("the killed worker container to exit", lambda: _exited(victim), timeout=30)
    assert victim.container.attrs["State"]["ExitCode"] == 128 + 9

    resumed = wait_log_event(
        store, apply_id, "redeemed", min_epoch=old_epoch + 1, timeout=FAILOVER_BOUND + 30
    )
    print(
        f"[docker] SIGKILL -> resume (redeem at epoch {resumed.epoch}): "
        f"{time.monotonic() - killed:.2f}s (bound on the e2e suite {FAILOVER_BOUND:g}s)"
    )
    assert resumed.epoch == old_epoch + 1
    assert survivor.hostname() in resumed.message, resumed

    wait_state(store, apply_id, "completed", timeout=RESULT_TIMEOUT)
    assert_completed_once(store, apply_id)  # one completion, epochs non-decreasing
    _each_task_completed_once(store, apply_id)
    assert reclaimed_from(store, apply_id) == [old_epoch]
    after = [e for e in logs(store, apply_id) if e.epoch == old_epoch + 1]
    assert [e.event for e in after][:3] == ["reclaimed", "redeemed", "task_started"]
    assert after[2].message == "task 2/3: t2", after  # task 1 was not run again

    # The image's own audit of the stored history finds nothing wrong.
    code, output = survivor.container.exec_run(["leasehold", "audit", "--apply", str(apply_id)])
    assert code == 0, output.decode()
