"""Marks: when each background duty last ran, by the database clock. Every reclaim pass touches
``reclaim_pass``; ``leasehold doctor`` reads its age to tell whether a beat is alive."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from storage import _statements as statements
from storage.database import Database
from storage.errors import RowNotFound

RECLAIM_PASS = "reclaim_pass"


@dataclass(frozen=True, slots=True)
class Mark:
    at: datetime | None  # None: never ran
    age: float | None  # seconds ago, by the database clock
    detail: str | None


def touch(db: Database, name: str, *, detail: str | None = None) -> None:
    # Two passes touching one mark at once wait for each other: under PostgreSQL's REPEATABLE
    # READ the second fails to serialize, and attempts() runs it again.
    for txn in db.attempts():
        with txn as conn:
            if conn.execute(statements.touch_mark(name, detail=detail)).rowcount != 1:
                raise RowNotFound(f"no mark {name!r}: is the store migrated?")


def read(db: Database, name: str) -> Mark:
    with db.transaction() as conn:
        row = conn.execute(statements.mark_row(name)).one_or_none()
    if row is None:
        raise RowNotFound(f"no mark {name!r}: is the store migrated?")
    return Mark(row.at, None if row.age is None else float(row.age), row.detail)
