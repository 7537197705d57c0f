"""The database's clock, as SQL expressions.

Heartbeat ages and staleness are computed by the database (DESIGN invariant 6): no worker's clock
is ever compared with another's. Both constructs render at microsecond resolution so that they
compare correctly with the stored timestamps on each backend.
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
    return "NOW(6)"


@compiles(db_now_minus, "sqlite")
def _now_minus_sqlite(element: db_now_minus, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    return (
        "strftime('%Y-%m-%d %H:%M:%f000', 'now', "
        f"'-' || ({compiler.process(seconds, **kw)}) || ' seconds')"
    )


@compiles(db_now_minus, "mysql")
@compiles(db_now_minus, "mariadb")
def _now_minus_mysql(element: db_now_minus, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    return f"NOW(6) - INTERVAL ROUND(({compiler.process(seconds, **kw)}) * 1000000) MICROSECOND"


@compiles(seconds_since, "sqlite")
def _since_sqlite(element: seconds_since, compiler: SQLCompiler, **kw: Any) -> str:
    (ts,) = element.clauses
    return f"((julianday('now') - julianday({compiler.process(ts, **kw)})) * 86400.0)"


@compiles(seconds_since, "mysql")
@compiles(seconds_since, "mariadb")
def _since_mysql(element: seconds_since, compiler: SQLCompiler, **kw: Any) -> str:
    (ts,) = element.clauses
    return f"(TIMESTAMPDIFF(MICROSECOND, {compiler.process(ts, **kw)}, NOW(6)) / 1000000.0)"


def now() -> ColumnElement[Any]:
    return db_now()


def now_minus(seconds: ColumnElement[Any] | float) -> ColumnElement[Any]:
    return db_now_minus(seconds)


def age_of(ts: ColumnElement[Any]) -> ColumnElement[Any]:
    return seconds_since(ts)
