"""Creating applies and reading them back. Nothing here needs a lease: creation happens before
any lease exists, and reads change nothing. A new apply is ``queued`` in its line
(``storage._lines``); ``leases.submit`` creates and, when its line is free, dispatches it in one
transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, RowMapping

from storage import _leasing as leasing
from storage import _lines as lines
from storage import _statements as statements
from storage import control, notifications
from storage._lines import Line, LineMissing, Place, Promoted
from storage.control import ControlRequest
from storage.database import Database
from storage.errors import ApplyNotFound, StorageIntegrityError
from storage.notifications import Notify
from storage.states import ApplyState


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
    notify: Notify | None = None
    requested_by: str | None = None  # free text: who asked, as the submitter said

    @property
    def line(self) -> Line:
        return Line(self.database_name, self.environment)


@dataclass(frozen=True, slots=True)
class Created:
    apply_id: int
    created: bool  # False: an earlier submission with the same request_id
    promoted: Promoted | None = None  # the apply dispatched with ``turn_token``, if any


def create(db: Database, new: NewApply, *, turn_token: str | None = None) -> Created:
    """Insert the apply (``queued``) and its apply tasks in one transaction, with its line locked
    from before the insert. With ``turn_token``, the line's head is dispatched with it in the same
    transaction if it is waiting: the new apply itself when its line was free.

    A repeated ``request_id`` returns the existing apply and dispatches nothing, also when two
    submissions race: the unique index decides, and the loser reads the winner's id. It is
    looked up in the same transaction once the line is locked (the lock first: under MySQL's
    REPEATABLE READ the first plain read fixes the snapshot, which must not predate the lock).
    """
    for attempt in (1, 2):
        try:
            for txn in db.attempts():
                with txn as conn:
                    lines.lock(conn, new.line, make=False)
                    existing = None
                    if new.request_id is not None:
                        existing = _request_id_in(conn, new.request_id)
                    if existing is not None:
                        outcome = Created(existing, created=False)
                    else:
                        outcome = _create_in(conn, new, turn_token)
            return outcome
        except LineMissing:
            # A repeat (whatever its line) makes no line: it writes nothing at all.
            found = None if new.request_id is None else _by_request_id(db, new.request_id)
            if found is not None:
                return Created(found, created=False)
            if attempt == 2:
                raise
            lines.make(db, new.line)  # the line's first apply: make its row, then once more
        except StorageIntegrityError:
            found = None if new.request_id is None else _by_request_id(db, new.request_id)
            if found is None:
                raise
            return Created(found, created=False)
    raise AssertionError("unreachable")  # pragma: no cover


def _create_in(conn: Connection, new: NewApply, turn_token: str | None) -> Created:
    """The insert of :func:`create`, in its transaction, under the line lock."""
    apply_id = _insert(conn, new)
    if new.notify is not None:
        notifications._record(conn, apply_id, new.notify)
    promoted = None
    if turn_token is not None:
        promoted = lines.promote(conn, new.line, turn_token)
    if promoted is None or promoted.apply_id != apply_id:
        _log_if_behind(conn, new.line, apply_id)
    return Created(apply_id, created=True, promoted=promoted)


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
                "requested_by": new.requested_by,
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


def _log_if_behind(conn: Connection, line: Line, apply_id: int) -> None:
    where = lines.place(conn, line, apply_id)
    if where is not None and where.position > 1:
        leasing.append_log(
            conn,
            apply_id,
            epoch=0,
            level="info",
            event="queued",
            message=f"queued on {line}: #{where.position} in line, behind apply "
            f"{where.head.apply_id} ({where.head.state})",
        )


def _by_request_id(db: Database, request_id: str) -> int | None:
    with db.transaction() as conn:
        return _request_id_in(conn, request_id)


def _request_id_in(conn: Connection, request_id: str) -> int | None:
    found = conn.execute(statements.apply_by_request_id(request_id)).scalar_one_or_none()
    return None if found is None else int(found)


def get(db: Database, apply_id: int) -> RowMapping:
    """The apply row plus ``heartbeat_age`` in seconds by the database clock."""
    with db.transaction() as conn:
        row = conn.execute(statements.apply_row(apply_id)).mappings().one_or_none()
    if row is None:
        raise ApplyNotFound(apply_id)
    return row


@dataclass(frozen=True, slots=True)
class RunSnapshot:
    """What a run of an apply starts from: its row (as :func:`get`), its apply tasks in order
    (as :func:`tasks`) and its pending control requests, oldest first."""

    apply: RowMapping
    tasks: list[RowMapping]
    requests: list[ControlRequest]


def for_run(db: Database, apply_id: int) -> RunSnapshot:
    """The apply, its tasks and its pending control requests in one transaction (one store
    round trip instead of three, right after a worker redeemed the apply's lease)."""
    with db.transaction() as conn:
        return run_snapshot(conn, apply_id)


def run_snapshot(conn: Connection, apply_id: int) -> RunSnapshot:
    """:func:`for_run` in the caller's transaction (e.g. the one that redeems the lease)."""
    row = conn.execute(statements.apply_row(apply_id)).mappings().one_or_none()
    if row is None:
        raise ApplyNotFound(apply_id)
    rows = list(conn.execute(statements.apply_task_rows(apply_id)).mappings())
    requests = control.pending_in(conn, [apply_id]).get(apply_id, [])
    return RunSnapshot(row, rows, requests)


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


def active(db: Database, *, limit: int = 10_000) -> list[RowMapping]:
    """Dispatched and running applies (id, state, heartbeat_age), stalest first."""
    with db.transaction() as conn:
        return list(conn.execute(statements.active_applies(limit)).mappings())


def control_requests(db: Database, apply_id: int) -> list[RowMapping]:
    """Every control request of an apply, oldest first: id, action, state, requested_by, error
    (the header of ``leasehold logs``)."""
    with db.transaction() as conn:
        return list(conn.execute(statements.control_requests_of_apply(apply_id)).mappings())


def pending_requests(db: Database, apply_id: int) -> list[RowMapping]:
    """An apply's control requests still pending, oldest first, with their age (DB clock)."""
    with db.transaction() as conn:
        return list(conn.execute(statements.pending_control_requests(apply_id)).mappings())


def place(db: Database, apply_id: int) -> Place | None:
    """A waiting apply's place in its line; None for the head, or a finished apply."""
    with db.transaction() as conn:
        if ApplyState(leasing.read(conn, apply_id).state).terminal:
            return None
        where = lines.place(conn, lines.of(conn, apply_id), apply_id)
    return None if where is None or where.position == 1 else where
