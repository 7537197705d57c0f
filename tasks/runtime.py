"""Per-process resources of a worker (or of the CLI): settings, the database, the runs in flight.

The database is opened lazily and again in every forked child, so that no two processes ever
share a pooled connection.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import beat_init, worker_init, worker_process_init, worker_shutting_down

from storage import migrate
from storage.database import Database, open_database
from storage.errors import SchemaError, StorageUnavailable
from tasks.app import app
from tasks.heartbeat import Heartbeats
from tasks.interrupts import Interrupts, Reason
from tasks.settings import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_db: Database | None = None
_runs_db: Database | None = None
# How long a run's transaction waits for one of the apply slots' connections before it fails
# (StorageBusy, retried): each is held for one short transaction, never across a DDL.
RUNS_POOL_TIMEOUT = 30.0
_settings: Settings | None = None
_runs: dict[str, Interrupts] = {}
_heartbeats: Heartbeats | None = None
_shutting_down = False  # set on a warm shutdown: this process takes on no apply any more


def settings() -> Settings:
    global _settings
    with _lock:
        if _settings is None:
            _settings = Settings.from_conf(app.conf)
        return _settings


def database() -> Database:
    """The store of everything but the runs and the heartbeat: the control plane, reclaim,
    dispatches owed, the CLI. Its connections never wait behind the apply slots'
    (:func:`runs_database`), so that a stop or a reclaim pass goes through on a fleet whose slots
    are all busy."""
    global _db
    current = settings()
    with _lock:
        if _db is None:
            _db = _open(current, pool_size=current.control_connections)
        return _db


def runs_database() -> Database:
    """The store of the apply slots: ``LEASEHOLD_DATABASE_CONNECTIONS`` connections, no more;
    a run's fenced write waits for a free one (``RUNS_POOL_TIMEOUT``, then ``StorageBusy``,
    retried by the runner). A waiting run holds no lock, and a process never runs more
    transactions at once than its store connections, whatever its number of slots."""
    global _runs_db
    current = settings()
    with _lock:
        if _runs_db is None:
            _runs_db = _open(
                current,
                max_connections=current.database_connections,
                pool_timeout=RUNS_POOL_TIMEOUT,
            )
        return _runs_db


def _open(current: Settings, **pool: Any) -> Database:
    """One of the process's pools: every session ended by the server when it idles in a
    transaction for ``stale_after`` (``open_database`` says why)."""
    return open_database(current.database_url, idle_transaction_timeout=current.stale_after, **pool)


def heartbeats() -> Heartbeats:
    """This process's heartbeat: one thread renews every lease its apply slots hold, on a store
    connection of its own, so that no run, control task or dispatch ever makes it wait."""
    global _heartbeats
    current = settings()
    with _lock:
        if _heartbeats is None:
            _heartbeats = Heartbeats(
                _open(current, max_connections=1),
                interval=current.heartbeat_interval,
                stale_after=current.stale_after,
            )
            _heartbeats.start()
        return _heartbeats


def reset() -> None:
    """Forget the cached settings and database (after ``app.conf`` changed, e.g. in tests)."""
    global _db, _runs_db, _settings, _shutting_down, _heartbeats
    with _lock:
        if _heartbeats is not None:
            _heartbeats.stop()
            _heartbeats.db.dispose()
        for db in (_db, _runs_db):
            if db is not None:
                db.dispose()
        _db, _runs_db, _settings, _shutting_down, _heartbeats = None, None, None, False, None


def shutting_down() -> bool:
    """True once this worker began a warm shutdown."""
    return _shutting_down


def register_run(task_id: str, interrupts: Interrupts) -> None:
    with _lock:
        _runs[task_id] = interrupts
        late = _shutting_down
    if late:  # redeemed after the warm shutdown's hand_back_all: hand it back at once too
        interrupts.interrupt(Reason.HANDOVER)


def unregister_run(task_id: str) -> None:
    with _lock:
        _runs.pop(task_id, None)


def hand_back_all() -> int:
    """Ask every apply running in this process to stop at a safe point and hand itself back.
    Returns how many still run: a run already ending its apply (stopped, handed back, ended),
    which only has its cleanup left, is asked too but not counted, so that the log line says
    what a shutdown actually hands back."""
    with _lock:
        runs = list(_runs.values())
    for interrupts in runs:
        interrupts.interrupt(Reason.HANDOVER)
    return sum(not interrupts.ending for interrupts in runs)


def _reset_after_fork(**_: Any) -> None:
    global _db, _runs_db, _heartbeats
    with _lock:
        beats = None if _heartbeats is None else _heartbeats.db
        for db in (_db, _runs_db, beats):
            if db is not None:
                db.engine.dispose(close=False)  # the parent's connections stay the parent's
        _db, _runs_db = None, None
        _heartbeats = None  # its threads were the parent's: a child starts its own


def _on_warm_shutdown(sig: str = "", how: str = "", exitcode: int = 0, **_: Any) -> None:
    # Celery waits for running tasks on a warm shutdown; ours then stop at a safe point and hand
    # their applies back, so another worker resumes them at once instead of after stale_after.
    # Until its consumer stops, a worker shutting down can still receive messages, even the one
    # it just handed back: run_apply passes those on unredeemed (see ``shutting_down``).
    global _shutting_down
    if how == "Warm":
        with _lock:
            _shutting_down = True
        count = hand_back_all()
        if count:
            log.warning("warm shutdown (%s): handing back %d running applies", sig, count)


def _require_migrated_store(**_: Any) -> None:
    """A worker or beat refuses to start on a store at another revision, with one line that says
    what to do (Celery logs and swallows a handler's Exception, not SystemExit). A store that does
    not answer only warns: a database blip must not crash-loop a fleet, and tasks retry."""
    try:
        migrate.require_head(database())
    except StorageUnavailable as exc:
        log.warning("could not check the store's revision, starting anyway: %s", exc)
    except SchemaError as exc:
        raise SystemExit(f"leasehold: {exc}") from None


worker_init.connect(_require_migrated_store, weak=False)
beat_init.connect(_require_migrated_store, weak=False)
worker_process_init.connect(_reset_after_fork, weak=False)
worker_shutting_down.connect(_on_warm_shutdown, weak=False)
