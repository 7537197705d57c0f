"""Lines: one apply per (database, environment) at a time."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Insert, Select, Update, case, func, insert, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import aliased

from storage import clock
from storage._statements._common import _LEASE_ROW, _WAITING
from storage.states import IN_LINE_STATES, ApplyState
from storage.tables import applies, apply_lines

_IN_LINE = sorted(IN_LINE_STATES)


def make_line(database_name: str, environment: str, *, dialect: str) -> Insert:
    """Make a line's row if it is missing; a no-op when it exists (so, safe to race)."""
    if dialect == "postgresql":
        return (
            postgresql.insert(apply_lines)
            .values(database_name=database_name, environment=environment, created_at=clock.now())
            .on_conflict_do_nothing()
        )
    return (
        insert_line(database_name, environment)
        .prefix_with("IGNORE", dialect="mysql")
        .prefix_with("IGNORE", dialect="mariadb")
        .prefix_with("OR IGNORE", dialect="sqlite")
    )


def insert_line(database_name: str, environment: str) -> Insert:
    return insert(apply_lines).values(
        database_name=database_name, environment=environment, created_at=clock.now()
    )


def lock_line(database_name: str, environment: str, *, dialect: str) -> Select[Any] | Update:
    """Lock a line until the transaction ends. Taken before any applies row of the line.

    On PostgreSQL the lock is a write that changes nothing: under REPEATABLE READ a transaction
    keeps the snapshot of its first statement, so one that waited for the line would not see the
    applies its holder added; a row the holder *wrote* makes the waiter fail to serialize
    instead, and ``Database.attempts`` runs it again with a fresh snapshot. (A locking read
    sees the newest committed rows on MySQL/MariaDB; SQLite serializes every writer.)
    """
    where = (
        apply_lines.c.database_name == database_name,
        apply_lines.c.environment == environment,
    )
    if dialect == "postgresql":
        return (
            apply_lines.update()
            .where(*where)
            .values(database_name=apply_lines.c.database_name)
            .returning(apply_lines.c.database_name)
        )
    return select(apply_lines.c.database_name).where(*where).with_for_update()


def line_of(apply_id: int) -> Select[Any]:
    return select(applies.c.database_name, applies.c.environment).where(applies.c.id == apply_id)


_ACTIVE = sorted({ApplyState.DISPATCHED, ApplyState.RUNNING})


def _line_rank(table: Any) -> ColumnElement[Any]:
    """A line's order is (this, id): 0 for the apply that is dispatched or running, 1 for the
    rest. Without a retry only the oldest apply of a line can be dispatched or running, so this is
    plain id (submission) order. A retried apply re-enters its line with its old id: it must wait
    behind the apply at work on its database, not head the line (and be dispatched beside it).
    Stopped applies rank as the rest, so a stopped one keeps its submission place."""
    return case((table.c.state.in_(_ACTIVE), 0), else_=1)


def line_head(database_name: str, environment: str) -> Select[Any]:
    """The first unfinished apply of a line: the one at work (dispatched or running), else the
    oldest."""
    return (
        select(*_LEASE_ROW)
        .where(
            applies.c.database_name == database_name,
            applies.c.environment == environment,
            applies.c.state.in_(_IN_LINE),
        )
        .order_by(_line_rank(applies), applies.c.id)
        .limit(1)
    )


def count_ahead(database_name: str, environment: str, apply_id: int) -> Select[Any]:
    """How many unfinished applies of the line come before ``apply_id`` (in the line's order)."""
    me = aliased(applies)
    mine = select(_line_rank(me)).where(me.c.id == apply_id).scalar_subquery()
    theirs = _line_rank(applies)
    return select(func.count()).where(
        applies.c.database_name == database_name,
        applies.c.environment == environment,
        applies.c.state.in_(_IN_LINE),
        (theirs < mine) | ((theirs == mine) & (applies.c.id < apply_id)),
    )


def waiting_lines() -> Select[Any]:
    """The lines that hold a waiting apply (each once)."""
    return (
        select(applies.c.database_name, applies.c.environment)
        .where(applies.c.state.in_(_WAITING))
        .group_by(applies.c.database_name, applies.c.environment)
    )


def _ahead_in_line(row: Any) -> ColumnElement[Any]:
    """How many unfinished applies of ``row``'s line come before it (a correlated count)."""
    other = aliased(applies)
    return (
        select(func.count())
        .where(
            other.c.database_name == row.c.database_name,
            other.c.environment == row.c.environment,
            other.c.state.in_(_IN_LINE),
            (_line_rank(other) < _line_rank(row))
            | ((_line_rank(other) == _line_rank(row)) & (other.c.id < row.c.id)),
        )
        .scalar_subquery()
    )
