"""An engine that breaks in an unexpected way (a target this worker does not know, a bug) fails
the apply with the real reason, instead of leaving it running to be reclaimed until abandoned.

A stop or an end is committed first and only then told to the effects (``Effects.ended``), which
publish it on their own time: the state change never waits for GitHub, and it is owed to the
pull request from the very transaction that made it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import pytest

from storage import applies, publications
from storage.database import Database
from storage.states import ApplyState
from tasks.effects import NoEffects
from tasks.engines import Engine, EngineContext, TaskSpec
from tasks.engines.mysql import MySQLEngine
from tasks.engines.sleep import SleepEngine
from tasks.interrupts import Interrupts, Reason
from tasks.runner import ApplyRunner
from tests.celery_fixtures import RecordingReporter, run_lease, sleep_apply, task_rows

T = TypeVar("T")


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


class WatchingEffects(NoEffects):
    """Effects that look at the store when they are told of an end."""

    def __init__(self, db: Database, apply_id: int) -> None:
        self.db = db
        self.apply_id = apply_id
        self.calls: list[str] = []
        self.seen: list[tuple[str, Any]] = []

    def start(self) -> None:
        self.calls.append("start")

    def progress(self, *, boundary: bool) -> None:
        self.calls.append("boundary" if boundary else "progress")

    def ended(self, state: ApplyState) -> None:
        self.calls.append(f"ended:{state}")
        owed = publications.get(self.db, self.apply_id)
        self.seen.append((applies.get(self.db, self.apply_id)["state"], owed and owed["due_at"]))

    def close(self) -> None:
        self.calls.append("close")


@pytest.mark.parametrize(
    ("stop", "state"), [(False, ApplyState.COMPLETED), (True, ApplyState.STOPPED)]
)
def test_an_end_is_committed_and_owed_before_the_effects_hear_of_it(
    db: Database, stop: bool, state: ApplyState
) -> None:
    apply_id = sleep_apply(db, (0.01, 0.01), pull_request=True)
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()
    if stop:
        interrupts.interrupt(Reason.STOP)
    effects = WatchingEffects(db, apply_id)
    runner = ApplyRunner(db, lease, SleepEngine(), interrupts, RecordingReporter(), effects=effects)
    assert runner.run().state == state

    assert effects.calls[0] == "start"
    assert effects.calls[-1] == f"ended:{state}"  # once, last; closing is the caller's
    assert effects.calls.count(f"ended:{state}") == 1
    ((seen_state, due_at),) = effects.seen
    assert seen_state == state  # committed before the effects heard of it
    assert due_at is not None  # and owed to the pull request in the same transaction
