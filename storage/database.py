"""Engine creation and the storage boundary where driver errors become leasehold errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry

from storage.errors import (
    ConfigurationError,
    StorageBusy,
    StorageError,
    StorageIntegrityError,
    StorageUnavailable,
)

ISOLATION_LEVELS = frozenset({"READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"})

# MySQL/MariaDB error codes that mean "the server is gone or unreachable" (1927: the connection
# was killed, as a shutting-down MariaDB does to its clients).
_MYSQL_UNAVAILABLE = frozenset({1040, 1053, 1927, 2002, 2003, 2005, 2006, 2013, 2055, 4031})
_MYSQL_TIMEOUTS = {"connect_timeout": 10, "read_timeout": 60, "write_timeout": 60}
# Lock wait timeout and deadlock: the transaction was rolled back and may simply be retried.
_MYSQL_BUSY = frozenset({1205, 1213})
_SQLITE_BUSY_TIMEOUT_MS = 30_000


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return "<unparseable database URL>"


class Database:
    """An engine plus the boundary: every transaction opened here translates driver errors."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def transaction(self, *, isolation_level: str | None = None) -> Iterator[Connection]:
        """One transaction: committed if the block succeeds, rolled back if it raises.

        ``isolation_level`` overrides the engine's for this transaction on MySQL/MariaDB (the
        connection gets the engine's back when it returns to the pool); SQLite has only one.
        """
        if isolation_level is None or self.is_sqlite:
            with translate_errors(), self.engine.begin() as conn:
                yield conn
            return
        level = isolation_level.upper()
        if level not in ISOLATION_LEVELS:
            raise ConfigurationError(f"unsupported isolation level {isolation_level!r}")
        with translate_errors(), self.engine.connect() as conn:
            conn.execution_options(isolation_level=level)
            with conn.begin():
                yield conn

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({redact(str(self.engine.url))})"


def open_database(
    url: str,
    *,
    isolation_level: str | None = None,
    pool_size: int = 5,
    idle_transaction_timeout: float | None = None,
    **engine_kwargs: Any,
) -> Database:
    """Create the engine for ``url`` (the configuration's ``LEASEHOLD_DATABASE_URL``; storage
    has no default of its own). MySQL gets an explicit isolation level (READ COMMITTED unless
    told otherwise); SQLite gets WAL, a busy timeout and write-locking transactions.

    ``idle_transaction_timeout`` (seconds) makes the server end a session that sits idle inside a
    transaction that long: a worker frozen (SIGSTOP, a long GC pause) inside a fence would
    otherwise keep the apply row locked, and reclaim, which skips locked rows, could never take
    the apply over. Workers pass ``stale_after``: by then a peer may reclaim anyway. MariaDB has
    ``idle_transaction_timeout``; on MySQL the nearest setting is the session ``wait_timeout``.
    """
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as exc:
        raise ConfigurationError(f"LEASEHOLD_DATABASE_URL is not a database URL: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return Database(_sqlite_engine(url, **engine_kwargs))
    if backend not in ("mysql", "mariadb"):
        raise ConfigurationError(
            f"unsupported database {backend!r} in {redact(url)}: use sqlite:// or mysql+mysqldb://"
        )
    level = (isolation_level or "READ COMMITTED").upper()
    if level not in ISOLATION_LEVELS:
        raise ConfigurationError(f"unsupported isolation level {isolation_level!r}")
    connect_args = dict(engine_kwargs.pop("connect_args", {}))
    if parsed.get_driver_name() == "mysqldb":
        # A partitioned or frozen server must not hang a statement for ever (the driver has no
        # read timeout by default): every store statement is short, and a lock wait ends at
        # InnoDB's innodb_lock_wait_timeout (50 s) first. A timeout loses the connection (error
        # 2013), which is StorageUnavailable and retried. The URL's own values win.
        for key, seconds in _MYSQL_TIMEOUTS.items():
            if key not in parsed.query:
                connect_args.setdefault(key, seconds)
    try:
        engine = create_engine(
            url,
            isolation_level=level,
            pool_pre_ping=True,
            pool_recycle=3600,
            pool_size=pool_size,
            connect_args=connect_args,
            **engine_kwargs,
        )
    except (sa_exc.ArgumentError, ImportError) as exc:
        raise ConfigurationError(f"cannot use {redact(url)}: {exc}") from exc
    idle = None if idle_transaction_timeout is None else max(1, math.ceil(idle_transaction_timeout))
    _configure_sessions(engine, idle_transaction_timeout=idle)
    return Database(engine)


def _configure_sessions(engine: Engine, *, idle_transaction_timeout: int | None) -> None:
    """Every MySQL/MariaDB session runs in UTC (``time_zone = '+00:00'``): leasehold's statements
    use ``UTC_TIMESTAMP(6)`` anyway (storage/clock.py), and pinning the session as well keeps
    anything else evaluated there (``NOW()``, ``CURRENT_TIMESTAMP``) off the server's local time,
    which jumps at daylight-saving changes."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("SET SESSION time_zone = '+00:00'")
        if idle_transaction_timeout is not None:
            cursor.execute("SELECT VERSION()")
            row = cursor.fetchone()
            variable = "wait_timeout"
            if row is not None and "mariadb" in str(row[0]).lower():
                variable = "idle_transaction_timeout"
            cursor.execute(f"SET SESSION {variable} = {idle_transaction_timeout:d}")
        cursor.close()


def _sqlite_engine(url: str, **engine_kwargs: Any) -> Engine:
    connect_args = engine_kwargs.pop("connect_args", {})
    connect_args.setdefault("timeout", _SQLITE_BUSY_TIMEOUT_MS / 1000)
    # Connections are handed between threads by the pool; each is used by one thread at a time.
    connect_args.setdefault("check_same_thread", False)
    engine = create_engine(url, connect_args=connect_args, **engine_kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        # Take transaction control away from pysqlite, which would BEGIN lazily and DEFERRED.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
        if not url.endswith(":memory:") and url not in ("sqlite://", "sqlite:///"):
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the database write lock at BEGIN: a fence, a rotation and every owned
        # write are serialized, and a read-then-write transaction can never fail to upgrade.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn driver errors into leasehold's storage errors. Leasehold's own errors pass through."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        raise classify(exc) from exc
    except sa_exc.SQLAlchemyError as exc:
        raise StorageError(f"database error: {exc}") from exc


def classify(exc: sa_exc.DBAPIError) -> StorageError:
    code = _mysql_code(exc)
    message = str(exc.orig) if exc.orig is not None else str(exc)
    if exc.connection_invalidated or code in _MYSQL_UNAVAILABLE:
        return StorageUnavailable(f"database unavailable: {message}")
    if code in _MYSQL_BUSY:
        return StorageBusy(f"database busy: {message}")
    if isinstance(exc, sa_exc.IntegrityError):
        return StorageIntegrityError(f"constraint violated: {message}")
    if isinstance(exc, sa_exc.OperationalError):
        lowered = message.lower()
        if "locked" in lowered or "busy" in lowered:
            return StorageBusy(f"database busy: {message}")
        if "unable to open" in lowered or "disk i/o" in lowered:
            return StorageUnavailable(f"database unavailable: {message}")
    return StorageError(f"database error: {message}")


def _mysql_code(exc: sa_exc.DBAPIError) -> int | None:
    args = getattr(exc.orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None
