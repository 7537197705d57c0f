"""The database's clock, in UTC, as SQL expressions.

Heartbeat ages and staleness are computed by the database (DESIGN invariant 6): no worker's clock
is ever compared with another's. Every timestamp leasehold writes and every age it computes use
the store's UTC clock: ``UTC_TIMESTAMP(6)`` on MySQL/MariaDB, never ``NOW()``, which follows the
session's time zone (``SYSTEM`` on most servers) and so jumps an hour at a daylight-saving
change: a fall-back would put live heartbeats in the future (dead workers never reclaimed), a
spring-forward would age every heartbeat by an hour at once (mass false reclaims). On PostgreSQL
it is ``statement_timestamp() AT TIME ZONE 'UTC'``: the statement's start, as MySQL's is (``now()``
is the transaction's start, which would age nothing while a transaction waits for a lock), in
UTC whatever the session's ``TimeZone``, stored in ``timestamp without time zone`` columns like
MySQL's ``DATETIME(6)``. SQLite's ``'now'`` is UTC already. The constructs render at
microsecond resolution so that they compare correctly with the stored timestamps on each backend.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement, FunctionElement
from sqlalchemy.types import DateTime, Float


class db_now(FunctionElement[Any]):
    """The database's current time."""

    type = DateTime()
    inherit_cache = True
    name = "db_now"


class db_now_minus(FunctionElement[Any]):
    """The database's current time minus a number of seconds (a bound parameter)."""

    type = DateTime()
    inherit_cache = True
    name = "db_now_minus"


class db_now_plus(FunctionElement[Any]):
    """The database's current time plus a number of seconds (a bound parameter)."""

    type = DateTime()
    inherit_cache = True
    name = "db_now_plus"


class seconds_since(FunctionElement[Any]):
    """Seconds elapsed, by the database's clock, since a timestamp expression."""

    type = Float()
    inherit_cache = True
    name = "seconds_since"


# SQLite stores SQLAlchemy DateTime as 'YYYY-MM-DD HH:MM:SS.ffffff'; '%f' yields 'SS.fff', so the
# three trailing zeros keep string comparison with stored values exact.
_SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


@compiles(db_now)
def _now_default(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return _SQLITE_NOW


@compiles(db_now, "mysql")
@compiles(db_now, "mariadb")
def _now_mysql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "UTC_TIMESTAMP(6)"


_PG_NOW = "(statement_timestamp() AT TIME ZONE 'UTC')"


@compiles(db_now, "postgresql")
def _now_postgresql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return _PG_NOW


_SIGN = {"db_now_minus": "-", "db_now_plus": "+"}


@compiles(db_now_minus, "sqlite")
@compiles(db_now_plus, "sqlite")
def _now_shifted_sqlite(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    return (
        "strftime('%Y-%m-%d %H:%M:%f000', 'now', "
        f"'{_SIGN[element.name]}' || ({compiler.process(seconds, **kw)}) || ' seconds')"
    )


@compiles(db_now_minus, "mysql")
@compiles(db_now_minus, "mariadb")
@compiles(db_now_plus, "mysql")
@compiles(db_now_plus, "mariadb")
def _now_shifted_mysql(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    micros = f"ROUND(({compiler.process(seconds, **kw)}) * 1000000)"
    return f"UTC_TIMESTAMP(6) {_SIGN[element.name]} INTERVAL {micros} MICROSECOND"


@compiles(db_now_minus, "postgresql")
@compiles(db_now_plus, "postgresql")
def _now_shifted_postgresql(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    shift = f"CAST({compiler.process(seconds, **kw)} AS DOUBLE PRECISION) * INTERVAL '1 second'"
    return f"({_PG_NOW} {_SIGN[element.name]} {shift})"


@compiles(seconds_since, "sqlite")
def _since_sqlite(element: seconds_since, compiler: SQLCompiler, **kw: Any) -> str:
    (ts,) = element.clauses
    return f"((julianday('now') - julianday({compiler.process(ts, **kw)})) * 86400.0)"


@compiles(seconds_since, "mysql")
@compiles(seconds_since, "mariadb")
def _since_mysql(element: seconds_since, compiler: SQLCompiler, **kw: Any) -> str:
    (ts,) = element.clauses
    since = compiler.process(ts, **kw)
    return f"(TIMESTAMPDIFF(MICROSECOND, {since}, UTC_TIMESTAMP(6)) / 1000000.0)"


@compiles(seconds_since, "postgresql")
def _since_postgresql(element: seconds_since, compiler: SQLCompiler, **kw: Any) -> str:
    (ts,) = element.clauses
    since = compiler.process(ts, **kw)
    return f"CAST(EXTRACT(EPOCH FROM ({_PG_NOW} - {since})) AS DOUBLE PRECISION)"


def now() -> ColumnElement[Any]:
    return db_now()


def now_minus(seconds: ColumnElement[Any] | float) -> ColumnElement[Any]:
    return db_now_minus(seconds)


def now_plus(seconds: ColumnElement[Any] | float) -> ColumnElement[Any]:
    return db_now_plus(seconds)


def age_of(ts: ColumnElement[Any]) -> ColumnElement[Any]:
    return seconds_since(ts)
