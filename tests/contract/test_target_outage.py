"""Target outages and the target-side fence, with ``ApplyRunner`` driven in-process against a real
store (SQLite and MariaDB) and real targets:

- a private ``mariadbd`` (``tests/servers/``) SIGKILLed mid-ALTER and started again, as a
  failover does: an outage shorter than ``LEASEHOLD_TARGET_RETRY`` is ridden out and the apply
  completes by itself; a longer one fails the apply with a message for people;
- a target that refuses connections while a stop, cancel or lost lease arrives: the wait between
  retries ends at once;
- a frozen target (SIGSTOP): the engine's cancellation cannot hang on it;
- on the shared MariaDB (a scratch database): a statement of an earlier epoch of the apply, sent
  by the test as a frozen predecessor would have and kept running by a metadata lock the test
  holds, is waited for (then the change is found made and not run again), or killed on stop and
  cancel; and the holder's own statement that outlived its lost connection (a TCP relay killed
  under it) is waited for too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, make_url, text

from leases import Lease, dispatch, redeem
from storage import applies, control
from storage.applies import NewApply, NewTask
from storage.database import Database
from storage.errors import LeaseLost
from storage.states import ApplyState, ControlAction, TaskState
from tasks import service
from tasks.engines import EngineCancelled, EngineContext
from tasks.engines import mysql as mysql_engine
from tasks.engines.mysql import MySQLEngine
from tasks.engines.tags import Tag
from tasks.heartbeat import Heartbeat
from tasks.interrupts import Interrupts, Reason
from tasks.runner import ApplyRunner, Outcome
from tests import support
from tests.celery_fixtures import RecordingReporter, SentLeases, run_lease, wait_until
from tests.conftest import scratch_mysql_database, unavailable
from tests.engine_doubles import Recorder, Running, spec
from tests.races import Spawn
from tests.servers import PrivateMariaDB, free_port, private_mariadb

pytestmark = pytest.mark.mysql

ALTER = "ALTER TABLE big ADD COLUMN extra INT, ALGORITHM=COPY"
ROWS = 300_000  # an ALTER of about a second on the private server: long enough to crash under
WINDOW = 60.0  # LEASEHOLD_TARGET_RETRY of the tests that ride an outage out
SHORT_WINDOW = 2.0  # ... and of the one that outlasts it
OUTAGE = 3.0  # how long a crashed target stays down once the runner noticed: a failover's seconds
# The slow target of the fence test: 2^19 rows of 300 bytes, built by doubling in about 4 s; a
# copying ALTER of it takes 3-5 s on a 2-core machine, time enough to be seen running.
DOUBLINGS = 19
BOILERPLATE = ("sqlalche.me", "Background on this error", "[SQL:", "MySQLdb", "OperationalError")


@dataclass(frozen=True)
class Target:
    name: str  # the apply's database, and the target's name in LEASEHOLD_TARGETS
    url: str


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateMariaDB]:
    """A private mariadbd for the tests that crash their target (never the shared one)."""
    with private_mariadb(tmp_path_factory.mktemp("target")) as server:
        yield server


def _running(server: PrivateMariaDB) -> bool:
    return server.proc is not None and server.proc.poll() is None


@pytest.fixture
def crashable(server: PrivateMariaDB) -> Iterator[Target]:
    """A database of the test's own on the private server, with a table ``big``; the server is
    running again after the test, whatever the test did to it."""
    if not _running(server):
        server.start()
    name = support.new_database()
    url = server.create_database(name)
    server.execute("CREATE TABLE big (id INT PRIMARY KEY, pad VARCHAR(200))", name)
    server.execute(f"INSERT INTO big SELECT seq, REPEAT('x', 200) FROM seq_1_to_{ROWS}", name)
    try:
        yield Target(name, url)
    finally:
        if not _running(server):
            server.start()
        server.execute(f"DROP DATABASE `{name}`")


@pytest.fixture(scope="module")
def slow_database(server: PrivateMariaDB) -> Iterator[str]:
    """A database on the private server whose table ``big`` is large enough for
    ``ALTER TABLE big ... ALGORITHM=COPY`` to run for seconds; built once per module."""
    if not _running(server):
        server.start()
    name = support.new_database()
    server.create_database(name)
    server.execute(
        "CREATE TABLE big (id INT AUTO_INCREMENT PRIMARY KEY, pad VARCHAR(300) NOT NULL)", name
    )
    server.execute("INSERT INTO big (pad) VALUES (REPEAT('x', 300))", name)
    for _ in range(DOUBLINGS):
        server.execute("INSERT INTO big (pad) SELECT pad FROM big", name)
    yield name
    if _running(server):
        server.execute(f"DROP DATABASE `{name}`")


@pytest.fixture
def slow_target(server: PrivateMariaDB, slow_database: str) -> Iterator[Target]:
    """The slow database as a target; ``big`` is as built again after the test (dropping a
    column is instant, the next copying ALTER copies the whole table all the same)."""
    if not _running(server):
        server.start()
    try:
        yield Target(slow_database, server.url(slow_database))
    finally:
        if not _running(server):
            server.start()
        server.execute(
            "ALTER TABLE big DROP COLUMN IF EXISTS extra, ALGORITHM=INSTANT", slow_database
        )


@pytest.fixture(scope="module")
def shared_target_url() -> Iterator[str]:
    """A scratch database on the shared MariaDB for the fence tests (nothing is crashed there)."""
    with scratch_mysql_database("leasehold_fence") as url:
        yield url


@pytest.fixture
def fence_target(shared_target_url: str) -> Iterator[Target]:
    engine = create_engine(shared_target_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE big (id INT PRIMARY KEY, pad VARCHAR(20))"))
        conn.execute(text("INSERT INTO big VALUES (1, 'a'), (2, 'b')"))
    try:
        yield Target(support.new_database(), shared_target_url)
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS big"))
        engine.dispose()


def _mysql_apply(db: Database, target: Target, ddl: str = ALTER) -> int:
    new = NewApply(
        database_name=target.name,
        environment="staging",
        engine="mysql",
        tasks=[NewTask("big", ddl, {})],
    )
    return applies.create(db, new).apply_id


def _runner(
    db: Database,
    lease: Lease,
    target: Target,
    *,
    window: float = WINDOW,
    interrupts: Interrupts | None = None,
    url: str | None = None,
) -> ApplyRunner:
    engine = MySQLEngine({target.name: url or target.url})
    return ApplyRunner(
        db,
        lease,
        engine,
        interrupts or Interrupts(),
        RecordingReporter(),
        progress_interval=0.0,
        target_retry=window,
    )


def _logs(db: Database, apply_id: int) -> list[tuple[int, str, str, str]]:
    """(epoch, level, event, message) of every log line of an apply, in order."""
    return [
        (int(r["lease_epoch"]), str(r["level"]), str(r["event"]), str(r["message"]))
        for r in applies.logs(db, apply_id)
    ]


def _events(db: Database, apply_id: int) -> list[str]:
    """The events of an apply's log after it was dispatched and redeemed."""
    events = [event for _, _, event, _ in _logs(db, apply_id)]
    return events[events.index("redeemed") + 1 :] if "redeemed" in events else events


def _assert_for_people(db: Database, apply_id: int) -> None:
    """No driver wrapping anywhere an engine error is shown: the apply's and its tasks' errors
    and every log line."""
    row = applies.get(db, apply_id)
    shown = [row["error"] or "", *(t["error"] or "" for t in applies.tasks(db, apply_id))]
    shown += [message for *_, message in _logs(db, apply_id)]
    for text_ in shown:
        for boilerplate in BOILERPLATE:
            assert boilerplate not in text_, text_


def _columns(query: Any, database: str, column: str = "extra") -> int:
    """How many columns ``column`` ``big`` has (0 or 1: a column exists once or not at all; the
    point is that the change was made, once, and the apply says so)."""
    return int(
        query(
            "SELECT COUNT(*) FROM information_schema.COLUMNS "
            f"WHERE TABLE_SCHEMA = '{database}' AND TABLE_NAME = 'big' AND COLUMN_NAME = '{column}'"
        )
    )


def _tagged_alters(query: Any) -> int:
    return int(
        query(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            "WHERE INFO LIKE '/* leasehold %ALTER TABLE big%'"
        )
    )


def _on(server: PrivateMariaDB) -> Any:
    def query(sql: str) -> Any:
        return server.execute(sql)[0][0]

    return query


def _on_url(url: str) -> Any:
    def query(sql: str) -> Any:
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return conn.execute(text(sql)).scalar()
        finally:
            engine.dispose()

    return query


def _database_of(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]


# --- outages of a crashed target ------------------------------------------------------------------


def test_a_target_crash_shorter_than_the_window_is_ridden_out(
    db: Database, server: PrivateMariaDB, crashable: Target, spawn: Spawn
) -> None:
    apply_id = _mysql_apply(db, crashable)
    lease = run_lease(db, apply_id)
    runner = spawn("runner", _runner(db, lease, crashable).run)
    runner.start()
    wait_until(lambda: _tagged_alters(_on(server)), timeout=30, what="the ALTER on the target")
    server.kill()  # SIGKILL mid-ALTER, as a failover sees it
    crashed = time.monotonic()
    wait_until(
        lambda: "target_waiting" in _events(db, apply_id), timeout=30, what="the runner to wait"
    )
    noticed = time.monotonic() - crashed
    time.sleep(OUTAGE)  # the outage itself (a fault's duration, not a wait for a race)
    server.start()
    restarted = time.monotonic()
    outcome = runner.result(timeout=60)
    recovered = time.monotonic() - restarted

    assert outcome == Outcome(ApplyState.COMPLETED), _logs(db, apply_id)
    assert _columns(_on(server), crashable.name) == 1
    events = _events(db, apply_id)
    assert events == [
        "task_started",
        "target_waiting",
        "target_recovered",
        "task_completed",
        "completed",
    ], events
    (waiting,) = [m for _, _, e, m in _logs(db, apply_id) if e == "target_waiting"]
    assert re.fullmatch(
        rf"target '{crashable.name}' unavailable: (Lost connection to server during query|"
        r"Server has gone away) \(MySQL error 20(13|06)\); retrying for up to 60 s",
        waiting,
    ), waiting
    _assert_for_people(db, apply_id)
    print(
        f"\ntarget crash mid-ALTER: runner noticed in {noticed:.2f} s, target down "
        f"{noticed + OUTAGE:.1f} s, apply completed {recovered:.2f} s after the restart"
    )


def test_a_target_down_longer_than_the_window_fails_the_apply_for_people(
    db: Database, server: PrivateMariaDB, crashable: Target, spawn: Spawn
) -> None:
    apply_id = _mysql_apply(db, crashable)
    lease = run_lease(db, apply_id)
    runner = spawn("runner", _runner(db, lease, crashable, window=SHORT_WINDOW).run)
    runner.start()
    wait_until(lambda: _tagged_alters(_on(server)), timeout=30, what="the ALTER on the target")
    crashed = time.monotonic()  # before the kill: the runner may notice before kill() returns
    server.kill()
    outcome = runner.result(timeout=60)
    failed_after = time.monotonic() - crashed

    assert outcome.state == ApplyState.FAILED
    assert outcome.error is not None
    assert re.fullmatch(
        rf"target '{crashable.name}' unreachable for 2 s: Can't connect to .+ "
        r"\(MySQL error 200[23]\)",
        outcome.error,
    ), outcome.error
    row = applies.get(db, apply_id)
    assert (row["state"], row["error"]) == ("failed", outcome.error)
    (task,) = applies.tasks(db, apply_id)
    assert (task["state"], task["error"]) == (TaskState.FAILED, outcome.error)
    assert _events(db, apply_id) == ["task_started", "target_waiting", "failed"]
    _assert_for_people(db, apply_id)
    assert SHORT_WINDOW <= failed_after < SHORT_WINDOW + 10
    print(f"\ntarget down for good: the apply failed {failed_after:.2f} s after the crash")
    server.start()
    assert _columns(_on(server), crashable.name) == 0  # the crash rolled the ALTER back

    # the target is back: an operator retries the apply, and it completes, the column made once
    sent: list[Lease] = []
    service.control_apply(db, apply_id, "retry", "ops", sent.append)
    (retried,) = sent
    redeem(db, retried, "worker-2")
    assert _runner(db, retried, crashable).run().state == ApplyState.COMPLETED
    assert _columns(_on(server), crashable.name) == 1
    assert [t["state"] for t in applies.tasks(db, apply_id)] == [TaskState.COMPLETED]


# --- interrupts while the target is away ----------------------------------------------------------


def _refusing() -> Target:
    """A target nothing listens for: every connection is refused at once."""
    name = support.new_database()
    return Target(name, f"mysql+mysqldb://root@127.0.0.1:{free_port()}/{name}")


@pytest.mark.parametrize("action", [ControlAction.STOP, ControlAction.CANCEL])
def test_a_stop_or_cancel_ends_the_wait_for_the_target_at_once(
    db: Database, spawn: Spawn, action: ControlAction
) -> None:
    """An operator's request, through the real heartbeat thread, while the runner waits out an
    outage with an hour's window: acted on within the heartbeat interval, not the window."""
    target = _refusing()
    apply_id = _mysql_apply(db, target)
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()
    beat = Heartbeat(db, lease, interrupts, interval=0.05, stale_after=30)
    beat.start()
    try:
        runner = spawn("runner", _runner(db, lease, target, window=3600, interrupts=interrupts).run)
        runner.start()
        wait_until(lambda: "target_waiting" in _events(db, apply_id), what="the runner to wait")
        asked = time.monotonic()
        service.control_apply(db, apply_id, str(action), "ops", SentLeases())
        outcome = runner.result(timeout=20)
        took = time.monotonic() - asked
    finally:
        beat.stop()
        beat.join(10)
    expected = ApplyState.STOPPED if action == ControlAction.STOP else ApplyState.CANCELLED
    assert outcome.state == expected
    assert took < 5, took
    (task,) = applies.tasks(db, apply_id)
    assert task["state"] == (
        TaskState.PENDING if action == ControlAction.STOP else TaskState.CANCELLED
    )
    assert control.pending(db, apply_id) == []  # the request was acted on and completed
    print(f"\n{action} during a target outage: acted on in {took:.2f} s")


def test_a_lease_lost_during_the_wait_for_the_target_writes_nothing_more(
    db: Database, spawn: Spawn
) -> None:
    target = _refusing()
    apply_id = _mysql_apply(db, target)
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()
    beat = Heartbeat(db, lease, interrupts, interval=0.05, stale_after=30)
    beat.start()
    try:
        runner = spawn("runner", _runner(db, lease, target, window=3600, interrupts=interrupts).run)
        runner.start()
        wait_until(lambda: "target_waiting" in _events(db, apply_id), what="the runner to wait")
        rotated = time.monotonic()
        support.hand_back(db, lease, reason="test: another holder")  # epoch + 1
        error = runner.error(timeout=20)
        took = time.monotonic() - rotated
    finally:
        beat.stop()
        beat.join(10)
    assert isinstance(error, LeaseLost), error
    assert took < 5, took
    logs = _logs(db, apply_id)
    assert logs[-1][2] == "handed_back"  # nothing of the old epoch after the rotation
    assert [epoch for epoch, *_ in logs] == sorted(epoch for epoch, *_ in logs)


@pytest.mark.parametrize("when", ["before-its-poll", "during-its-poll"])
def test_cancelling_cannot_hang_on_a_frozen_target(server: PrivateMariaDB, when: str) -> None:
    """A target frozen mid-statement (SIGSTOP: connections hang, nothing is refused): the
    engine gives up watching and killing within its short timeouts once asked to stop, and the
    outcome is the stop, not the outage (which would be retried for minutes). ``during-its-poll``:
    the stop is asked once the watcher's progress poll already hangs on the frozen target (a poll
    starts every ``POLL`` s, so after a few the watcher is in one), so the watcher learns of the
    outage, not of the stop, first."""
    name = support.new_database()
    url = server.create_database(name)
    progress = Recorder()
    # An apply id no apply of this module has: the statement given up on below is left
    # running, and a later test's holder of apply 1 would rightly wait for it.
    ctx = EngineContext(progress=progress, apply_id=10**9, epoch=1)
    running = Running(MySQLEngine({name: url}), spec("DO SLEEP(120)", database=name), ctx)
    wait_until(lambda: progress.calls, what="the statement to start")
    wait_until(
        lambda: server.execute(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE '%DO SLEEP(120)'"
        )[0][0],
        what="the statement on the target",
    )
    os.kill(server.pid, signal.SIGSTOP)
    try:
        if when == "during-its-poll":
            # Three poll periods: the watcher is then stuck in a poll (were it slower, it would
            # meet the stop first, the other case: either way the outcome must be the stop).
            time.sleep(3 * mysql_engine.POLL)
        asked = time.monotonic()
        ctx.cancelled.set()
        error = running.join(60)
        took = time.monotonic() - asked
    finally:
        os.kill(server.pid, signal.SIGCONT)
        # Given up on, the statement may still run (a next holder's fence would find it).
        for (connection_id,) in server.execute(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE '%DO SLEEP(120)'"
        ):
            server.execute(f"KILL QUERY {int(connection_id):d}")
    assert isinstance(error, EngineCancelled), error
    assert took < 30, took  # bounded by the probe's timeouts (5 s each), not by the target
    print(f"\ncancel with the target frozen: the engine gave up after {took:.2f} s")
    server.execute(f"DROP DATABASE `{name}`")


# --- the target-side fence ------------------------------------------------------------------------


class MetadataLock:
    """An open transaction that read ``big``: a copying ALTER of ``big`` copies the table, then
    waits for this transaction before it can swap the copy in (it stays in the process list,
    "Waiting for table metadata lock"), until ``release``."""

    def __init__(self, url: str) -> None:
        self._engine = create_engine(url)
        self._conn: Connection | None = self._engine.connect()
        self._conn.execute(text("SELECT COUNT(*) FROM big")).scalar()

    def release(self) -> None:
        if self._conn is not None:
            self._conn.rollback()
            self._conn.close()
            self._conn = None
        self._engine.dispose()


def _send(url: str, sql: str) -> None:
    """A statement on a connection of its own, as a worker would send it (no placeholders)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            cursor.execute(sql)
            cursor.close()
    finally:
        engine.dispose()


def _waiting_for_the_lock(url: str) -> int:
    return int(
        _on_url(url)(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE "
            "'/* leasehold %ALTER TABLE big%' AND STATE LIKE 'Waiting for table metadata lock'"
        )
    )


def _second_epoch(db: Database, apply_id: int) -> tuple[Lease, Lease]:
    """The apply's first holder (epoch e) and, after a handover, its second (epoch e + 1)."""
    first = run_lease(db, apply_id, owner="frozen-worker")
    second = support.hand_back(db, first, reason="test: the first holder is gone")
    redeem(db, second, "worker-2")
    return first, second


def test_a_holder_waits_for_an_earlier_epochs_statement_then_finds_the_change_made(
    db: Database, fence_target: Target, spawn: Spawn
) -> None:
    url = fence_target.url
    apply_id = _mysql_apply(db, fence_target)
    (task,) = applies.tasks(db, apply_id)
    first, second = _second_epoch(db, apply_id)
    lock = MetadataLock(url)
    try:
        # What the frozen first holder left running on the target: its tagged ALTER.
        earlier = Tag(apply_id=apply_id, task_id=int(task["id"]), epoch=first.epoch)
        predecessor = spawn("epoch-1 ALTER", lambda: _send(url, earlier.mark(ALTER)))
        predecessor.start()
        wait_until(lambda: _waiting_for_the_lock(url), what="the earlier ALTER to be running")
        runner = spawn("runner", _runner(db, second, fence_target).run)
        runner.start()
        wait_until(
            lambda: "target_waiting_earlier" in _events(db, apply_id),
            what="the new holder to wait for it",
        )
        assert not runner.finished_within(0.5)  # it waits: it runs nothing beside it
        assert _tagged_alters(_on_url(url)) == 1
    finally:
        lock.release()  # the earlier ALTER can finish now
    predecessor.result()
    outcome = runner.result(timeout=30)

    assert outcome == Outcome(ApplyState.COMPLETED)
    assert _columns(_on_url(url), _database_of(url)) == 1
    events = [(epoch, event) for epoch, _, event, _ in _logs(db, apply_id)]
    assert events[-5:] == [
        (second.epoch, "task_started"),
        (second.epoch, "target_waiting_earlier"),
        (second.epoch, "target_earlier_ended"),
        (second.epoch, "task_skipped"),  # made by the earlier statement: not run again
        (second.epoch + 1, "completed"),
    ], events
    (waiting,) = [m for _, _, e, m in _logs(db, apply_id) if e == "target_waiting_earlier"]
    assert f"statement of epoch {first.epoch} (task {task['id']}, connection " in waiting


def test_a_holder_waits_for_a_long_alter_of_an_earlier_epoch_and_the_column_exists_once(
    db: Database, server: PrivateMariaDB, slow_target: Target, spawn: Spawn
) -> None:
    """The issue's case: a frozen first holder's copying ALTER of a big table is still running
    on the target when the apply is taken over. The new holder's ``already_applied`` would find
    no column yet; instead it waits for that statement (following its progress), finds the
    column made, and completes without running the ALTER again: no "Duplicate column"."""
    url = slow_target.url
    apply_id = _mysql_apply(db, slow_target)
    (task,) = applies.tasks(db, apply_id)
    first, second = _second_epoch(db, apply_id)
    earlier = Tag(apply_id=apply_id, task_id=int(task["id"]), epoch=first.epoch)
    started = time.monotonic()
    predecessor = spawn("epoch-1 ALTER", lambda: _send(url, earlier.mark(ALTER)))
    predecessor.start()
    wait_until(lambda: _tagged_alters(_on(server)), what="the earlier ALTER on the target")
    reporter = RecordingReporter()
    runner = spawn(
        "runner",
        ApplyRunner(
            db,
            second,
            MySQLEngine({slow_target.name: url}),
            Interrupts(),
            reporter,
            progress_interval=0.0,
            target_retry=WINDOW,
        ).run,
    )
    runner.start()
    wait_until(
        lambda: "target_waiting_earlier" in _events(db, apply_id),
        timeout=30,
        what="the new holder to wait for the earlier ALTER",
    )
    # It waits while the earlier ALTER runs, and runs nothing beside it.
    assert not predecessor.finished_within(0), "the ALTER ended before the takeover: too fast"
    assert _tagged_alters(_on(server)) == 1
    assert not runner.finished_within(0)
    predecessor.result(timeout=60)
    altered = time.monotonic() - started
    outcome = runner.result(timeout=30)

    assert outcome == Outcome(ApplyState.COMPLETED), _logs(db, apply_id)
    assert _columns(_on(server), slow_target.name) == 1
    events = [(epoch, event) for epoch, _, event, _ in _logs(db, apply_id)]
    assert events[-5:] == [
        (second.epoch, "task_started"),
        (second.epoch, "target_waiting_earlier"),
        (second.epoch, "target_earlier_ended"),
        (second.epoch, "task_skipped"),  # made by the earlier ALTER: not run again
        (second.epoch + 1, "completed"),
    ], events
    assert not any("Duplicate column" in m for *_, m in _logs(db, apply_id))
    # While it waited, the holder showed the earlier ALTER's progress (MariaDB reports it).
    assert any(0 < r.percent < 100 for r in reporter.reports), reporter.reports
    print(f"\nearlier epoch's ALTER of a big table took {altered:.1f} s; the new holder waited")


@pytest.mark.parametrize("action", [ControlAction.STOP, ControlAction.CANCEL])
def test_stop_and_cancel_kill_the_earlier_statement_they_waited_for(
    db: Database, fence_target: Target, spawn: Spawn, action: ControlAction
) -> None:
    url = fence_target.url
    apply_id = _mysql_apply(db, fence_target)
    (task,) = applies.tasks(db, apply_id)
    first, second = _second_epoch(db, apply_id)
    interrupts = Interrupts()
    lock = MetadataLock(url)
    try:
        earlier = Tag(apply_id=apply_id, task_id=int(task["id"]), epoch=first.epoch)
        predecessor = spawn("epoch-1 ALTER", lambda: _send(url, earlier.mark(ALTER)))
        predecessor.start()
        wait_until(lambda: _waiting_for_the_lock(url), what="the earlier ALTER to be running")
        runner = spawn("runner", _runner(db, second, fence_target, interrupts=interrupts).run)
        runner.start()
        wait_until(lambda: "target_waiting_earlier" in _events(db, apply_id), what="the wait")
        request, _ = control.request(db, apply_id, action, requested_by="ops")
        reason = Reason.STOP if action == ControlAction.STOP else Reason.CANCEL
        interrupts.interrupt(reason, request_id=request.id)
        outcome = runner.result(timeout=30)
        killed = predecessor.error()  # the earlier ALTER was killed, not finished
    finally:
        lock.release()
    assert "Query execution was interrupted" in str(killed)
    expected = ApplyState.STOPPED if action == ControlAction.STOP else ApplyState.CANCELLED
    assert outcome.state == expected
    assert _tagged_alters(_on_url(url)) == 0
    assert _columns(_on_url(url), _database_of(url)) == 0
    events = _events(db, apply_id)
    assert "target_earlier_killed" in events, events
    (line,) = [m for _, _, e, m in _logs(db, apply_id) if e == "target_earlier_killed"]
    verb = "stopped" if action == ControlAction.STOP else "cancelled"
    assert f"the apply is being {verb}" in line


class Relay:
    """A TCP relay (socat) between the worker and the target: killing it drops the worker's
    connections while the server goes on running their statements, as a network blip does."""

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Relay:
        self.proc = subprocess.Popen(
            [
                "socat",
                f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr",
                f"TCP:127.0.0.1:{self.target_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its forked children die with it (killpg)
        )
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def test_after_a_lost_connection_the_holder_waits_for_its_own_statement(
    db: Database, fence_target: Target, spawn: Spawn, tmp_path: Path
) -> None:
    """The connection to the target drops mid-ALTER, but the server goes on with it: the retry
    finds the holder's own statement (same epoch) by its tag and waits for it, instead of
    starting the same ALTER beside it."""
    if shutil.which("socat") is None:
        unavailable("socat is not installed (Debian: socat)")
    url = fence_target.url
    parsed = make_url(url)
    relay = Relay(parsed.port or 3306).start()
    relayed = parsed.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
    wait_until(lambda: _reachable(relayed), what="the relay to listen")
    apply_id = _mysql_apply(db, fence_target)
    lease = dispatch(db, apply_id)
    redeem(db, lease, "worker-1")
    lock = MetadataLock(url)
    try:
        try:
            runner = spawn("runner", _runner(db, lease, fence_target, url=relayed).run)
            runner.start()
            wait_until(lambda: _waiting_for_the_lock(url), what="the ALTER to be running")
            relay.kill()  # the worker loses the target; the server keeps the ALTER
            wait_until(
                lambda: "target_waiting" in _events(db, apply_id), what="the runner to retry"
            )
            relay.start()  # the network is back
            wait_until(
                lambda: "target_waiting_earlier" in _events(db, apply_id),
                what="the retry to find its own statement",
            )
            assert _tagged_alters(_on_url(url)) == 1  # one ALTER: the retry runs none beside it
        finally:
            lock.release()  # the ALTER can finish now
        outcome = runner.result(timeout=30)
    finally:
        relay.kill()
    assert outcome == Outcome(ApplyState.COMPLETED), _logs(db, apply_id)
    assert _columns(_on_url(url), _database_of(url)) == 1
    events = _events(db, apply_id)
    assert events == [
        "task_started",
        "target_waiting",
        "target_waiting_earlier",
        "target_earlier_ended",
        "target_recovered",
        "task_skipped",
        "completed",
    ], events
    (waiting,) = [m for _, _, e, m in _logs(db, apply_id) if e == "target_waiting_earlier"]
    assert f"statement of epoch {lease.epoch} " in waiting
    _assert_for_people(db, apply_id)


def _reachable(url: str) -> bool:
    try:
        _on_url(url)("SELECT 1")
        return True
    except Exception:
        return False
