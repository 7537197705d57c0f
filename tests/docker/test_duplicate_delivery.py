"""Duplicate delivery across containers (tests/e2e/test_messages.py's scenario 4, on the
production image): the same run_apply message published twice, to two worker containers; one
redeems the lease and runs the apply, the other is refused (``not_redeemed``) and writes
nothing."""

from __future__ import annotations

import pytest
from pytest_celery import CeleryTestSetup

from storage.database import Database
from tests.docker.stack import APPLY_QUEUE, TEST_TIMEOUT
from tests.e2e.helpers import (
    RESULT_TIMEOUT,
    assert_completed_once,
    dispatched_apply,
    events,
    logs,
    owner_task_id,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(TEST_TIMEOUT)]

RUN_APPLY = "leasehold.run_apply"


def test_a_run_apply_delivered_twice_runs_once(
    celery_setup: CeleryTestSetup,
    store: Database,
    request: pytest.FixtureRequest,  # pytest-docker-tools adds the containers' logs on failure
) -> None:
    workers = list(celery_setup.worker_cluster)
    assert len(workers) == 2
    # A real lease, dispatched in the store as submit does, whose message nobody sent yet.
    lease = dispatched_apply(store, 0.5, 0.5)
    apply_id = lease.apply_id
    kwargs = {"apply_id": apply_id, "lease": lease.to_json()}
    sent = [
        celery_setup.app.send_task(RUN_APPLY, kwargs=kwargs, queue=APPLY_QUEUE) for _ in range(2)
    ]
    results = [r.get(timeout=RESULT_TIMEOUT) for r in sent]

    assert sorted(r["outcome"] for r in results) == ["completed", "not_redeemed"], results
    assert events(store, apply_id) == [
        (1, "dispatched"),
        (1, "redeemed"),
        *[(1, "task_started"), (1, "task_completed")] * 2,
        (2, "completed"),
    ]
    assert_completed_once(store, apply_id)
    redeemed = [e for e in logs(store, apply_id) if e.event == "redeemed"]
    assert len(redeemed) == 1
    winner = next(r for r, res in zip(sent, results, strict=True) if res["outcome"] == "completed")
    owner = redeemed[0].message.rsplit(" by ", 1)[1]
    assert owner_task_id(owner) == winner.id
    # The lease was redeemed by one of the two worker containers.
    assert owner.split("/", 1)[0] in {w.hostname() for w in workers}, owner
