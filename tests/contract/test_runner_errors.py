"""An engine that breaks in an unexpected way (a target this worker does not know, a bug) fails
the apply with the real reason, instead of leaving it running to be reclaimed until abandoned.

A stop or terminal publication that fails (``EffectRetryable``, ``EffectRefused``: the effects'
own terms, whatever is behind them) rolls back with its transition and is retried as the effects
retry; if it is refused or keeps failing, the state change is made without it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pytest

from storage import applies, fenced
from storage.database import Database
from storage.fenced import Fenced
from storage.states import ApplyState
from tasks.effects import EffectError, EffectRefused, EffectRetryable, NoEffects
from tasks.engines import Engine, EngineContext, TaskSpec
from tasks.engines.mysql import MySQLEngine
from tasks.engines.sleep import SleepEngine
from tasks.interrupts import Interrupts, Reason
from tasks.runner import ApplyRunner, Outcome
from tests.celery_fixtures import RecordingReporter, run_lease, sleep_apply, task_rows
from tests.support import log_events

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


class FailingPublication(NoEffects):
    """Effects whose publication fails with ``failures`` in turn, each attempt leaving a log line
    in the caller's transaction first, retried up to ``attempts`` times without pausing."""

    def __init__(self, *failures: EffectError, attempts: int = 3) -> None:
        self.failures = list(failures)
        self.attempts = attempts
        self.published: list[ApplyState] = []

    def publish_in(self, fx: Fenced, state: ApplyState, *, error: str | None = None) -> None:
        self.published.append(state)
        fenced.append_log(fx, "published", f"attempt {len(self.published)}")
        if self.failures:
            raise self.failures.pop(0)

    def retrying(self, attempt: Callable[[], T]) -> T:
        for _ in range(self.attempts - 1):
            try:
                return attempt()
            except EffectRetryable:
                continue
        return attempt()


def _run(db: Database, effects: FailingPublication, *, stop: bool = False) -> tuple[int, Outcome]:
    apply_id = sleep_apply(db, (0.01, 0.01))
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()
    if stop:
        interrupts.interrupt(Reason.STOP)
    runner = ApplyRunner(db, lease, SleepEngine(), interrupts, RecordingReporter(), effects=effects)
    return apply_id, runner.run()


@pytest.mark.parametrize(
    ("stop", "state"), [(False, ApplyState.COMPLETED), (True, ApplyState.STOPPED)]
)
def test_a_failed_publication_rolls_back_with_its_transition_and_is_retried(
    db: Database, stop: bool, state: ApplyState
) -> None:
    effects = FailingPublication(
        EffectRetryable("502"), EffectRetryable("rate limited", retry_after=1)
    )
    apply_id, outcome = _run(db, effects, stop=stop)

    assert outcome.state == state
    assert effects.published == [state] * 3
    events = log_events(db, apply_id)
    assert [e for _, e in events if e == "published"] == ["published"]  # the third, committed
    assert events[-1][1] == state  # made once, with its publication
    assert applies.get(db, apply_id)["state"] == state


@pytest.mark.parametrize(
    "failures",
    [
        (EffectRefused("422"),),
        (EffectRetryable("503"), EffectRetryable("503"), EffectRetryable("503")),
    ],
    ids=["refused", "keeps-failing"],
)
def test_a_publication_that_cannot_be_made_does_not_hold_the_state_change_back(
    db: Database, failures: tuple[EffectError, ...]
) -> None:
    effects = FailingPublication(*failures)
    apply_id, outcome = _run(db, effects)

    assert outcome.state == ApplyState.COMPLETED
    assert effects.published == [ApplyState.COMPLETED] * len(failures)  # a refusal: tried once
    events = [e for _, e in log_events(db, apply_id)]
    assert "published" not in events  # every attempt rolled back
    assert events[-1] == "completed"
    assert applies.get(db, apply_id)["state"] == ApplyState.COMPLETED
