"""Engines: the sleep engine (progress, prompt cancellation, resume from its checkpoint) and the
mysql engine against a real MariaDB/MySQL target database created and dropped for this module."""

from __future__ import annotations

import time

import pytest

from storage.errors import ConfigurationError, InvalidInput, LeaseLost
from tasks.engines import (
    EngineCancelled,
    EngineContext,
    EngineError,
    engine_class,
    make_engine,
)
from tasks.engines.mysql import MySQLEngine
from tasks.engines.sleep import SleepEngine
from tests.celery_fixtures import wait_until
from tests.engine_doubles import Recorder, Running, spec

# --- registry ----------------------------------------------------------------------------------


def test_engines_by_name() -> None:
    assert engine_class("sleep") is SleepEngine
    assert engine_class("mysql") is MySQLEngine
    assert isinstance(make_engine("sleep", targets={}), SleepEngine)
    assert isinstance(make_engine("mysql", targets={"a": "mysql://x"}), MySQLEngine)
    with pytest.raises(InvalidInput, match="unknown engine 'pt-osc'; choose one of"):
        make_engine("pt-osc", targets={})


# --- sleep -------------------------------------------------------------------------------------


def test_sleep_reports_increasing_progress_with_checkpoints() -> None:
    progress = Recorder()
    SleepEngine().run(spec(options={"seconds": 0.2}), EngineContext(progress=progress))
    assert len(progress.calls) >= 3
    assert progress.percents == sorted(progress.percents)
    assert progress.calls[-1] == (100, {"elapsed": 0.2})
    elapsed = [c["elapsed"] for _, c in progress.calls if c is not None]
    assert elapsed == sorted(elapsed)
    assert 0 < elapsed[0] < 0.2


def test_sleep_resumes_from_its_checkpoint() -> None:
    progress = Recorder()
    started = time.monotonic()
    SleepEngine().run(
        spec(options={"seconds": 5.0}, checkpoint={"elapsed": 4.9}),
        EngineContext(progress=progress),
    )
    assert time.monotonic() - started < 4.0  # 0.1 s left of 5, not 5 (generous under load)
    assert progress.percents[0] >= 98
    assert all(c is not None and c["elapsed"] >= 4.9 for _, c in progress.calls)
    assert progress.calls[-1] == (100, {"elapsed": 5.0})


def test_sleep_with_a_finished_checkpoint_does_no_more_work() -> None:
    progress = Recorder()
    SleepEngine().run(
        spec(options={"seconds": 3.0}, checkpoint={"elapsed": 3.0}), EngineContext(progress)
    )
    assert progress.calls == [(100, {"elapsed": 3.0})]


def test_sleep_cancels_promptly() -> None:
    """Promptly means at its next step, not after its work: once cancelled, the engine reports at
    most the one step it was in and raises, long before the 60 s of work it was given (the bound
    is generous on purpose; the count of steps is what is exact)."""
    progress = Recorder()
    ctx = EngineContext(progress=progress)
    running = Running(SleepEngine(), spec(options={"seconds": 60}), ctx)
    wait_until(lambda: len(progress.calls) >= 2, what="the engine's progress")
    cancelled_at = time.monotonic()
    ctx.cancelled.set()
    reported_at_cancel = len(progress.calls)  # read after the set: at most one step is in flight
    assert isinstance(running.join(30), EngineCancelled)
    assert running.ended_at is not None
    assert running.ended_at - cancelled_at < 30
    assert len(progress.calls) - reported_at_cancel <= 1
    assert progress.percents[-1] < 100


def test_sleep_already_cancelled_does_nothing() -> None:
    progress = Recorder()
    ctx = EngineContext(progress=progress)
    ctx.cancelled.set()
    with pytest.raises(EngineCancelled):
        SleepEngine().run(spec(options={"seconds": 60}), ctx)
    assert progress.calls == []


def test_sleep_fail_raises_engine_error_after_the_work() -> None:
    progress = Recorder()
    with pytest.raises(EngineError, match="task t failed as asked"):
        SleepEngine().run(spec(options={"seconds": 0.05, "fail": True}), EngineContext(progress))
    assert progress.percents[-1] == 100


def test_sleep_zero_seconds() -> None:
    progress = Recorder()
    SleepEngine().run(spec(options={"seconds": 0.0}), EngineContext(progress))
    assert progress.calls == [(100, {"elapsed": 0.0})]


def test_sleep_lets_a_lost_lease_from_progress_through() -> None:
    with pytest.raises(LeaseLost):
        SleepEngine().run(spec(options={"seconds": 30}), EngineContext(Recorder(raise_on_call=1)))


# --- mysql -------------------------------------------------------------------------------------


def test_mysql_target_not_configured() -> None:
    engine = MySQLEngine({"other": "mysql+mysqldb://root@127.0.0.1:1/x"})
    task = spec("ALTER TABLE items ADD COLUMN c INT", database="shop")
    with pytest.raises(ConfigurationError, match="target 'shop' is not in LEASEHOLD_TARGETS"):
        engine.already_applied(task)
    with pytest.raises(ConfigurationError, match="target 'shop' is not in LEASEHOLD_TARGETS"):
        engine.run(task, EngineContext(progress=Recorder()))


def test_mysql_takes_no_options() -> None:
    assert MySQLEngine.validate_options({}) == {}
    with pytest.raises(InvalidInput, match="mysql engine takes no options"):
        MySQLEngine.validate_options({"seconds": 1})
