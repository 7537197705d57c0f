"""Engine creation and the storage boundary where driver errors become leasehold errors."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry

from storage.errors import (
    ConfigurationError,
    SerializationFailure,
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
# PostgreSQL SQLSTATEs. Busy (rolled back, retry it): deadlock, lock_timeout, a statement
# cancelled by timeout. A serialization failure (REPEATABLE READ met a row changed since its
# snapshot) is busy too, and rerun in place by ``Database.attempts``. Unavailable: class 08
# (connection exceptions), the server shutting down or refusing logins, too many connections,
# and a session ended for idling in a transaction.
_PG_BUSY = frozenset({"40P01", "55P03", "57014"})
_PG_SERIALIZATION_FAILURE = "40001"
_PG_UNAVAILABLE_CLASSES = ("08",)
_PG_UNAVAILABLE = frozenset({"57P01", "57P02", "57P03", "53300", "25P03"})
# How often ``Database.attempts`` runs a transaction that keeps failing to serialize: each
# failure means another transaction on the same row committed, so N racers need at most N - 1.
ATTEMPTS = 64
_BACKOFF_CAP = 0.05  # seconds
# Server-side bounds for every PostgreSQL session (milliseconds): a lock wait ends as InnoDB's
# does at 50 s (StorageBusy), and the kernel gives up on a peer that stopped acknowledging after
# 60 s (libpq has no read timeout; a partitioned server would otherwise hang a statement for
# ever); keepalives find a dead idle peer.
_PG_LOCK_TIMEOUT_MS = 50_000
_PG_CONNECT = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


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

    def attempts(self, *, isolation_level: str | None = None) -> Iterator[Attempt]:
        """Transactions to run one block in until one commits::

            for attempt in db.attempts():
                with attempt as conn:
                    ...

        A serialization failure (PostgreSQL under REPEATABLE READ: a row this transaction
        waited for was changed by the one it waited for) rolls the attempt back and runs the
        block again with a fresh snapshot, which then sees the change: a lease that moved
        raises ``LeaseLost`` from the precondition that proves it, never from the failure. Any
        other error ends the loop. The block must have no effect outside the transaction. The
        other stores never fail this way: InnoDB's locking reads and SQLite's write lock read
        the newest committed row.
        """
        for number in range(1, ATTEMPTS + 1):
            attempt = Attempt(self, isolation_level, last=number == ATTEMPTS)
            yield attempt
            if not attempt.failed:
                return
            # Two transactions that failed each other step apart before the next attempt.
            time.sleep(random.uniform(0, min(_BACKOFF_CAP, 0.002 * 2**number)))

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({redact(str(self.engine.url))})"


class Attempt:
    """One transaction of :meth:`Database.attempts`."""

    def __init__(self, db: Database, isolation_level: str | None, *, last: bool) -> None:
        self._transaction = db.transaction(isolation_level=isolation_level)
        self._retry = not last
        self.failed = False

    def settled(self) -> None:
        """From here on a failure is raised, not retried: the block has handed out what it
        holds (``fenced_transaction`` yields its handle to code that cannot be run again)."""
        self._retry = False

    def __enter__(self) -> Connection:
        return self._transaction.__enter__()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            if self._transaction.__exit__(kind, exc, tb):
                return True
        except SerializationFailure:
            if not self._retry:
                raise
            self.failed = True
            return True
        if isinstance(exc, SerializationFailure) and self._retry:
            self.failed = True
            return True
        return False


def open_database(
    url: str,
    *,
    isolation_level: str | None = None,
    pool_size: int = 5,
    max_connections: int | None = None,
    pool_timeout: float = 30.0,
    idle_transaction_timeout: float | None = None,
    **engine_kwargs: Any,
) -> Database:
    """Create the engine for ``url`` (the configuration's ``LEASEHOLD_DATABASE_URL``; storage
    has no default of its own). MySQL and PostgreSQL get an explicit isolation level (READ
    COMMITTED unless told otherwise); SQLite gets WAL, a busy timeout and write-locking
    transactions.

    ``max_connections`` caps the pool of a MySQL/MariaDB or PostgreSQL store at that many
    connections (no overflow): a transaction waits up to ``pool_timeout`` seconds for a free one,
    then fails with ``StorageBusy``. Uncapped, the pool keeps ``pool_size`` and opens up to ten
    more while they are busy. SQLite runs one write at a time anyway and is never capped.

    ``idle_transaction_timeout`` (seconds) makes the server end a session that sits idle inside a
    transaction that long: a worker frozen (SIGSTOP, a long GC pause) inside a fence would
    otherwise keep the apply row locked, and reclaim, which skips locked rows, could never take
    the apply over. Workers pass ``stale_after``: by then a peer may reclaim anyway. MariaDB has
    ``idle_transaction_timeout``; on MySQL the nearest setting is the session ``wait_timeout``;
    PostgreSQL has ``idle_in_transaction_session_timeout``.
    """
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as exc:
        raise ConfigurationError(f"LEASEHOLD_DATABASE_URL is not a database URL: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return Database(_sqlite_engine(url, **engine_kwargs))
    if backend not in ("mysql", "mariadb", "postgresql"):
        raise ConfigurationError(
            f"unsupported database {backend!r} in {redact(url)}: use sqlite://, "
            "mysql+mysqldb:// or postgresql+psycopg://"
        )
    level = (isolation_level or "READ COMMITTED").upper()
    if level not in ISOLATION_LEVELS:
        raise ConfigurationError(f"unsupported isolation level {isolation_level!r}")
    if max_connections is not None:
        if max_connections < 1:
            raise ConfigurationError(f"a pool needs at least 1 connection, not {max_connections}")
        pool_size, engine_kwargs["max_overflow"] = max_connections, 0
    engine_kwargs["pool_timeout"] = pool_timeout
    connect_args = dict(engine_kwargs.pop("connect_args", {}))
    if backend == "postgresql":
        return _postgresql_database(
            parsed,
            level=level,
            pool_size=pool_size,
            connect_args=connect_args,
            idle_transaction_timeout=idle_transaction_timeout,
            **engine_kwargs,
        )
    if parsed.get_driver_name() == "mysqldb":
        # A partitioned or frozen server must not hang a statement for ever (the driver has no
        # read timeout by default): every store statement is short, and a lock wait ends at
        # InnoDB's innodb_lock_wait_timeout (50 s) first. A timeout loses the connection (error
        # 2013), which is StorageUnavailable and retried. The URL's own values win.
        for key, seconds in _MYSQL_TIMEOUTS.items():
            if key not in parsed.query:
                connect_args.setdefault(key, seconds)
    engine = _server_engine(
        parsed, level=level, pool_size=pool_size, connect_args=connect_args, **engine_kwargs
    )
    idle = None if idle_transaction_timeout is None else max(1, math.ceil(idle_transaction_timeout))
    _configure_sessions(engine, idle_transaction_timeout=idle)
    return Database(engine)


def _postgresql_database(
    parsed: URL,
    *,
    level: str,
    pool_size: int,
    connect_args: dict[str, Any],
    idle_transaction_timeout: float | None,
    **engine_kwargs: Any,
) -> Database:
    """PostgreSQL through psycopg 3. ``postgresql://`` (SQLAlchemy's default driver there is
    psycopg2) means psycopg 3, the one leasehold supports; another driver named outright is
    refused. Every session runs in UTC with a lock timeout, and with
    ``idle_in_transaction_session_timeout`` when asked (``open_database`` says why)."""
    driver = parsed.get_driver_name()
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif driver != "psycopg":
        raise ConfigurationError(
            f"unsupported PostgreSQL driver {driver!r} in {redact(str(parsed))}: use "
            "postgresql+psycopg:// (psycopg 3; pip install 'leasehold[postgres]')"
        )
    for key, value in _PG_CONNECT.items():
        if key not in parsed.query:
            connect_args.setdefault(key, value)
    options = [
        "-c TimeZone=UTC",
        f"-c lock_timeout={_PG_LOCK_TIMEOUT_MS:d}",
    ]
    if idle_transaction_timeout is not None:
        millis = max(1000, math.ceil(idle_transaction_timeout * 1000))
        options.append(f"-c idle_in_transaction_session_timeout={millis:d}")
    if "options" not in parsed.query:
        connect_args.setdefault("options", " ".join(options))
    engine = _server_engine(
        parsed, level=level, pool_size=pool_size, connect_args=connect_args, **engine_kwargs
    )
    return Database(engine)


def _server_engine(
    url: URL, *, level: str, pool_size: int, connect_args: dict[str, Any], **engine_kwargs: Any
) -> Engine:
    """The pooled engine of a MySQL/MariaDB or PostgreSQL store: an explicit isolation level,
    connections checked before use and renewed hourly."""
    try:
        return create_engine(
            url,
            isolation_level=level,
            pool_pre_ping=True,
            pool_recycle=3600,
            pool_size=pool_size,
            connect_args=connect_args,
            **engine_kwargs,
        )
    except (sa_exc.ArgumentError, ImportError) as exc:
        extra = "postgres" if url.get_backend_name() == "postgresql" else "mysql"
        raise ConfigurationError(
            f"cannot use {redact(str(url))}: {exc} (pip install 'leasehold[{extra}]')"
        ) from exc


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
    except sa_exc.TimeoutError as exc:
        # Every connection of a capped pool stayed in use (open_database's max_connections):
        # nothing was run, so the caller may simply try again, as after a lock wait.
        raise StorageBusy(f"database busy: no free connection: {exc}") from exc
    except sa_exc.SQLAlchemyError as exc:
        raise StorageError(f"database error: {exc}") from exc


def classify(exc: sa_exc.DBAPIError) -> StorageError:
    code = _mysql_code(exc)
    sqlstate = getattr(exc.orig, "sqlstate", None)  # psycopg's; None for the other drivers
    message = str(exc.orig) if exc.orig is not None else str(exc)
    if exc.connection_invalidated or code in _MYSQL_UNAVAILABLE:
        return StorageUnavailable(f"database unavailable: {message}")
    if isinstance(sqlstate, str) and (
        sqlstate in _PG_UNAVAILABLE or sqlstate.startswith(_PG_UNAVAILABLE_CLASSES)
    ):
        return StorageUnavailable(f"database unavailable: {message}")
    if sqlstate == _PG_SERIALIZATION_FAILURE:
        return SerializationFailure(f"database busy: {message}")
    if code in _MYSQL_BUSY or sqlstate in _PG_BUSY:
        return StorageBusy(f"database busy: {message}")
    if isinstance(exc, sa_exc.IntegrityError):
        return StorageIntegrityError(f"constraint violated: {message}")
    if isinstance(exc, sa_exc.OperationalError):
        lowered = message.lower()
        if "locked" in lowered or "busy" in lowered:
            return StorageBusy(f"database busy: {message}")
        if sqlstate is None and _is_psycopg(exc):
            # psycopg raises OperationalError without a SQLSTATE when no server answers (refused,
            # timed out, the connection lost mid-statement).
            return StorageUnavailable(f"database unavailable: {message}")
        if "unable to open" in lowered or "disk i/o" in lowered:
            return StorageUnavailable(f"database unavailable: {message}")
    return StorageError(f"database error: {message}")


def _is_psycopg(exc: sa_exc.DBAPIError) -> bool:
    return type(exc.orig).__module__.startswith("psycopg")


def _mysql_code(exc: sa_exc.DBAPIError) -> int | None:
    args = getattr(exc.orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None
