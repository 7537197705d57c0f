"""The ``mysql`` engine: runs an apply task's DDL on a MySQL/MariaDB target.

Targets are named in ``LEASEHOLD_TARGETS`` (name -> SQLAlchemy URL); a message only ever names
one, so no URL from outside is ever connected to. The DDL runs on its own connection in a helper
thread; the calling thread watches for cancellation (``KILL QUERY`` from a second connection,
for a stop, cancel, handover, or a lease lost or presumed lost) and reports MariaDB's own ALTER
progress (``information_schema.PROCESSLIST.PROGRESS``) when present.

**Tagged statements.** Every DDL is sent as ``/* leasehold apply=A task=T epoch=E */ DDL``
(``tasks/engines/tags.py``), so the target's process list shows whose it is.
:meth:`MySQLEngine.running_statements` finds an apply's statements there, and
:meth:`MySQLEngine.kill_statement` kills one (``KILL QUERY ID`` of that very statement on
MariaDB, ``KILL QUERY`` of its connection on MySQL).

**Wait, do not kill (the target-side fence, invariant 9).** A holder that finds a statement of
an earlier epoch of its apply still running (a frozen or partitioned predecessor's ALTER, or its
own attempt from before a lost connection) *waits* for it to end, reporting its progress, and
then re-checks ``already_applied`` (``tasks/target_retry.py``). Why wait rather than kill:

- the statement is the same change the holder is about to make: letting it finish keeps its
  work (a table copy of hours, perhaps 90% done), where a kill throws it away and starts over;
- a KILL is not instant either: the server rolls the statement back (for a copying ALTER,
  drops the copy) before its locks are free, so killing saves less time than it seems;
- a KILL races the statement's end: it can arrive after the change committed, so the holder
  must re-check the target after a kill anyway.

The price: a predecessor's statement that is itself stuck (waiting on a metadata lock that an
application's long transaction holds) stalls the apply for as long as it is stuck. An operator
sees why (the apply log names the statement, its connection and age) and can stop or cancel:
**on stop or cancel the waiting holder kills the statements it waits for**, because after a
stop or cancel nobody watches them any more, and a statement left running would change the
schema of an apply that the operator stopped or cancelled. A handover (warm shutdown) or a lost
lease kills nothing: the next holder waits for the statement itself.

What remains: a predecessor frozen *between* its last fenced write and sending its DDL can
still send it after the new holder checked. Then the two wait on each other's metadata lock and
one of them is refused because the change is already there (1060 duplicate column, 1061, 1050,
1091, ...): the holder counts that as done when ``already_applied`` confirms it, and the
predecessor's refusal is never written (its lease is gone). A DDL whose effect
``already_applied`` cannot recognise is run as submitted; such a DDL should be idempotent.

**Unreachable targets.** Errors that mean the target is not there (connection refused or lost,
server gone or shutting down: ``tasks/engines/target_errors.py``) raise ``TargetUnavailable``,
which the runner retries for ``LEASEHOLD_TARGET_RETRY``; every other error is the change's own
(``EngineError``). Messages are the server's words and code, never SQLAlchemy's wrapping. The
connections that watch, check and kill have short connect, read and write timeouts, so a stop
or a lost lease is acted on, and the kill attempted, within seconds even when the target is
unreachable; the DDL's connection has a connect timeout only (an ALTER may take hours).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Connection, create_engine, make_url, text
from sqlalchemy import Engine as SAEngine
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from storage.errors import ConfigurationError, InvalidInput
from tasks.engines import tags
from tasks.engines.base import (
    Engine,
    EngineCancelled,
    EngineContext,
    EngineError,
    TargetStatement,
    TargetUnavailable,
    TaskSpec,
)
from tasks.engines.target_errors import (
    describe,
    error_code,
    is_already_there,
    is_unavailable,
    translate,
)

log = logging.getLogger(__name__)

POLL: Final = 0.2
# Connections that watch, check and kill must never hang on an unreachable target: a stop or a
# lost lease is acted on within seconds. (libmysqlclient retries a timed-out read, so a read can
# take up to a few times READ_TIMEOUT.) The DDL's own connection has only the connect timeout.
CONNECT_TIMEOUT: Final = 5
READ_TIMEOUT: Final = 5
# After the watcher lost the target, how long to wait for the DDL's own thread to report how
# its statement ended, before treating its fate as unknown (the next attempt's fence finds it).
LOST_GRACE: Final = 2.0
_TIMEOUT_DRIVERS: Final = frozenset({"mysqldb", "pymysql"})
_UNKNOWN_COLUMN: Final = 1054

_NAME = r"`?([A-Za-z0-9_$]+)`?"
_ADD_COLUMN = re.compile(rf"^\s*ALTER\s+TABLE\s+{_NAME}\s+ADD\s+(?:COLUMN\s+)?{_NAME}\s", re.I)
_DROP_COLUMN = re.compile(
    rf"^\s*ALTER\s+TABLE\s+{_NAME}\s+DROP\s+(?:COLUMN\s+)?{_NAME}\s*;?\s*$", re.I
)
_ADD_INDEX = re.compile(
    rf"^\s*ALTER\s+TABLE\s+{_NAME}\s+ADD\s+(?:UNIQUE\s+)?(?:INDEX|KEY)\s+{_NAME}\s", re.I
)
_CREATE_INDEX = re.compile(rf"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+{_NAME}\s+ON\s+{_NAME}", re.I)
_CREATE_TABLE = re.compile(rf"^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{_NAME}", re.I)

_COLUMN_EXISTS = text(
    "SELECT COUNT(*) FROM information_schema.COLUMNS "
    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :t AND COLUMN_NAME = :c"
)
_INDEX_EXISTS = text(
    "SELECT COUNT(*) FROM information_schema.STATISTICS "
    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :t AND INDEX_NAME = :i"
)
_TABLE_EXISTS = text(
    "SELECT COUNT(*) FROM information_schema.TABLES "
    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :t"
)
_PROGRESS = text("SELECT PROGRESS FROM information_schema.PROCESSLIST WHERE ID = :id")
# MariaDB: the statement's own id (killed precisely with KILL QUERY ID), milliseconds, progress.
_TAGGED_MARIADB = text(
    "SELECT ID, QUERY_ID, INFO, TIME_MS / 1000, PROGRESS FROM information_schema.PROCESSLIST "
    "WHERE INFO LIKE :prefix AND ID <> CONNECTION_ID()"
)
_TAGGED_MYSQL = text(
    "SELECT ID, NULL, INFO, TIME, NULL FROM information_schema.PROCESSLIST "
    "WHERE INFO LIKE :prefix AND ID <> CONNECTION_ID()"
)


@dataclass
class _Target:
    name: str
    ddl: SAEngine  # the DDL's connections: a connect timeout only
    probe: SAEngine  # checks, watching, kills: short timeouts throughout
    mariadb: bool = True  # until the process list says otherwise (no QUERY_ID, PROGRESS)


class MySQLEngine(Engine):
    name = "mysql"

    def __init__(self, targets: Mapping[str, str]) -> None:
        self._targets = dict(targets)
        self._opened: dict[str, _Target] = {}
        self._lock = threading.Lock()

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        if options:
            raise InvalidInput(f"mysql engine takes no options, got {sorted(options)}")
        return {}

    def _target(self, database: str) -> _Target:
        with self._lock:
            if database not in self._opened:
                url = self._targets.get(database)
                if url is None:
                    raise ConfigurationError(f"target {database!r} is not in LEASEHOLD_TARGETS")
                self._opened[database] = _Target(
                    database,
                    ddl=create_engine(
                        url, poolclass=NullPool, connect_args=_timeouts(url, reads=False)
                    ),
                    probe=create_engine(
                        url, poolclass=NullPool, connect_args=_timeouts(url, reads=True)
                    ),
                )
            return self._opened[database]

    # --- checks --------------------------------------------------------------------------------

    def already_applied(self, task: TaskSpec) -> bool:
        ddl = task.ddl
        checks: list[tuple[Any, dict[str, str], bool]] = []
        # ADD INDEX before ADD COLUMN, whose optional COLUMN keyword would read the INDEX, KEY
        # or UNIQUE keyword as a column name.
        if m := _ADD_INDEX.match(ddl):
            checks.append((_INDEX_EXISTS, {"t": m[1], "i": m[2]}, True))
        elif m := _ADD_COLUMN.match(ddl):
            checks.append((_COLUMN_EXISTS, {"t": m[1], "c": m[2]}, True))
        elif m := _DROP_COLUMN.match(ddl):
            checks.append((_COLUMN_EXISTS, {"t": m[1], "c": m[2]}, False))
        elif m := _CREATE_INDEX.match(ddl):
            checks.append((_INDEX_EXISTS, {"t": m[2], "i": m[1]}, True))
        elif m := _CREATE_TABLE.match(ddl):
            checks.append((_TABLE_EXISTS, {"t": m[1]}, True))
        if not checks:
            return False  # not a shape we can recognise: run it (the DDL decides)
        target = self._target(task.database)
        try:
            with target.probe.connect() as conn:
                return all(
                    bool(conn.execute(query, params).scalar_one()) == present
                    for query, params, present in checks
                )
        except sa_exc.DBAPIError as exc:
            raise translate(
                exc, target=task.database, failed=f"checking {task.table_name} failed"
            ) from exc

    # --- the target-side fence -----------------------------------------------------------------

    def running_statements(self, task: TaskSpec, ctx: EngineContext) -> list[TargetStatement]:
        target = self._target(task.database)
        prefix = tags.apply_prefix(ctx.apply_id) + "%"
        try:
            with target.probe.connect() as conn:
                rows = self._tagged(target, conn, prefix)
        except sa_exc.DBAPIError as exc:
            raise translate(
                exc, target=task.database, failed="reading the target's process list failed"
            ) from exc
        found = []
        for connection_id, query_id, info, seconds, progress in rows:
            tag = tags.parse(info)
            if tag is None or tag.apply_id != ctx.apply_id:
                continue
            found.append(
                TargetStatement(
                    connection_id=int(connection_id),
                    tag=tag,
                    seconds=float(seconds or 0),
                    progress=None if progress is None else float(progress),
                    query_id=None if query_id is None else int(query_id),
                )
            )
        return found

    @staticmethod
    def _tagged(target: _Target, conn: Connection, prefix: str) -> list[Any]:
        if target.mariadb:
            try:
                return list(conn.execute(_TAGGED_MARIADB, {"prefix": prefix}))
            except sa_exc.DBAPIError as exc:
                if error_code(exc) != _UNKNOWN_COLUMN:
                    raise
                target.mariadb = False  # MySQL: no QUERY_ID, TIME_MS or PROGRESS
        return list(conn.execute(_TAGGED_MYSQL, {"prefix": prefix}))

    def kill_statement(self, task: TaskSpec, statement: TargetStatement) -> bool:
        target = self._target(task.database)
        if statement.query_id is not None:
            # That very statement: never a later one that reuses its connection.
            return _kill(target, f"KILL QUERY ID {statement.query_id:d}")
        return _kill(target, f"KILL QUERY {statement.connection_id:d}")

    # --- the DDL -------------------------------------------------------------------------------

    def run(self, task: TaskSpec, ctx: EngineContext) -> None:
        target = self._target(task.database)
        ddl = _DDLThread(target.ddl, ctx.tag(task).mark(task.ddl), name=f"ddl-{task.id}")
        ddl.start()
        ddl.connected.wait()  # bounded by the connect timeout
        if ddl.connection_id is None:
            ddl.join()
            assert ddl.error is not None
            raise self._failure(task, ddl.error)
        killing = False
        try:
            ctx.progress(0)
            killing = self._watch(target, ddl, ctx)
        except TargetUnavailable as lost:
            # The watcher lost the target. Unless asked to stop, leave the DDL be: if it still
            # runs, the next attempt's fence finds it by its tag and waits for it.
            if not ctx.cancelled.is_set():
                raise
            if ddl.is_alive():
                _kill(target, f"KILL QUERY {ddl.connection_id:d}")
            # Asked to stop: the brake wins over the outage (which would be retried for up to
            # LEASEHOLD_TARGET_RETRY). The DDL's fate is unknown; the fence finds it by its tag.
            raise EngineCancelled(
                f"DDL on {task.table_name} interrupted (the target was lost meanwhile: {lost})"
            ) from lost
        except BaseException:
            # Leaving early (LeaseLost from ctx.progress): never leave the DDL running
            # unattended on the target, where nobody holding this apply watches it any more.
            if ddl.is_alive():
                _kill(target, f"KILL QUERY {ddl.connection_id:d}")
            raise
        error = ddl.error
        if killing:
            # Killed on request (a killed SLEEP even ends without an error). Had it committed
            # just before the kill, the next holder's already_applied finds the change.
            raise EngineCancelled(f"DDL on {task.table_name} interrupted") from error
        if error is None:
            ctx.progress(100)  # done, even if asked to stop meanwhile: the next safe point acts
            return
        if is_already_there(error) and self.already_applied(task):
            ctx.log(
                "info",
                "task_already_there",
                f"{task.table_name}: the target refused the DDL because the change is already "
                f"there ({describe(error)}), and the check confirms it: counted as done",
            )
            ctx.progress(100)
            return
        raise self._failure(task, error)

    def _watch(self, target: _Target, ddl: _DDLThread, ctx: EngineContext) -> bool:
        """Follow the DDL until it ends; True if it was killed on request. Raises
        ``TargetUnavailable`` when the target is lost and the DDL's fate is unknown."""
        connection_id = ddl.connection_id
        assert connection_id is not None
        killing = False
        poll_progress = True
        try:
            with target.probe.connect() as watcher:
                while ddl.is_alive():
                    ddl.join(POLL)
                    if not ddl.is_alive():
                        break
                    if ctx.cancelled.is_set():
                        # Every poll until it ends: a KILL QUERY that arrives before the
                        # statement started kills nothing, and the statement then runs. A
                        # target that cannot be told is given up on (it may be frozen): the
                        # next holder's fence finds the statement by its tag.
                        killing = True
                        if not _kill(target, f"KILL QUERY {connection_id:d}"):
                            break
                        continue
                    if poll_progress:
                        try:
                            value = watcher.execute(_PROGRESS, {"id": connection_id}).scalar()
                        except sa_exc.DBAPIError as exc:
                            if error_code(exc) != _UNKNOWN_COLUMN:
                                raise
                            # MySQL has no PROCESSLIST.PROGRESS (a MariaDB column).
                            poll_progress, value = False, None
                        if value is not None:
                            ctx.progress(min(99, int(float(value))))
                if ddl.error is not None and is_unavailable(ddl.error):
                    # The target went away under the DDL, and most likely took this
                    # connection with it: closing it would try a rollback on it (logged as
                    # an error by the pool). Dropped instead.
                    watcher.invalidate()
        except sa_exc.DBAPIError as exc:
            # The DDL's own thread usually learns first how its statement ended; give it a
            # moment, so that a real failure is reported as such.
            ddl.join(LOST_GRACE)
            if ddl.is_alive():
                raise translate(exc, target=target.name, failed="watching the DDL failed") from exc
        return killing

    @staticmethod
    def _failure(task: TaskSpec, error: BaseException) -> EngineError:
        if isinstance(error, sa_exc.DBAPIError) or error_code(error) is not None:
            return translate(error, target=task.database, failed=f"DDL on {task.table_name} failed")
        return EngineError(f"DDL on {task.table_name} failed: {type(error).__name__}: {error}")


class _DDLThread(threading.Thread):
    """Runs one statement on a connection of its own and keeps how it ended."""

    def __init__(self, engine: SAEngine, sql: str, *, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._engine = engine
        self._sql = sql
        self.connected = threading.Event()
        self.connection_id: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self._engine.connect() as conn:
                self.connection_id = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
                self.connected.set()
                # The driver's cursor, with no parameters: a DDL is sent as written, and a '%' in
                # it (a DEFAULT '100%') is not read as a placeholder.
                cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                try:
                    cursor.execute(self._sql)
                except BaseException as exc:
                    if is_unavailable(exc):
                        # Dead: closing it would try a rollback on it (and log that failure).
                        conn.invalidate()
                    raise
                finally:
                    cursor.close()
                conn.commit()
        except BaseException as exc:  # handed to the calling thread
            self.error = exc
        finally:
            self.connected.set()


def _kill(target: _Target, statement: str) -> bool:
    """Best effort, bounded by the probe's timeouts: False when the target could not be told."""
    try:
        with target.probe.connect() as conn:
            conn.execute(text(statement))
        return True
    except sa_exc.DBAPIError as exc:
        code = error_code(exc)
        if code in (1094, 1957):  # no such connection / query: it ended by itself meanwhile
            return True
        if is_unavailable(exc):
            log.warning("target %r: could not %s: %s", target.name, statement, describe(exc))
        else:
            log.warning("target %r: %s refused: %s", target.name, statement, describe(exc))
        return False


def _timeouts(url: str, *, reads: bool) -> dict[str, Any]:
    """Connect arguments that bound how long a connection may hang on an unreachable target,
    for the drivers that take them; a URL's own settings win."""
    parsed = make_url(url)
    if parsed.get_driver_name() not in _TIMEOUT_DRIVERS:
        return {}
    wanted: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT}
    if reads:
        wanted.update(read_timeout=READ_TIMEOUT, write_timeout=READ_TIMEOUT)
    return {key: value for key, value in wanted.items() if key not in parsed.query}
