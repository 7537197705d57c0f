"""Machinery of the race tests: threads whose outcome a test inspects, and proof that one
connection waits for another's open transaction (``tests/contract/test_races.py`` explains).

- MySQL/MariaDB: ``SHOW ENGINE INNODB STATUS`` shows the acting connection's transaction in
  ``LOCK WAIT`` for a lock on a given table of the test database while the holder's is open.
- PostgreSQL: ``pg_stat_activity`` shows the acting backend waiting for a lock, ``pg_locks`` the
  table of the row (the tuple lock it queues on), and ``pg_blocking_pids()`` names the holder's
  backend among those it waits for, while the holder's transaction is open.
- SQLite: the acting thread is inside the driver call executing ``BEGIN IMMEDIATE`` (its
  innermost Python frame), so it is in SQLite's busy handler behind the holder's write lock.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pytest
from sqlalchemy import Connection, event, text

from storage.database import Database

T = TypeVar("T")

# Every race test runs on each store under each isolation level a deployment may run at (the
# store's engine sets READ COMMITTED; REPEATABLE READ is what a server left at its default, or a
# future change, would give). SQLite has one level: the database write lock.
ISOLATIONS = pytest.mark.parametrize(
    ("backend_url", "isolation"),
    [
        pytest.param("sqlite", None, id="sqlite"),
        pytest.param("mysql", "REPEATABLE READ", id="mysql-RR"),
        pytest.param("mysql", "READ COMMITTED", id="mysql-RC"),
        pytest.param("postgres", "REPEATABLE READ", id="postgres-RR"),
        pytest.param("postgres", "READ COMMITTED", id="postgres-RC"),
    ],
    indirect=["backend_url"],
)

POLL = 10.0  # how long a poll waits for an expected lock wait before failing the test
JOIN = 20.0  # how long a thread may take to finish once nothing should block it
SETTLE = 0.2  # the negative check: a blocked thread must not finish within this


# --- threads whose outcome the test inspects ------------------------------------------------------


class Worker(Generic[T]):
    """``fn`` on its own thread; its return value or exception is kept for the test."""

    def __init__(self, name: str, fn: Callable[[], T]) -> None:
        self.name = name
        self._fn = fn
        self._value: list[T] = []
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._value.append(self._fn())
        except BaseException as exc:
            self._error = exc

    def start(self) -> Worker[T]:
        self.thread.start()
        return self

    def finished_within(self, seconds: float) -> bool:
        self.thread.join(seconds)
        return not self.thread.is_alive()

    def outcome(self, timeout: float = JOIN) -> T | BaseException:
        if not self.finished_within(timeout):
            pytest.fail(f"{self.name} still running after {timeout:g}s", pytrace=False)
        if self._error is not None:
            return self._error
        return self._value[0]

    def result(self, timeout: float = JOIN) -> T:
        if not self.finished_within(timeout):
            pytest.fail(f"{self.name} still running after {timeout:g}s", pytrace=False)
        if self._error is not None:
            raise self._error
        return self._value[0]

    def error(self, timeout: float = JOIN) -> BaseException:
        outcome = self.outcome(timeout)
        if not isinstance(outcome, BaseException):
            pytest.fail(f"{self.name} returned {outcome!r} instead of raising", pytrace=False)
        return outcome


def spawner() -> Iterator[Callable[[str, Callable[[], Any]], Worker[Any]]]:
    """Make workers; at teardown every one is joined (with a timeout), so none outlives its test."""
    made: list[Worker[Any]] = []

    def _spawn(name: str, fn: Callable[[], T]) -> Worker[T]:
        worker = Worker(name, fn)
        made.append(worker)
        return worker

    yield _spawn
    stuck = [w.name for w in made if w.thread.ident is not None and not w.finished_within(JOIN)]
    assert not stuck, f"threads still running at teardown: {stuck}"


Spawn = Callable[[str, Callable[[], Any]], Worker[Any]]


# --- observing who waits for whom -----------------------------------------------------------------


def wait_until(
    predicate: Callable[[], bool], what: str, *, timeout: float = POLL, interval: float = 0.005
) -> None:
    """Poll ``predicate`` every ``interval`` seconds until it holds; fail the test at the deadline.
    (The pause only paces the poll; the predicate, not the pause, decides.)"""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting until {what}", pytrace=False)
        time.sleep(interval)


def _id_query(dialect: str) -> str:
    return "SELECT pg_backend_pid()" if dialect == "postgresql" else "SELECT CONNECTION_ID()"


def connection_id(conn: Connection) -> int:
    """MySQL's ``CONNECTION_ID()`` of ``conn`` (the name InnoDB gives its transaction), or
    PostgreSQL's backend pid."""
    return int(conn.execute(text(_id_query(conn.dialect.name))).scalar_one())


def holder_id(db: Database, conn: Connection) -> int | None:
    return None if db.is_sqlite else connection_id(conn)


_CID = "race_tests_connection_id"


class Tap:
    """Records, just before each statement a Database executes, the thread executing it and (on
    MySQL and PostgreSQL) the id of the connection executing it (``connection_id``)."""

    def __init__(self, db: Database) -> None:
        self._server = not db.is_sqlite
        self._id_query = _id_query(db.dialect)
        self._lock = threading.Lock()
        self.executed: list[tuple[int, str, int | None]] = []
        event.listen(db.engine, "before_cursor_execute", self._before)

    def _before(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        cid: int | None = None
        if self._server:
            cid = conn.info.get(_CID)
            if cid is None:
                raw = conn.connection.dbapi_connection
                assert raw is not None
                probe = raw.cursor()
                probe.execute(self._id_query)
                found = probe.fetchone()
                probe.close()
                assert found is not None
                cid = conn.info[_CID] = int(found[0])
        with self._lock:
            self.executed.append((threading.get_ident(), statement, cid))

    def connection_ids(self, thread: threading.Thread) -> set[int]:
        with self._lock:
            return {cid for t, _, cid in self.executed if t == thread.ident and cid is not None}


@dataclass(frozen=True)
class Transaction:
    connection_id: int
    active: bool  # begun and not yet committed or rolled back
    waiting_for: str | None  # `db`.`table` of the lock it waits for; None if it is not waiting
    # PostgreSQL: the backends it waits for (pg_blocking_pids); None where the server cannot say.
    blocked_by: frozenset[int] | None = None


def transactions(observer: Database) -> dict[int, Transaction]:
    """Every open transaction of the observed server right now, by connection id."""
    if observer.dialect == "postgresql":
        return postgres_transactions(observer)
    return innodb_transactions(observer)


def table_id(observer: Database, table: str) -> str:
    """How ``Transaction.waiting_for`` names ``table`` of the observed database."""
    return f"`{observer.engine.url.database}`.`{table}`"


_PG_TRANSACTIONS = text(
    """
    SELECT a.pid,
           a.xact_start IS NOT NULL AS active,
           a.wait_event_type = 'Lock' AS waiting,
           pg_blocking_pids(a.pid) AS blocked_by,
           (SELECT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
             WHERE l.pid = a.pid AND l.locktype = 'tuple' LIMIT 1) AS tuple_table
      FROM pg_stat_activity a
     WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
    """
)


def postgres_transactions(observer: Database) -> dict[int, Transaction]:
    """PostgreSQL's sessions on the test database. A backend waiting for a row holds (or queues
    for) the tuple lock of that row, which names the table, and waits for the holder's
    transaction id; ``pg_blocking_pids`` names the holder."""
    found: dict[int, Transaction] = {}
    database = observer.engine.url.database
    with observer.engine.connect() as conn:
        for row in conn.execute(_PG_TRANSACTIONS):
            waiting = None
            if row.waiting:
                waiting = f"`{database}`.`{row.tuple_table or '?'}`"
            found[int(row.pid)] = Transaction(
                int(row.pid),
                active=bool(row.active),
                waiting_for=waiting,
                blocked_by=frozenset(int(pid) for pid in row.blocked_by),
            )
    return found


_TRX_THREAD = re.compile(r"(?:MariaDB|MySQL) thread id (\d+)")
_TRX_WAITING_FOR = re.compile(r"FOR THIS LOCK TO BE GRANTED:\n[^\n]*? of table (`[^`]+`\.`[^`]+`)")


def innodb_transactions(observer: Database) -> dict[int, Transaction]:
    """Every InnoDB transaction right now, by connection id, from ``SHOW ENGINE INNODB STATUS``.

    Not ``information_schema.INNODB_TRX``/``INNODB_LOCK_WAITS``: InnoDB serves those from a cache
    that it refreshes only when nobody read it in the previous 0.1 s, so any other frequent reader
    on the server (a parallel test run) keeps it stale for good. The status report is built on
    each call."""
    with observer.engine.connect() as conn:
        status = str(conn.execute(text("SHOW ENGINE INNODB STATUS")).one()[2])
    found: dict[int, Transaction] = {}
    for block in status.split("\n---TRANSACTION ")[1:]:
        thread = _TRX_THREAD.search(block)
        if thread is None:
            continue
        waiting = _TRX_WAITING_FOR.search(block) if "\nLOCK WAIT " in block else None
        found[int(thread[1])] = Transaction(
            int(thread[1]),
            active=" ACTIVE " in block.split("\n", 1)[0],
            waiting_for=None if waiting is None else waiting[1],
        )
    return found


def waits_for(observer: Database, holder: int, waiters: set[int], table: str) -> bool:
    """One of the connections ``waiters`` waits for a lock on a row of ``table`` while
    connection ``holder``'s transaction is open (and, where the server can say, for it)."""
    now = transactions(observer)
    if holder not in now or not now[holder].active:
        return False  # the holder's transaction must still be open
    wanted = table_id(observer, table)
    for cid in waiters:
        seen = now.get(cid)
        if seen is None or seen.waiting_for != wanted:
            continue
        if seen.blocked_by is None or holder in _waits_behind(now, cid):
            return True
    return False


def _waits_behind(now: dict[int, Transaction], cid: int) -> set[int]:
    """Every connection ``cid`` waits for, directly or through others: a second waiter for a
    PostgreSQL row queues behind the first (its tuple lock), which waits for the holder."""
    found: set[int] = set()
    todo = [cid]
    while todo:
        seen = now.get(todo.pop())
        for other in (seen.blocked_by or ()) if seen is not None else ():
            if other not in found:
                found.add(other)
                todo.append(other)
    return found


def raw_connection_id(conn: Connection) -> int:
    """``connection_id`` of ``conn``, read on its DB-API connection (no engine events fire)."""
    raw = conn.connection.dbapi_connection
    assert raw is not None
    cursor = raw.cursor()
    try:
        cursor.execute(_id_query(conn.dialect.name))
        found = cursor.fetchone()
    finally:
        cursor.close()
    assert found is not None
    return int(found[0])


_DRIVER_CALLS = frozenset({"do_execute", "do_execute_no_params"})


def in_driver_call(thread: threading.Thread, sql: str) -> bool:
    """``thread`` is inside the DB-API ``cursor.execute`` of a statement containing ``sql``: its
    innermost Python frame is SQLAlchemy's call into the driver (C code makes no frames)."""
    assert thread.ident is not None
    frame = sys._current_frames().get(thread.ident)
    if frame is None or frame.f_code.co_name not in _DRIVER_CALLS:
        return False
    return sql in str(frame.f_locals.get("statement", ""))


def prove_blocked(
    observer: Database,
    worker: Worker[Any],
    tap: Tap,
    *,
    holder: int | None,
    what: str,
    table: str = "applies",
) -> None:
    """Prove that ``worker`` waits for the open transaction of connection ``holder`` (on MySQL
    and PostgreSQL, for a lock on a row of ``table``; PostgreSQL also names the holder)."""
    if observer.is_sqlite:
        # The holder has the write lock; BEGIN IMMEDIATE cannot return until it is released.
        wait_until(
            lambda: in_driver_call(worker.thread, "BEGIN IMMEDIATE"),
            f"{what} is inside SQLite's BEGIN IMMEDIATE (busy handler)",
        )
    else:
        assert holder is not None
        applies_table = table_id(observer, table)
        wait_until(
            lambda: waits_for(observer, holder, tap.connection_ids(worker.thread), table),
            f"the server shows {what} in a lock wait on a row of {applies_table}"
            f" while connection {holder}'s transaction is open",
        )
    assert not worker.finished_within(SETTLE), f"{what} finished although it should be blocked"


def returned_without_waiting(observer: Database, worker: Worker[T], tap: Tap, *, what: str) -> T:
    """MySQL: ``worker`` (started) finishes, and until it does, InnoDB never shows any of its
    connections in ``LOCK WAIT``: it skips locked rows rather than waiting for them. A worker that
    waits fails the test as soon as the wait is seen, not after a timeout."""

    def waiting() -> list[str]:
        now = transactions(observer)
        return [
            str(now[cid].waiting_for)
            for cid in tap.connection_ids(worker.thread)
            if cid in now and now[cid].waiting_for is not None
        ]

    def settled() -> bool:
        if not worker.thread.is_alive():
            return True
        seen = waiting()
        if seen:
            pytest.fail(f"{what} waits for a lock on {seen} instead of skipping it", pytrace=False)
        return False

    wait_until(settled, f"{what} returns", timeout=POLL)
    return worker.result()


class PauseBeforeCommit:
    """Holds the first transaction a Database commits open, just before its COMMIT, until the test
    releases it: a real reclaim pass stopped with its first batch locked and rotated."""

    def __init__(self, db: Database) -> None:
        self.paused = threading.Event()
        self.release = threading.Event()
        event.listen(db.engine, "commit", self._before_commit)

    def _before_commit(self, conn: Connection) -> None:
        if not self.paused.is_set():
            self.paused.set()
            self.release.wait(JOIN)
