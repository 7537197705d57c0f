"""An engine that breaks in an unexpected way (a target this worker does not know, a bug) fails
the apply with the real reason, instead of leaving it running to be reclaimed until abandoned."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from storage import applies
from storage.database import Database
from storage.states import ApplyState
from tasks.engines import Engine, EngineContext, TaskSpec
from tasks.engines.mysql import MySQLEngine
from tasks.interrupts import Interrupts
from tasks.runner import ApplyRunner
from tests.celery_fixtures import RecordingReporter, run_lease, sleep_apply, task_rows


class BrokenEngine(Engine):
    name = "sleep"

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        return dict(options)

    def already_applied(self, task: TaskSpec) -> bool:
        return False

    def run(self, task: TaskSpec, ctx: EngineContext) -> None:
        raise RuntimeError("engine bug: division by zero")


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        (BrokenEngine(), "RuntimeError: engine bug: division by zero"),
        # already_applied() needs the target's connection: unknown here, so it fails at once.
        (MySQLEngine({}), "ConfigurationError: target 'shop' is not in LEASEHOLD_TARGETS"),
    ],
    ids=["engine-bug", "unknown-target"],
)
def test_unexpected_engine_errors_fail_the_apply_with_the_reason(
    db: Database, engine: Engine, expected: str
) -> None:
    apply_id = sleep_apply(db, (0.01, 0.01), database="shop")
    lease = run_lease(db, apply_id)
    outcome = ApplyRunner(db, lease, engine, Interrupts(), RecordingReporter()).run()

    assert outcome.state == ApplyState.FAILED
    assert outcome.error == expected
    row = applies.get(db, apply_id)
    assert (row["state"], row["error"], row["lease_epoch"]) == ("failed", expected, lease.epoch + 1)
    assert [t["state"] for t in task_rows(db, apply_id)] == ["failed", "cancelled"]
