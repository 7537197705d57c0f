"""What the statement modules share: the set of waiting states, the primary-key hint of the
apply row's UPDATEs, the columns of a lease row, and the record of one row as an
update-then-insert."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Insert, Table, Update, insert

from storage.states import WAITING_STATES
from storage.tables import applies

_WAITING = sorted(WAITING_STATES)
# The columns of a lease row as storage/_leasing.py's LeaseRow reads them, with its owner.
_LEASE_ROW = (
    applies.c.id,
    applies.c.state,
    applies.c.lease_epoch,
    applies.c.lease_token,
    applies.c.lease_owner,
)


def _by_primary_key(stmt: Update) -> Update:
    """Make MySQL/MariaDB find the apply row by its primary key, locking only that row.

    These UPDATEs name ``state`` in their WHERE clause, and with few applies rows the optimizer
    costs a range scan of ``ix_applies_state_heartbeat_at`` as cheap as the primary key. That scan
    locks the index entry before the row: a heartbeat waiting for a fenced row then holds the
    entry the fence's own rotation needs, and InnoDB breaks the cycle with a deadlock error (under
    READ COMMITTED and REPEATABLE READ; tests/contract/test_races.py). SQLite ignores the hint.
    """
    for dialect in ("mysql", "mariadb"):
        stmt = stmt.with_hint("FORCE INDEX (PRIMARY)", dialect_name=dialect)
    return stmt


@dataclass(frozen=True, slots=True)
class Upsert:
    """One row's record, as the update to try first and the insert if it matched nothing. Built
    from one mapping of values, so that the two can never disagree about a column."""

    update: Update
    insert: Insert


def _upsert(
    table: Table,
    key: Mapping[str, Any],
    values: Mapping[str, Any],
    *,
    on_update: Mapping[str, Any],
    on_insert: Mapping[str, Any],
) -> Upsert:
    where = [table.c[name] == value for name, value in key.items()]
    return Upsert(
        update=table.update().where(*where).values(**values, **on_update),
        insert=insert(table).values(**key, **values, **on_insert),
    )
