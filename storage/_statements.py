"""Every SQL statement leasehold runs, by name.

Domain code never builds SQL: it calls these builders (procrastinate keeps its queries in one
file the same way). Preconditions live in the WHERE clause; callers treat zero matched rows as an
error with a name. On MySQL the SQLAlchemy mysqlclient dialect connects with CLIENT_FOUND_ROWS, so
``rowcount`` counts *matched* rows, and an idempotent write that changes no column still reports 1
(proved against the real server by the contract tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Insert,
    Select,
    String,
    Table,
    Update,
    bindparam,
    case,
    func,
    insert,
    literal,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import aliased

from storage import clock
from storage.states import IN_LINE_STATES, TERMINAL_APPLY_STATES, WAITING_STATES, ApplyState
from storage.tables import (
    applies,
    apply_comments,
    apply_lines,
    apply_logs,
    apply_tasks,
    checks,
    control_requests,
    marks,
    notifications,
    publications,
)

_IN_LINE = sorted(IN_LINE_STATES)
_WAITING = sorted(WAITING_STATES)

# --- the lease row -------------------------------------------------------------------------------


def read_lease_row(apply_id: int) -> Select[Any]:
    """Why a precondition failed: the row as it is now, unlocked."""
    return select(
        applies.c.id, applies.c.state, applies.c.lease_epoch, applies.c.lease_token
    ).where(applies.c.id == apply_id)


def existing_apply_ids(apply_ids: Iterable[int]) -> Select[Any]:
    """Which of ``apply_ids`` exist, unlocked (a skipped row is held, a missing one gone)."""
    return select(applies.c.id).where(applies.c.id.in_(sorted(apply_ids)))


def fence(apply_id: int, token: str) -> Select[Any]:
    """The fence: prove the lease current and lock the apply row until the transaction ends.

    A locking read sees the newest committed row under REPEATABLE READ and READ COMMITTED alike,
    and waits for a rotation in flight. On SQLite the row lock is the database write lock that
    every transaction takes at BEGIN IMMEDIATE, so the clause is omitted by the dialect.
    """
    return (
        select(applies.c.lease_epoch)
        .where(
            applies.c.id == apply_id,
            applies.c.lease_token == token,
            applies.c.state == ApplyState.RUNNING,
        )
        .with_for_update()
    )


def lock_apply(apply_id: int) -> Select[Any]:
    """Lock one apply row for a transition made without a lease (control, dispatch)."""
    return (
        select(
            applies.c.id,
            applies.c.state,
            applies.c.lease_epoch,
            applies.c.lease_token,
            applies.c.lease_owner,
        )
        .where(applies.c.id == apply_id)
        .with_for_update()
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


def rotate(
    apply_id: int,
    *,
    old_epoch: int,
    old_token: str | None,
    new_token: str,
    from_states: Iterable[str],
    to_state: str,
    reclaimed: bool = False,
    error: str | None = None,
) -> Update:
    """Compare-and-swap the lease: only the holder of (old_epoch, old_token) can rotate it."""
    token_matches = (
        applies.c.lease_token.is_(None) if old_token is None else applies.c.lease_token == old_token
    )
    values: dict[str, Any] = {
        "lease_token": new_token,
        "lease_epoch": applies.c.lease_epoch + 1,
        "lease_owner": None,
        "lease_acquired_at": None,
        "state": to_state,
        "heartbeat_at": clock.now(),
        "updated_at": clock.now(),
    }
    if reclaimed:
        values["reclaim_count"] = applies.c.reclaim_count + 1
    if ApplyState(to_state).terminal:
        values["finished_at"] = clock.now()
        values["error"] = error
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == old_epoch,
            token_matches,
            applies.c.state.in_(list(from_states)),
        )
        .values(**values)
    )


def redeem(apply_id: int, *, epoch: int, token: str, owner: str) -> Update:
    """The worker's first write: claim a dispatched lease that nobody has claimed yet."""
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == epoch,
            applies.c.lease_token == token,
            applies.c.lease_owner.is_(None),
            applies.c.state == ApplyState.DISPATCHED,
        )
        .values(
            lease_owner=owner,
            state=ApplyState.RUNNING,
            lease_acquired_at=clock.now(),
            heartbeat_at=clock.now(),
            updated_at=clock.now(),
        )
    )


def heartbeat(apply_id: int, *, epoch: int, token: str) -> Update:
    """Liveness, fenced in one statement: the row lock of the UPDATE is the fence."""
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == epoch,
            applies.c.lease_token == token,
            applies.c.state == ApplyState.RUNNING,
        )
        .values(heartbeat_at=clock.now())
    )


def lock_held(apply_ids: Iterable[int]) -> Select[Any]:
    """A worker's batched heartbeat, step 1: lock the lease rows of the applies it holds, skipping
    those locked now (the owner's own fence in flight, or a reclaimer's rotation), and read them.

    A locking read sees the newest committed row, as the fence does; ``SKIP LOCKED`` keeps one
    apply's held row from delaying every other lease of the worker (the skipped one is neither
    renewed nor lost this beat). No ``state`` in the WHERE clause: the primary key alone finds
    the rows, so no index entry of ``(state, heartbeat_at)`` is locked (see ``_by_primary_key``).
    On SQLite the clause is omitted: BEGIN IMMEDIATE holds the whole database.
    """
    return (
        select(applies.c.id, applies.c.state, applies.c.lease_epoch, applies.c.lease_token)
        .where(applies.c.id.in_(sorted(apply_ids)))
        .order_by(applies.c.id)
        .with_for_update(skip_locked=True)
    )


def renew_held(leases: Iterable[tuple[int, int, str]]) -> Update:
    """A worker's batched heartbeat, step 2: renew the leases that step 1 proved current, in one
    statement. The rows are locked by step 1 already; the precondition stays in the WHERE clause
    all the same, so that the statement is a fence of its own (``rowcount`` must be all of them).
    """
    held = sorted(leases)
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id.in_([apply_id for apply_id, _, _ in held]),
            tuple_(applies.c.id, applies.c.lease_epoch, applies.c.lease_token).in_(held),
            applies.c.state == ApplyState.RUNNING,
        )
        .values(heartbeat_at=clock.now())
    )


def stale_candidates(state: str, *, older_than: float, limit: int) -> Select[Any]:
    """Applies in ``state`` whose heartbeat is older than ``older_than`` seconds by the DB clock.

    An index range scan on (state, heartbeat_at); rows another reclaimer (or a fenced write in
    flight) holds are skipped rather than waited for.
    """
    return (
        select(
            applies.c.id,
            applies.c.state,
            applies.c.lease_epoch,
            applies.c.lease_token,
            applies.c.reclaim_count,
        )
        .where(
            applies.c.state == state,
            applies.c.heartbeat_at < clock.now_minus(bindparam("older_than", older_than)),
        )
        .order_by(applies.c.heartbeat_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def current_epoch(apply_id: int) -> Select[Any]:
    return select(applies.c.lease_epoch).where(applies.c.id == apply_id)


# --- dispatches owed (the broker was down) --------------------------------------------------------


def owe_dispatch(apply_id: int, *, epoch: int) -> Update:
    """``run_apply`` for ``epoch`` could not be sent. Only while that lease is still the current,
    unredeemed one: a later rotation dispatches on its own."""
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == epoch,
            applies.c.state == ApplyState.DISPATCHED,
            applies.c.lease_owner.is_(None),
        )
        .values(dispatch_owed_epoch=epoch)
    )


def owed_dispatches(limit: int) -> Select[Any]:
    """Dispatched, unredeemed leases whose ``run_apply`` is still owed."""
    return (
        select(applies.c.id, applies.c.lease_epoch, applies.c.lease_token)
        .where(
            applies.c.state == ApplyState.DISPATCHED,
            applies.c.lease_owner.is_(None),
            applies.c.dispatch_owed_epoch == applies.c.lease_epoch,
        )
        .order_by(applies.c.id)
        .limit(limit)
    )


def dispatch_sent(apply_id: int, *, epoch: int) -> Update:
    return _by_primary_key(
        applies.update()
        .where(applies.c.id == apply_id, applies.c.dispatch_owed_epoch == epoch)
        .values(dispatch_owed_epoch=None)
    )


# --- the effect window (external calls) ---------------------------------------------------------


def open_effect_window(apply_id: int, *, epoch: int, token: str, seconds: float) -> Update:
    """Open (or extend) the lease's effect window: ``seconds`` from now by the store's clock.

    Only the current lease may, in any state (a stopped or ended apply is still published), and
    only once no window of another epoch is open: an earlier epoch's call may still be in flight
    until its window ends, and ours must not overlap it.
    """
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == epoch,
            applies.c.lease_token == token,
            applies.c.effect_until.is_(None)
            | (applies.c.effect_epoch == epoch)
            | (applies.c.effect_until <= clock.now()),
        )
        .values(effect_epoch=epoch, effect_until=clock.now_plus(bindparam("seconds", seconds)))
    )


def effect_window_row(apply_id: int) -> Select[Any]:
    """Why a window did not open: the lease as it is, and the seconds the open one has left."""
    return select(
        applies.c.lease_epoch,
        applies.c.lease_token,
        applies.c.effect_epoch,
        (-clock.age_of(applies.c.effect_until)).label("remaining"),
    ).where(applies.c.id == apply_id)


def close_effect_window(apply_id: int, *, epoch: int) -> Update:
    """The epoch's calls are over (answered): later epochs need not wait for its window to run
    out. The one write a holder may still make once its lease moved on, since it only says that
    its own call is over; it never touches a later epoch's window."""
    return _by_primary_key(
        applies.update()
        .where(applies.c.id == apply_id, applies.c.effect_epoch == epoch)
        .values(effect_until=None)
    )


def effect_fence(apply_id: int, token: str) -> Select[Any]:
    """The fence of an effect's record: the lease is current, in whatever state the apply is
    (its stopped or final state is published after the rotation that made it so)."""
    return (
        select(applies.c.lease_epoch)
        .where(applies.c.id == apply_id, applies.c.lease_token == token)
        .with_for_update()
    )


# --- owned writes (run inside a fence) -----------------------------------------------------------


def set_apply_state(apply_id: int, *, state: str, error: str | None) -> Update:
    values: dict[str, Any] = {"state": state, "error": error, "updated_at": clock.now()}
    if ApplyState(state).terminal:
        values["finished_at"] = clock.now()
    return applies.update().where(applies.c.id == apply_id).values(**values)


def update_task(apply_id: int, task_id: int, *, epoch: int, values: Mapping[str, Any]) -> Update:
    return (
        apply_tasks.update()
        .where(apply_tasks.c.id == task_id, apply_tasks.c.apply_id == apply_id)
        .values(lease_epoch=epoch, **values)
    )


def append_log(apply_id: int, *, epoch: int, level: str, event: str, message: str) -> Insert:
    return insert(apply_logs).values(
        apply_id=apply_id,
        lease_epoch=epoch,
        level=level,
        event=event,
        message=message,
        created_at=clock.now(),
    )


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


def record_comment(
    apply_id: int, *, kind: str, epoch: int, github_comment_id: int, body_sha256: str
) -> Upsert:
    """A comment created or edited: its id, digest and epoch; edits counted."""
    return _upsert(
        apply_comments,
        {"apply_id": apply_id, "kind": kind},
        {
            "github_comment_id": github_comment_id,
            "last_epoch": epoch,
            "body_sha256": body_sha256,
            "updated_at": clock.now(),
        },
        on_update={"edit_count": apply_comments.c.edit_count + 1},
        on_insert={"edit_count": 0},
    )


def record_check(
    apply_id: int, *, epoch: int, check_run_id: int, status: str, conclusion: str | None
) -> Upsert:
    """A check run created or updated: its id, status, conclusion and epoch."""
    return _upsert(
        checks,
        {"apply_id": apply_id},
        {
            "github_check_run_id": check_run_id,
            "status": status,
            "conclusion": conclusion,
            "last_epoch": epoch,
            "updated_at": clock.now(),
        },
        on_update={},
        on_insert={},
    )


def fail_pending_control_requests(apply_id: int, *, apply_state: str) -> Update:
    """Every request still pending when its apply ends fails, saying so: "apply completed before
    the stop took effect". Run by every rotation to a terminal state, in its transaction."""
    reason: ColumnElement[Any] = (
        literal(f"apply {apply_state} before the ", String)
        + control_requests.c.action
        + literal(" took effect", String)
    )
    return (
        control_requests.update()
        .where(control_requests.c.apply_id == apply_id, control_requests.c.state == "pending")
        .values(state="failed", error=reason, completed_at=clock.now())
    )


def finish_control_request(
    apply_id: int, request_id: int, *, state: str, error: str | None
) -> Update:
    return (
        control_requests.update()
        .where(
            control_requests.c.id == request_id,
            control_requests.c.apply_id == apply_id,
            control_requests.c.state == "pending",
        )
        .values(state=state, error=error, completed_at=clock.now())
    )


# --- submission and reads ------------------------------------------------------------------------


def insert_apply(values: Mapping[str, Any]) -> Insert:
    return insert(applies).values(
        state=ApplyState.QUEUED,
        lease_epoch=0,
        reclaim_count=0,
        created_at=clock.now(),
        updated_at=clock.now(),
        **values,
    )


def insert_apply_tasks(apply_id: int, rows: Iterable[Mapping[str, Any]]) -> Insert:
    return insert(apply_tasks).values(
        [
            {"apply_id": apply_id, "state": "pending", "progress": 0, "lease_epoch": 0, **row}
            for row in rows
        ]
    )


def apply_by_request_id(request_id: str) -> Select[Any]:
    return select(applies.c.id).where(applies.c.request_id == request_id)


def apply_row(apply_id: int) -> Select[Any]:
    return select(
        applies,
        clock.age_of(applies.c.heartbeat_at).label("heartbeat_age"),
    ).where(applies.c.id == apply_id)


def apply_task_rows(apply_id: int) -> Select[Any]:
    return (
        select(apply_tasks)
        .where(apply_tasks.c.apply_id == apply_id)
        .order_by(apply_tasks.c.position)
    )


def log_rows(apply_id: int, *, after_id: int = 0, limit: int = 1000) -> Select[Any]:
    return (
        select(apply_logs)
        .where(apply_logs.c.apply_id == apply_id, apply_logs.c.id > after_id)
        .order_by(apply_logs.c.id)
        .limit(limit)
    )


def lease_table(limit: int) -> Select[Any]:
    return (
        select(
            applies.c.id,
            applies.c.state,
            applies.c.database_name,
            applies.c.environment,
            case((applies.c.state.in_(_WAITING), _ahead_in_line(applies) + 1), else_=None).label(
                "line_position"
            ),
            applies.c.lease_epoch,
            applies.c.lease_owner,
            applies.c.lease_token,
            applies.c.reclaim_count,
            applies.c.requested_by,
            clock.age_of(applies.c.heartbeat_at).label("heartbeat_age"),
        )
        .order_by(applies.c.id.desc())
        .limit(limit)
    )


def active_applies(limit: int) -> Select[Any]:
    """Dispatched and running applies with their heartbeat age (DB clock), stalest first."""
    return (
        select(
            applies.c.id,
            applies.c.state,
            clock.age_of(applies.c.heartbeat_at).label("heartbeat_age"),
        )
        .where(applies.c.state.in_([ApplyState.DISPATCHED, ApplyState.RUNNING]))
        .order_by(applies.c.heartbeat_at)
        .limit(limit)
    )


def db_time() -> Select[Any]:
    return select(clock.now().label("now"))


def comment_row(apply_id: int, kind: str) -> Select[Any]:
    return select(apply_comments).where(
        apply_comments.c.apply_id == apply_id, apply_comments.c.kind == kind
    )


def check_row(apply_id: int) -> Select[Any]:
    return select(checks).where(checks.c.apply_id == apply_id)


# --- apply task lifecycle (owned, run inside a fence) ---------------------------------------------


def start_task(apply_id: int, task_id: int, *, epoch: int) -> Update:
    """Mark an apply task running; the first start time is kept across resumes."""
    return (
        apply_tasks.update()
        .where(apply_tasks.c.id == task_id, apply_tasks.c.apply_id == apply_id)
        .values(
            state="running",
            lease_epoch=epoch,
            started_at=func.coalesce(apply_tasks.c.started_at, clock.now()),
            error=None,
        )
    )


def finish_task(
    apply_id: int, task_id: int, *, epoch: int, state: str, error: str | None
) -> Update:
    values: dict[str, Any] = {
        "state": state,
        "lease_epoch": epoch,
        "error": error,
        "finished_at": clock.now(),
    }
    if state == "completed":
        values["progress"] = 100
    return (
        apply_tasks.update()
        .where(apply_tasks.c.id == task_id, apply_tasks.c.apply_id == apply_id)
        .values(**values)
    )


def cancel_unfinished_tasks(apply_id: int, *, epoch: int) -> Update:
    return (
        apply_tasks.update()
        .where(apply_tasks.c.apply_id == apply_id, apply_tasks.c.state.in_(["pending", "running"]))
        .values(state="cancelled", lease_epoch=epoch, finished_at=clock.now())
    )


# --- control requests ----------------------------------------------------------------------------


def insert_control_request(apply_id: int, *, action: str, requested_by: str | None) -> Insert:
    return insert(control_requests).values(
        apply_id=apply_id,
        action=action,
        state="pending",
        requested_by=requested_by,
        created_at=clock.now(),
    )


def pending_control_requests(apply_id: int) -> Select[Any]:
    return (
        select(
            control_requests.c.id,
            control_requests.c.action,
            control_requests.c.requested_by,
            clock.age_of(control_requests.c.created_at).label("age"),
        )
        .where(control_requests.c.apply_id == apply_id, control_requests.c.state == "pending")
        .order_by(control_requests.c.id)
    )


def pending_control_requests_of(apply_ids: Iterable[int]) -> Select[Any]:
    """The pending control requests of many applies (a worker's batched heartbeat polls them)."""
    return (
        select(control_requests.c.id, control_requests.c.apply_id, control_requests.c.action)
        .where(
            control_requests.c.apply_id.in_(sorted(apply_ids)),
            control_requests.c.state == "pending",
        )
        .order_by(control_requests.c.id)
    )


def control_requests_of_apply(apply_id: int) -> Select[Any]:
    """Every control request of one apply, oldest first (a range of the unique index that leads
    with ``apply_id``)."""
    return (
        select(
            control_requests.c.id,
            control_requests.c.action,
            control_requests.c.state,
            control_requests.c.requested_by,
            control_requests.c.error,
        )
        .where(control_requests.c.apply_id == apply_id)
        .order_by(control_requests.c.id)
    )


def control_request_row(request_id: int) -> Select[Any]:
    return select(control_requests).where(control_requests.c.id == request_id)


def rotation_event(apply_id: int, epoch: int) -> Select[Any]:
    return (
        select(apply_logs.c.event)
        .where(apply_logs.c.apply_id == apply_id, apply_logs.c.lease_epoch == epoch)
        .order_by(apply_logs.c.id)
        .limit(1)
    )


# --- retry: a failed apply back into its line (no lease: the apply row is locked) -----------------


def apply_failure(apply_id: int) -> Select[Any]:
    """The error a failed apply ended with (kept in its log when a retry clears it)."""
    return select(applies.c.error).where(applies.c.id == apply_id)


def reopen_apply(apply_id: int, *, epoch: int) -> Update:
    """A retried apply, just rotated out of ``failed`` to ``epoch``, is unfinished again: its error
    and end time are cleared. Zero rows: it is not the waiting apply of that epoch."""
    return _by_primary_key(
        applies.update()
        .where(
            applies.c.id == apply_id,
            applies.c.lease_epoch == epoch,
            applies.c.state.in_(_WAITING),
        )
        .values(error=None, finished_at=None, updated_at=clock.now())
    )


def reopen_tasks(apply_id: int, *, epoch: int) -> Update:
    """A retried apply's unfinished apply tasks (the failed one, those cancelled because it
    failed, any left running or pending by an abandoned holder) go back to pending, stamped with
    the retry's epoch. Completed ones are not touched; checkpoints and progress are kept, so that
    an engine may continue from them."""
    return (
        apply_tasks.update()
        .where(apply_tasks.c.apply_id == apply_id, apply_tasks.c.state != "completed")
        .values(state="pending", error=None, finished_at=None, lease_epoch=epoch)
    )


# --- lines: one apply per (database, environment) at a time ---------------------------------------


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
        select(
            applies.c.id,
            applies.c.state,
            applies.c.lease_epoch,
            applies.c.lease_token,
            applies.c.lease_owner,
        )
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


# --- notifications: completion for callers --------------------------------------------------------


def insert_notification(apply_id: int, *, task: str, queue: str) -> Insert:
    return insert(notifications).values(apply_id=apply_id, task=task, queue=queue, attempts=0)


def notification_due(apply_id: int) -> Update:
    """The apply ended: its notification is owed. Run by every rotation to a terminal state.

    The first end finds claimed_at and sent_at NULL. An end after a retry (which withdrew the
    notification: ``withdraw_notification``) owes a new one: a send of the earlier end that was
    still in flight at the retry may have recorded itself sent since, so both are cleared here."""
    return (
        notifications.update()
        .where(notifications.c.apply_id == apply_id, notifications.c.due_at.is_(None))
        .values(due_at=clock.now(), claimed_at=None, sent_at=None)
    )


def withdraw_notification(apply_id: int) -> Update:
    """A failed apply is retried: the notification of its failure is no longer owed (one not yet
    sent never is: the caller hears the retried apply's end instead), and the next rotation to a
    terminal state makes a new one due (``notification_due`` matches only while due_at is NULL).
    Zero rows: the submit asked for no notification."""
    return notifications.update().where(notifications.c.apply_id == apply_id).values(due_at=None)


def _claimable(expiry: float) -> ColumnElement[bool]:
    return (
        notifications.c.due_at.is_not(None)
        & notifications.c.sent_at.is_(None)
        & (
            notifications.c.claimed_at.is_(None)
            | (notifications.c.claimed_at < clock.now_minus(bindparam("expiry", expiry)))
        )
    )


def owed_notifications(*, expiry: float, limit: int) -> Select[Any]:
    """Notifications owed and free to claim (never claimed, or claimed over ``expiry`` ago)."""
    return (
        select(notifications.c.apply_id)
        .where(_claimable(expiry))
        .order_by(notifications.c.due_at)
        .limit(limit)
    )


def claim_notification(apply_id: int, *, expiry: float) -> Update:
    """Take an owed notification to send it; zero rows: sent, not due, or another sender's."""
    return (
        notifications.update()
        .where(notifications.c.apply_id == apply_id, _claimable(expiry))
        .values(claimed_at=clock.now(), attempts=notifications.c.attempts + 1)
    )


def notification_sent(apply_id: int) -> Update:
    return (
        notifications.update()
        .where(notifications.c.apply_id == apply_id, notifications.c.sent_at.is_(None))
        .values(sent_at=clock.now())
    )


def release_notification(apply_id: int) -> Update:
    """A send failed: free the claim at once, so that the next reclaim pass tries again."""
    return (
        notifications.update()
        .where(notifications.c.apply_id == apply_id, notifications.c.sent_at.is_(None))
        .values(claimed_at=None)
    )


def notification_message(apply_id: int) -> Select[Any]:
    """What a notification carries: where it goes, and the apply's final state."""
    return (
        select(
            notifications.c.task,
            notifications.c.queue,
            notifications.c.sent_at,
            applies.c.state,
            applies.c.error,
        )
        .join(applies, applies.c.id == notifications.c.apply_id)
        .where(notifications.c.apply_id == apply_id)
    )


# --- publications: what a pull request is still owed ----------------------------------------------

_PUBLISHED_STATES = [ApplyState.STOPPED, *sorted(TERMINAL_APPLY_STATES)]


def publication_due(apply_id: int) -> Upsert:
    """The apply stopped or ended: its pull request is owed that state. Run by those rotations,
    in their transaction; an apply without a pull request owes nothing (the insert selects no
    row)."""
    owed = {"due_at": clock.now(), "claimed_at": None, "attempts": 0, "last_error": None}
    has_pull_request = (
        applies.c.repository.is_not(None)
        & applies.c.pull_request.is_not(None)
        & applies.c.head_sha.is_not(None)
    )
    source = select(applies.c.id, clock.now(), literal(None), literal(0), literal(None)).where(
        applies.c.id == apply_id, has_pull_request
    )
    return Upsert(
        update=publications.update().where(publications.c.apply_id == apply_id).values(**owed),
        insert=insert(publications).from_select(
            ["apply_id", "due_at", "claimed_at", "attempts", "last_error"], source
        ),
    )


def _publication_free(expiry: float) -> ColumnElement[bool]:
    """Due now, and nobody at work on it (never claimed, or the claim is ``expiry`` old)."""
    return (publications.c.due_at <= clock.now()) & (
        publications.c.claimed_at.is_(None)
        | (publications.c.claimed_at < clock.now_minus(bindparam("expiry", expiry)))
    )


def owed_publications(*, expiry: float, limit: int) -> Select[Any]:
    """Publications due now and free to claim, of applies still stopped or ended, oldest first.
    (One owed by an apply that was resumed since is left alone: its holder publishes.)"""
    return (
        select(publications.c.apply_id)
        .join(applies, applies.c.id == publications.c.apply_id)
        .where(_publication_free(expiry), applies.c.state.in_(_PUBLISHED_STATES))
        .order_by(publications.c.due_at)
        .limit(limit)
    )


def claim_publication(apply_id: int, *, expiry: float) -> Update:
    """Take an owed publication; zero rows: settled, not due yet, another publisher's, or its
    apply is running again."""
    still_published = (
        select(applies.c.id)
        .where(applies.c.id == apply_id, applies.c.state.in_(_PUBLISHED_STATES))
        .exists()
    )
    return (
        publications.update()
        .where(publications.c.apply_id == apply_id, _publication_free(expiry), still_published)
        .values(claimed_at=clock.now(), attempts=publications.c.attempts + 1)
    )


def publication_lease(apply_id: int) -> Select[Any]:
    """The lease a claimed publication is made under: the apply's current one."""
    return (
        select(
            applies.c.lease_epoch, applies.c.lease_token, applies.c.state, publications.c.attempts
        )
        .join(publications, publications.c.apply_id == applies.c.id)
        .where(applies.c.id == apply_id)
    )


def release_publication(apply_id: int, *, delay: float, error: str | None) -> Update:
    """An attempt failed: free the claim, and let the next one start ``delay`` seconds on."""
    return (
        publications.update()
        .where(publications.c.apply_id == apply_id, publications.c.due_at.is_not(None))
        .values(
            claimed_at=None,
            due_at=clock.now_plus(bindparam("delay", delay)),
            last_error=error,
        )
    )


def publication_settled(apply_id: int) -> Update:
    """Published (in the effect fence that recorded it): nothing more is owed."""
    return (
        publications.update()
        .where(publications.c.apply_id == apply_id)
        .values(due_at=None, claimed_at=None, last_error=None, published_at=clock.now())
    )


def abandon_publication(apply_id: int, *, error: str) -> Update:
    """GitHub refused it for good (a 4xx): owed no more, the reason kept."""
    return (
        publications.update()
        .where(publications.c.apply_id == apply_id)
        .values(due_at=None, claimed_at=None, last_error=error)
    )


def publication_row(apply_id: int) -> Select[Any]:
    return select(publications, clock.age_of(publications.c.due_at).label("overdue")).where(
        publications.c.apply_id == apply_id
    )


def _owed_by_stopped_or_ended() -> ColumnElement[bool]:
    """Owed, by an apply still stopped or ended (one running again is its holder's to publish)."""
    return publications.c.due_at.is_not(None) & applies.c.state.in_(_PUBLISHED_STATES)


def owed_publication_count() -> Select[Any]:
    return (
        select(func.count())
        .select_from(publications.join(applies, applies.c.id == publications.c.apply_id))
        .where(_owed_by_stopped_or_ended())
    )


def oldest_owed_publication() -> Select[Any]:
    return (
        select(func.min(publications.c.due_at))
        .select_from(publications.join(applies, applies.c.id == publications.c.apply_id))
        .where(_owed_by_stopped_or_ended())
    )


# --- marks: when each background duty last ran ----------------------------------------------------


def touch_mark(name: str, *, detail: str | None) -> Update:
    return marks.update().where(marks.c.name == name).values(at=clock.now(), detail=detail)


def mark_row(name: str) -> Select[Any]:
    return select(marks.c.at, marks.c.detail, clock.age_of(marks.c.at).label("age")).where(
        marks.c.name == name
    )


# --- audit: read-only selects of `leasehold audit` (storage/audit.py) -----------------------------

# The log events that record an apply task completed (the runner's ``_complete_task``).
AUDIT_COMPLETION_EVENTS = ("task_completed", "task_skipped")


def audit_applies(*, after_id: int, limit: int) -> Select[Any]:
    """The next batch of applies in id order (keyset: no offset to skip over)."""
    return (
        select(applies.c.id, applies.c.state, applies.c.lease_epoch, applies.c.error)
        .where(applies.c.id > after_id)
        .order_by(applies.c.id)
        .limit(limit)
    )


def audit_one_apply(apply_id: int) -> Select[Any]:
    return select(applies.c.id, applies.c.state, applies.c.lease_epoch, applies.c.error).where(
        applies.c.id == apply_id
    )


def audit_logs(first_id: int, last_id: int) -> Select[Any]:
    """The log of a batch's applies in (apply, id) order: a range of ix_apply_logs_apply_id_id.
    Only completion lines need their message (it names the task): the others' are not read."""
    return (
        select(
            apply_logs.c.apply_id,
            apply_logs.c.id,
            apply_logs.c.lease_epoch,
            apply_logs.c.event,
            case(
                (apply_logs.c.event.in_(AUDIT_COMPLETION_EVENTS), apply_logs.c.message),
                else_=None,
            ).label("message"),
        )
        .where(apply_logs.c.apply_id.between(first_id, last_id))
        .order_by(apply_logs.c.apply_id, apply_logs.c.id)
    )


def audit_tasks(first_id: int, last_id: int) -> Select[Any]:
    return (
        select(
            apply_tasks.c.apply_id,
            apply_tasks.c.position,
            apply_tasks.c.table_name,
            apply_tasks.c.state,
            apply_tasks.c.lease_epoch,
        )
        .where(apply_tasks.c.apply_id.between(first_id, last_id))
        .order_by(apply_tasks.c.apply_id, apply_tasks.c.position)
    )


def audit_comments(first_id: int, last_id: int) -> Select[Any]:
    return select(
        apply_comments.c.apply_id, apply_comments.c.kind, apply_comments.c.last_epoch
    ).where(apply_comments.c.apply_id.between(first_id, last_id))


def audit_checks(first_id: int, last_id: int) -> Select[Any]:
    return select(
        checks.c.apply_id, checks.c.status, checks.c.conclusion, checks.c.last_epoch
    ).where(checks.c.apply_id.between(first_id, last_id))


def audit_anonymous_control_requests(first_id: int, last_id: int) -> Select[Any]:
    """The control requests of a batch's applies that record no requester (NULL, empty or only
    spaces): a range of the unique index that leads with ``apply_id``."""
    requester = func.trim(func.coalesce(control_requests.c.requested_by, ""))
    return (
        select(control_requests.c.apply_id, control_requests.c.id, control_requests.c.action)
        .where(control_requests.c.apply_id.between(first_id, last_id), requester == "")
        .order_by(control_requests.c.apply_id, control_requests.c.id)
    )
