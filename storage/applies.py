"""Creating applies and reading them back. Nothing here needs a lease: creation happens before
any lease exists, and reads change nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, RowMapping

from storage import statements
from storage.engine import Database
from storage.errors import ApplyNotFound, StorageIntegrityError


@dataclass(frozen=True, slots=True)
class NewTask:
    table_name: str
    ddl: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NewApply:
    database_name: str
    environment: str
    engine: str
    tasks: Sequence[NewTask]
    repository: str | None = None
    pull_request: int | None = None
    head_sha: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Created:
    apply_id: int
    created: bool  # False: an earlier submission with the same request_id


def create(db: Database, new: NewApply) -> Created:
    """Insert the apply and its apply tasks in one transaction, state ``pending``.

    A repeated ``request_id`` returns the existing apply, also when two submissions race: the
    unique index decides, and the loser reads the winner's id.
    """
    if new.request_id is not None:
        existing = _by_request_id(db, new.request_id)
        if existing is not None:
            return Created(existing, created=False)
    try:
        with db.transaction() as conn:
            apply_id = _insert(conn, new)
    except StorageIntegrityError:
        if new.request_id is None:
            raise
        existing = _by_request_id(db, new.request_id)
        if existing is None:
            raise
        return Created(existing, created=False)
    return Created(apply_id, created=True)


def _insert(conn: Connection, new: NewApply) -> int:
    result = conn.execute(
        statements.insert_apply(
            {
                "database_name": new.database_name,
                "environment": new.environment,
                "engine": new.engine,
                "repository": new.repository,
                "pull_request": new.pull_request,
                "head_sha": new.head_sha,
                "request_id": new.request_id,
            }
        )
    )
    (apply_id,) = result.inserted_primary_key or (None,)
    if apply_id is None:  # pragma: no cover - both dialects report the key
        raise RuntimeError("the database did not report the new apply's id")
    if new.tasks:
        conn.execute(
            statements.insert_apply_tasks(
                int(apply_id),
                [
                    {
                        "position": position,
                        "table_name": task.table_name,
                        "ddl": task.ddl,
                        "options": task.options,
                    }
                    for position, task in enumerate(new.tasks)
                ],
            )
        )
    return int(apply_id)


def _by_request_id(db: Database, request_id: str) -> int | None:
    with db.transaction() as conn:
        found = conn.execute(statements.apply_by_request_id(request_id)).scalar_one_or_none()
    return None if found is None else int(found)


def get(db: Database, apply_id: int) -> RowMapping:
    """The apply row plus ``heartbeat_age`` in seconds by the database clock."""
    with db.transaction() as conn:
        row = conn.execute(statements.apply_row(apply_id)).mappings().one_or_none()
    if row is None:
        raise ApplyNotFound(apply_id)
    return row


def tasks(db: Database, apply_id: int) -> list[RowMapping]:
    with db.transaction() as conn:
        return list(conn.execute(statements.apply_task_rows(apply_id)).mappings())


def logs(db: Database, apply_id: int, *, after_id: int = 0, limit: int = 1000) -> list[RowMapping]:
    with db.transaction() as conn:
        return list(
            conn.execute(statements.log_rows(apply_id, after_id=after_id, limit=limit)).mappings()
        )


def lease_table(db: Database, *, limit: int = 50) -> list[RowMapping]:
    with db.transaction() as conn:
        return list(conn.execute(statements.lease_table(limit)).mappings())
