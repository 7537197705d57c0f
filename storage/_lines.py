"""Lines: at most one apply per (database, environment) is dispatched or running at a time.

Every unfinished apply is in its line, in id (submission) order; the first one is the line's
*head*. Only the head may be dispatched or run. A head that is ``stopped`` keeps its place, and so
holds back the applies behind it until it is resumed or cancelled; a waiting apply (``queued``)
that becomes the head is dispatched in the transaction that made it the head: the submit that
found its line empty, or the end of the apply before it (``promote``).

Each line has a row in ``apply_lines``, locked by every transaction that can change who holds the
line's turn. Lock order: the line row, then applies rows of that line. Transactions that lock an
applies row without the line (heartbeats, fences for ordinary owned writes, redemption, reclaim
batches) never wait for a line, so the two kinds cannot deadlock.

Connection-level operations for composing into one transaction, like ``storage._leasing``; tokens
are the caller's (``leases`` mints them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row

from storage import _leasing as leasing
from storage import _statements as statements
from storage._leasing import LeaseRow
from storage.database import Database
from storage.errors import ApplyNotFound, RowNotFound
from storage.states import WAITING_STATES, ApplyState


@dataclass(frozen=True, slots=True, order=True)
class Line:
    database_name: str
    environment: str

    def __str__(self) -> str:
        return f"{self.database_name}/{self.environment}"


class LineMissing(RowNotFound):
    """A line has no row yet: its first apply is being submitted."""


@dataclass(frozen=True, slots=True)
class Promoted:
    """A waiting head that was just dispatched: send it a lease of this epoch once committed."""

    apply_id: int
    epoch: int


def lock(conn: Connection, line: Line, *, make: bool = True) -> None:
    """Lock ``line`` until the transaction ends. Take it before any applies row of the line.

    ``make=False``: raise :class:`LineMissing` if the line has no row yet (submit then makes it
    with :func:`make` and tries again). Otherwise a missing row is made here, in the caller's
    transaction: only applies inserted by a leasehold older than lines (during a rolling upgrade)
    have none, and their transitions rarely race (when they do, InnoDB breaks the deadlock and
    the caller's retry of ``StorageBusy`` finds the row).
    """
    lock_line = statements.lock_line(
        line.database_name, line.environment, dialect=conn.dialect.name
    )
    if conn.execute(lock_line).first() is not None:
        return
    if not make:
        raise LineMissing(f"line {line} has no row yet")
    conn.execute(
        statements.make_line(line.database_name, line.environment, dialect=conn.dialect.name)
    )
    conn.execute(lock_line).one()


def make(db: Database, line: Line) -> None:
    """Make the line's row if it is missing, in a transaction of its own. Racing first submits
    of a new line all get here: ``INSERT IGNORE`` lets one insert and the others find it, where
    inserts inside their submit transactions would deadlock under REPEATABLE READ. READ
    COMMITTED always: PostgreSQL's REPEATABLE READ fails an ``ON CONFLICT`` insert whose
    conflicting row is newer than its snapshot, as it is while racers lock the line."""
    for txn in db.attempts(isolation_level="READ COMMITTED"):
        with txn as conn:
            conn.execute(
                statements.make_line(
                    line.database_name, line.environment, dialect=conn.dialect.name
                )
            )


def of(conn: Connection, apply_id: int) -> Line:
    """The line of an apply (its database and environment never change)."""
    row = conn.execute(statements.line_of(apply_id)).one_or_none()
    if row is None:
        raise ApplyNotFound(apply_id)
    return Line(row.database_name, row.environment)


@dataclass(frozen=True, slots=True)
class Place:
    """Where an unfinished apply stands in its line."""

    line: Line
    position: int  # the head is #1
    head: LeaseRow  # the line's head (the apply itself when position is 1)


def place(conn: Connection, line: Line, apply_id: int) -> Place | None:
    """Where an unfinished apply of ``line`` stands (None: the line is empty)."""
    ahead = conn.execute(
        statements.count_ahead(line.database_name, line.environment, apply_id)
    ).scalar_one()
    first = head(conn, line)
    if first is None:
        return None
    return Place(line, int(ahead) + 1, first)


def head(conn: Connection, line: Line) -> LeaseRow | None:
    rows = conn.execute(statements.line_head(line.database_name, line.environment))
    first = rows.first()
    return None if first is None else _lease_row(first)


def promote(conn: Connection, line: Line, token: str) -> Promoted | None:
    """Dispatch the line's head with ``token`` if it is waiting. The caller holds the line lock,
    so nothing else can change the head meanwhile."""
    first = head(conn, line)
    if first is None or first.state not in WAITING_STATES:
        return None
    locked = leasing.lock(conn, first.apply_id)
    epoch = leasing.rotate(
        conn,
        locked,
        new_token=token,
        to_state=ApplyState.DISPATCHED,
        event="dispatched",
        reason=f"dispatched to a worker: its turn on {line}",
    )
    return Promoted(first.apply_id, epoch)


def waiting(conn: Connection) -> list[Line]:
    """Lines that hold a waiting apply (whose head may be waiting too)."""
    return sorted(
        Line(r.database_name, r.environment) for r in conn.execute(statements.waiting_lines())
    )


def _lease_row(row: Row[Any]) -> LeaseRow:
    return LeaseRow(row.id, row.state, row.lease_epoch, row.lease_token, row.lease_owner)
