"""Helpers shared by the tests. Test-only SQL lives here, so that the suite can stage states
(old heartbeats, snapshots) that production code never needs to."""

from __future__ import annotations

import fcntl
import itertools
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, select, update

from leases import Lease, ReclaimPolicy, dispatch, fence, mint_token, redeem
from storage import applies as applies_repo
from storage import clock, fenced
from storage.database import Database
from storage.fenced import Fenced
from storage.states import ApplyState
from storage.tables import metadata
from tasks.settings import Settings

# Children first, so that foreign keys never block a wipe.
TABLES = [
    "publications",
    "notifications",
    "control_requests",
    "checks",
    "apply_comments",
    "apply_logs",
    "apply_tasks",
    "applies",
    "apply_lines",
]


REPO = Path(__file__).resolve().parent.parent
# The console script beside this interpreter (a venv's), else the module.
_SCRIPT = Path(sys.executable).parent / "leasehold"
LEASEHOLD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tasks.cli"]


def flock_within(lock: IO[str], seconds: float) -> bool:
    """Take an exclusive ``flock`` on the open file ``lock``, waiting at most ``seconds`` (the
    holder is another test run on this machine, which may be slow but never a deadlock)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)  # paces the poll only: flock itself decides


def environment(folder: Path, **variables: str) -> dict[str, str]:
    """A subprocess's environment as an operator's would be: none of the caller's LEASEHOLD_* or
    CELERY_* settings, leasehold importable from this checkout, its var folder in ``folder``,
    then ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASEHOLD_", "CELERY"))}
    env["PYTHONPATH"] = str(REPO)
    env["LEASEHOLD_VAR_DIR"] = str(folder / "var")
    env.update(variables)
    return env


def wipe(db: Database) -> None:
    with db.transaction() as conn:
        for name in TABLES:
            conn.execute(metadata.tables[name].delete())


def new_database() -> str:
    """A database name no other apply of this test run uses: each helper-made apply has a line
    (database, environment) of its own unless a test names one to share."""
    return f"shop{next(_DATABASES)}"


_DATABASES = itertools.count(1)


def new_apply(
    db: Database, *, tasks: int = 2, request_id: str | None = None, database: str | None = None
) -> int:
    created = applies_repo.create(
        db,
        applies_repo.NewApply(
            database_name=database or new_database(),
            environment="staging",
            engine="sleep",
            request_id=request_id,
            tasks=[
                applies_repo.NewTask(f"t{i}", f"ALTER TABLE t{i} ADD c INT", {"seconds": 0.1})
                for i in range(tasks)
            ],
        ),
    )
    return created.apply_id


def settings(database_url: str, **overrides: Any) -> Settings:
    """leasehold's settings at celeryconfig's defaults (the one place that gives them, under
    this process's environment), with ``overrides``."""
    import celeryconfig

    return replace(Settings.from_conf(celeryconfig), database_url=database_url, **overrides)


def reclaim_policy(**overrides: Any) -> ReclaimPolicy:
    """The reclaim policy of the default settings, with ``overrides``."""
    return replace(settings("sqlite://").reclaim_policy, **overrides)


def hand_back(db: Database, lease: Lease, *, reason: str) -> Lease:
    """The running owner of ``lease`` hands its apply back (what a warm shutdown does), through
    the one way a held lease ends: its fence's last write. Returns the new, dispatched lease."""
    token = mint_token()
    with fence(db, lease) as fx:
        epoch = fenced.end_lease(
            fx, new_token=token, to_state=ApplyState.DISPATCHED, event="handed_back", reason=reason
        )
    return Lease(lease.apply_id, epoch, token)


def release(
    db: Database,
    lease: Lease,
    *,
    to_state: ApplyState = ApplyState.STOPPED,
    event: str = "released",
    reason: str,
    error: str | None = None,
) -> int:
    """The running owner of ``lease`` gives the apply up: stopped (``end_lease``) or ended
    (``finish``, which passes its line's turn on). Returns the new epoch."""
    if not ApplyState(to_state).terminal:
        with fence(db, lease) as fx:
            return fenced.end_lease(
                fx, new_token=mint_token(), to_state=to_state, event=event, reason=reason
            )
    with fence(db, lease, finishing=True) as fx:
        done = fenced.finish(
            fx,
            new_token=mint_token(),
            successor_token=mint_token(),
            to_state=to_state,
            event=event,
            reason=reason,
            error=error,
        )
    return done.epoch


def fence_connection(fx: Fenced) -> Connection:
    """The connection of an open fence, which its handle does not expose: for lock proofs and for
    planting writes the product cannot make."""
    return fx._connection()


def running_lease(db: Database, *, tasks: int = 2, owner: str = "worker-1") -> Lease:
    """An apply dispatched and redeemed: the lease of a running worker."""
    lease = dispatch(db, new_apply(db, tasks=tasks))
    redeem(db, lease, owner)
    return lease


def age_heartbeat(db: Database, apply_id: int, seconds: float) -> None:
    """Move heartbeat_at ``seconds`` into the past by the database clock (no sleeping)."""
    applies = metadata.tables["applies"]
    with db.transaction() as conn:
        conn.execute(
            update(applies)
            .where(applies.c.id == apply_id)
            .values(heartbeat_at=clock.now_minus(float(seconds)))
        )


def age_mark(db: Database, name: str, seconds: float | None) -> None:
    """Move a mark ``seconds`` into the past by the database clock; None: it never ran."""
    marks = metadata.tables["marks"]
    value: Any = None if seconds is None else clock.now_minus(float(seconds))
    with db.transaction() as conn:
        conn.execute(update(marks).where(marks.c.name == name).values(at=value))


def set_state(db: Database, apply_id: int, state: str) -> None:
    """Write an apply's state directly, as an older leasehold (or a corrupt row) would leave it."""
    applies = metadata.tables["applies"]
    with db.transaction() as conn:
        conn.execute(update(applies).where(applies.c.id == apply_id).values(state=state))


def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every leasehold table, for 'nothing changed' assertions."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with db.transaction() as conn:
        for name in TABLES:
            table = metadata.tables[name]
            order = list(table.primary_key.columns)
            out[name] = [tuple(r) for r in conn.execute(select(table).order_by(*order))]
    return out


def task_ids(db: Database, apply_id: int) -> list[int]:
    return [int(r["id"]) for r in applies_repo.tasks(db, apply_id)]


# --- added for the contract suite ---------------------------------------------------------------


def insert_control_request(
    db: Database, apply_id: int, *, action: str = "stop", state: str = "pending"
) -> int:
    """A control request row, written directly (recording requests belongs to a later issue)."""
    control_requests = metadata.tables["control_requests"]
    now = clock.now()
    with db.transaction() as conn:
        result = conn.execute(
            control_requests.insert().values(
                apply_id=apply_id,
                action=action,
                state=state,
                requested_by="tests",
                created_at=now,
            )
        )
        (request_id,) = result.inserted_primary_key or (None,)
    assert request_id is not None
    return int(request_id)


def lease_of(db: Database, apply_id: int) -> tuple[str, int, str | None, str | None]:
    """(state, epoch, token, owner) of an apply as stored."""
    row = applies_repo.get(db, apply_id)
    return row["state"], row["lease_epoch"], row["lease_token"], row["lease_owner"]


def log_events(db: Database, apply_id: int) -> list[tuple[int, str]]:
    """(lease_epoch, event) of every log line of an apply, in id order."""
    return [(int(r["lease_epoch"]), str(r["event"])) for r in applies_repo.logs(db, apply_id)]


def closed_url() -> str:
    """An http:// URL where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def make_due(db: Database, *apply_ids: int) -> None:
    """Make the owed publications of ``apply_ids`` due now and unclaimed (as time passing
    would), without sleeping through their backoff."""
    table = metadata.tables["publications"]
    value = clock.now_minus(1.0)
    with db.transaction() as conn:
        conn.execute(
            update(table)
            .where(table.c.apply_id.in_(apply_ids), table.c.due_at.is_not(None))
            .values(due_at=value, claimed_at=None)
        )
