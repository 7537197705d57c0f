"""Helpers for the fast tests of ``tasks/``: staging applies, recording what leaves the code under
test (messages, progress), polling with deadlines instead of sleeping, databases that cannot be
reached, and the in-process Celery worker (started explicitly, never through pytest-celery's
fixtures, which shadow ``celery.contrib.pytest``'s; see issue 3)."""

from __future__ import annotations

import contextlib
import os
import runpy
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar
from unittest import mock

from leases import Lease, dispatch, redeem
from storage import applies, open_database
from storage.applies import NewApply, NewTask
from storage.database import Database
from tests.support import new_database

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def celeryconfig_settings(env: Mapping[str, str], cwd: Path | None = None) -> dict[str, Any]:
    """``celeryconfig.py`` evaluated under ``env`` alone (and in ``cwd``), as a new process with
    that environment reads it: its Celery settings, for an app configured exactly as the
    workers' or the console script's would be (without importing ``tasks.app``)."""
    with mock.patch.dict(os.environ, dict(env), clear=True), contextlib.chdir(cwd or Path.cwd()):
        namespace = runpy.run_path(str(REPO / "celeryconfig.py"), run_name="test_celeryconfig")
    return {
        key: value
        for key, value in namespace.items()
        if key.islower()
        and not key.startswith("_")
        and not isinstance(value, ModuleType)
        and not callable(value)
        and key != "annotations"
    }


def wait_until(
    predicate: Callable[[], T | bool | None],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned), or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class FakeClock:
    """An injectable ``monotonic``: time moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


@dataclass
class SentLeases:
    """A ``send`` for ``tasks.service``: records each lease instead of ringing a broker."""

    leases: list[Lease] = field(default_factory=list)

    def __call__(self, lease: Lease) -> bool:
        self.leases.append(lease)
        return True


@dataclass(frozen=True, slots=True)
class Report:
    epoch: int
    index: int
    total: int
    table: str
    percent: int


class RecordingReporter:
    """A ``tasks.runner.Reporter`` that records every report and can run a hook on each."""

    def __init__(self, hook: Callable[[Report], None] | None = None) -> None:
        self.reports: list[Report] = []
        self.hook = hook
        self._lock = threading.Lock()

    def progress(self, *, epoch: int, index: int, total: int, table: str, percent: int) -> None:
        report = Report(epoch, index, total, table, percent)
        with self._lock:
            self.reports.append(report)
        if self.hook is not None:
            self.hook(report)

    def seen(self, predicate: Callable[[Report], bool]) -> bool:
        return self.count(predicate) > 0

    def count(self, predicate: Callable[[Report], bool]) -> int:
        with self._lock:
            return sum(1 for r in self.reports if predicate(r))


def sleep_apply(
    db: Database,
    seconds: Sequence[float] = (0.05, 0.05),
    *,
    fail_at: int | None = None,
    request_id: str | None = None,
    database: str | None = None,
    pull_request: bool = False,
) -> int:
    """A queued ``sleep`` apply with one apply task per entry of ``seconds``, on a line (database)
    of its own unless ``database`` names one to share; on pull request acme/shop#42 if
    ``pull_request``."""
    tasks = [
        NewTask(
            f"t{i}",
            f"ALTER TABLE t{i} ADD COLUMN c INT",
            {"seconds": float(s), "fail": i == fail_at},
        )
        for i, s in enumerate(seconds)
    ]
    new = NewApply(
        database_name=database or new_database(),
        environment="staging",
        engine="sleep",
        tasks=tasks,
        request_id=request_id,
        repository="acme/shop" if pull_request else None,
        pull_request=42 if pull_request else None,
        head_sha="0" * 40 if pull_request else None,
    )
    return applies.create(db, new).apply_id


def run_lease(db: Database, apply_id: int, owner: str = "test-worker") -> Lease:
    """Dispatch (from pending or stopped) and redeem: the lease of a running worker."""
    lease = dispatch(db, apply_id)
    redeem(db, lease, owner)
    return lease


def unreachable_url(dialect: str, tmp_path: Path) -> str:
    """A URL of the same dialect whose database cannot be reached."""
    if dialect == "sqlite":
        return f"sqlite:///{tmp_path / 'gone' / 'nowhere' / 'leasehold.sqlite3'}"
    if dialect == "postgresql":
        return "postgresql+psycopg://postgres@127.0.0.1:1/leasehold"
    return "mysql+mysqldb://root@127.0.0.1:1/leasehold"


def unreachable(dialect: str, tmp_path: Path) -> Database:
    """A database on ``dialect`` that fails every transaction with ``StorageUnavailable``."""
    kwargs: dict[str, Any] = {}
    if dialect != "sqlite":
        kwargs["connect_args"] = {"connect_timeout": 2}
    return open_database(unreachable_url(dialect, tmp_path), **kwargs)


def task_rows(db: Database, apply_id: int) -> list[dict[str, Any]]:
    return [dict(r) for r in applies.tasks(db, apply_id)]


def apply_row(db: Database, apply_id: int) -> dict[str, Any]:
    return dict(applies.get(db, apply_id))


# --- the in-process Celery worker --------------------------------------------------------------

_SWITCHED = (
    "broker_url",
    "result_backend",
    "broker_transport_options",
    "leasehold_database_url",
    "leasehold_heartbeat_interval",
    "leasehold_stale_after",
    "task_default_queue",
)


def forget_connections(app: Any) -> None:
    """Drop the app's cached broker pool and result backend so that the next use reads the
    (changed) configuration. Celery caches both on first use."""
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)


@contextmanager
def inprocess_worker(
    database_url: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    concurrency: int = 4,
) -> Iterator[Any]:
    """An embedded Celery worker (threads pool) on the memory broker and the in-memory cache
    result backend, with leasehold pointed at ``database_url``. ``app.conf`` and leasehold's
    runtime are restored afterwards."""
    from celery.contrib.testing.worker import start_worker

    from tasks import runtime
    from tasks.app import app

    changes: dict[str, Any] = {
        "broker_url": "memory://",
        "result_backend": "cache+memory://",
        # The memory transport polls its queues; the default of 1 s would delay every message.
        "broker_transport_options": {"polling_interval": 0.005},
        "leasehold_database_url": database_url,
        "leasehold_heartbeat_interval": 0.1,
        "leasehold_stale_after": 5.0,
        **(overrides or {}),
    }
    saved = {key: app.conf.get(key) for key in changes}
    runtime.reset()
    forget_connections(app)
    app.conf.update(changes)
    try:
        with start_worker(
            app,
            pool="threads",
            concurrency=concurrency,
            perform_ping_check=False,
            shutdown_timeout=20.0,
        ) as worker:
            yield worker
    finally:
        runtime.reset()
        app.conf.update(saved)
        forget_connections(app)
