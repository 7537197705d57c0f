"""Progress to Celery is best-effort (``tasks/progress.py``): a broker or result backend that is
down or hangs never fails or stalls the runner, reports coalesce to the newest, and an outage is
one warning a minute, not one per report."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from tasks import progress
from tasks.progress import WARN_EVERY, CeleryProgress
from tests.celery_fixtures import FakeClock, wait_until


def report(reporter: CeleryProgress, percent: int) -> None:
    reporter.progress(epoch=3, index=0, total=2, table="t1", percent=percent)


def test_a_backend_that_refuses_never_reaches_the_runner(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker test earlier in the run may have configured logging (Celery disables existing
    # loggers): make sure this module's warnings reach caplog.
    monkeypatch.setattr(progress.log, "disabled", False)
    monkeypatch.setattr(progress.log, "propagate", True)
    caplog.set_level(logging.WARNING, logger=progress.log.name)
    clock = FakeClock()

    def refused(meta: dict[str, Any]) -> None:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    reporter = CeleryProgress(7, store=refused, event=refused, monotonic=clock)
    for percent in range(1, 6):
        report(reporter, percent)  # never raises
        wait_until(lambda: reporter.failed >= 1 and reporter._latest is None)
    clock.advance(WARN_EVERY)
    report(reporter, 50)
    wait_until(lambda: reporter._latest is None and reporter.failed >= 2)
    reporter.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one at the start of the outage, one a minute later
    assert "apply 7: progress not reported to Celery (ConnectionError" in warnings[0]
    assert reporter.sent == 0


def test_a_hung_backend_never_stalls_the_runner_and_reports_coalesce() -> None:
    release = threading.Event()
    stored: list[int] = []

    def hangs(meta: dict[str, Any]) -> None:
        release.wait(10)
        stored.append(int(meta["percent"]))

    reporter = CeleryProgress(7, store=hangs, event=lambda meta: None)
    report(reporter, 1)
    wait_until(lambda: reporter._latest is None, what="the first report taken")
    for percent in range(2, 100):
        report(reporter, percent)  # returns at once although the backend hangs
    release.set()
    wait_until(lambda: reporter.sent == 2, what="the newest report sent")
    reporter.close()
    assert stored == [1, 99]  # the ones in between coalesced into the newest


def test_close_does_not_wait_for_a_backend_that_never_answers() -> None:
    never = threading.Event()

    def stuck(meta: dict[str, Any]) -> None:
        never.wait()

    reporter = CeleryProgress(7, store=stuck, event=lambda meta: None)
    report(reporter, 1)
    wait_until(lambda: reporter._latest is None, what="the report taken")
    reporter.close(timeout=0.2)  # returns; the stuck thread is a daemon, abandoned
    assert not reporter.join(0)
    never.set()
    assert reporter.join(5)
