"""The ``mysql`` engine: runs an apply task's DDL on a MySQL/MariaDB target.

Targets are named in ``LEASEHOLD_TARGETS`` (name -> SQLAlchemy URL); a message only ever names
one, so no URL from outside is ever connected to. The DDL runs on its own connection in a helper
thread; the calling thread watches for cancellation (``KILL QUERY`` from a second connection) and
reports MariaDB's own ALTER progress (``information_schema.PROCESSLIST.PROGRESS``) when present.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any, Final

from sqlalchemy import Engine as SAEngine
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from storage.errors import ConfigurationError, InvalidInput
from tasks.engines.base import Engine, EngineCancelled, EngineContext, EngineError, TaskSpec

log = logging.getLogger(__name__)

POLL: Final = 0.2
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


class MySQLEngine(Engine):
    name = "mysql"

    def __init__(self, targets: Mapping[str, str]) -> None:
        self._targets = dict(targets)
        self._engines: dict[str, SAEngine] = {}
        self._lock = threading.Lock()

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        if options:
            raise InvalidInput(f"mysql engine takes no options, got {sorted(options)}")
        return {}

    def _engine(self, database: str) -> SAEngine:
        with self._lock:
            if database not in self._engines:
                url = self._targets.get(database)
                if url is None:
                    raise ConfigurationError(f"target {database!r} is not in LEASEHOLD_TARGETS")
                self._engines[database] = create_engine(url, poolclass=NullPool)
            return self._engines[database]

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
        try:
            with self._engine(task.database).connect() as conn:
                return all(
                    bool(conn.execute(query, params).scalar_one()) == present
                    for query, params, present in checks
                )
        except sa_exc.DBAPIError as exc:
            raise EngineError(f"target {task.database!r}: {exc.orig}") from exc

    def run(self, task: TaskSpec, ctx: EngineContext) -> None:
        engine = self._engine(task.database)
        outcome: dict[str, BaseException | None] = {"error": None}
        started = threading.Event()
        connection_id: list[int] = []

        def execute() -> None:
            try:
                with engine.connect() as conn:
                    connection_id.append(
                        int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
                    )
                    started.set()
                    conn.exec_driver_sql(task.ddl)
                    conn.commit()
            except BaseException as exc:  # handed to the calling thread
                outcome["error"] = exc
            finally:
                started.set()

        runner = threading.Thread(target=execute, name=f"ddl-{task.id}", daemon=True)
        runner.start()
        started.wait()
        killed = False
        try:
            ctx.progress(0)
            with engine.connect() as watcher:
                poll_progress = True
                while runner.is_alive():
                    runner.join(POLL)
                    if ctx.cancelled.is_set() and not killed and connection_id:
                        watcher.execute(text(f"KILL QUERY {connection_id[0]:d}"))
                        killed = True
                    if poll_progress and runner.is_alive() and connection_id:
                        try:
                            value = watcher.execute(_PROGRESS, {"id": connection_id[0]}).scalar()
                        except sa_exc.DBAPIError:
                            # MySQL has no PROCESSLIST.PROGRESS (a MariaDB column): no progress.
                            poll_progress, value = False, None
                        if value is not None:
                            ctx.progress(min(99, int(float(value))))
        except BaseException:
            # Leaving early (LeaseLost from ctx.progress, a broken watcher connection): never
            # leave the DDL running unattended on the target, where a new holder may run it too.
            if not killed and runner.is_alive() and connection_id:
                _kill_query(engine, connection_id[0])
            raise
        error = outcome["error"]
        if killed or ctx.cancelled.is_set():
            raise EngineCancelled(f"DDL on {task.table_name} interrupted")
        if error is not None:
            orig = getattr(error, "orig", error)
            raise EngineError(f"DDL on {task.table_name} failed: {orig}") from error
        ctx.progress(100)


def _kill_query(engine: SAEngine, connection_id: int) -> None:
    try:
        with engine.connect() as conn:
            conn.execute(text(f"KILL QUERY {connection_id:d}"))
    except sa_exc.SQLAlchemyError as exc:
        log.warning("could not KILL QUERY %d on the target: %s", connection_id, exc)
