"""The machinery of the end-to-end suite: stacks, real Celery processes, DB observation.

The test process never imports ``tasks.app``: the worker and beat processes read their whole
configuration from ``LEASEHOLD_*`` variables, and the test talks to them like another app would,
through a client Celery app built from the same ``celeryconfig.py`` under the same environment,
or through the ``leasehold`` CLI in a subprocess. Everything is observed through the database,
polling with deadlines.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery
from celery.events.state import State
from sqlalchemy import RowMapping, select

from leases import Lease, mint_token
from storage import applies, open_database
from storage.database import Database
from storage.errors import StorageError
from storage.migrate import upgrade
from storage.tables import metadata
from tasks.testing.processes import CeleryProcess, beat, worker
from tests.celery_fixtures import celeryconfig_settings
from tests.support import new_database

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]

# Short intervals keep the suite fast; the relations celeryconfig enforces still hold.
HEARTBEAT_INTERVAL = 0.5
STALE_AFTER = 3.0
RECLAIM_INTERVAL = 0.5
DISPATCH_TIMEOUT = 3.0
EFFECT_TIMEOUT = 1.0
EFFECT_GRACE = 1.5
TIMING_ENV = {
    "LEASEHOLD_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL),
    "LEASEHOLD_STALE_AFTER": str(STALE_AFTER),
    "LEASEHOLD_RECLAIM_INTERVAL": str(RECLAIM_INTERVAL),
    "LEASEHOLD_DISPATCH_TIMEOUT": str(DISPATCH_TIMEOUT),
    "LEASEHOLD_EFFECT_TIMEOUT": str(EFFECT_TIMEOUT),
    "LEASEHOLD_EFFECT_GRACE": str(EFFECT_GRACE),
    "LEASEHOLD_MAX_RECLAIMS": "5",
    # Progress checkpoints as often as before the setting existed: tests wait for progress.
    "LEASEHOLD_CHECKPOINT_INTERVAL": "1",
}
# How long a process start, a message delivery (the filesystem transport polls once a second)
# and a short apply may take on a slow CI machine before a wait gives up.
PROCESS_START_TIMEOUT = 45.0
RESULT_TIMEOUT = 30.0
SLACK = 3.0
LOG_TAIL_LINES = 150


# --- stacks --------------------------------------------------------------------------------------


@dataclass
class Stack:
    """One deployment: the database, broker and result backend every process of a test uses."""

    name: str
    folder: Path
    database_url: str
    env: dict[str, str]
    db: Database
    client: Any  # celery.Celery; the test process's own app, configured like the workers
    redis: bool

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``leasehold ARGS`` in a subprocess, configured like the workers."""
        done = subprocess.run(
            [sys.executable, "-m", "tasks.cli", *args],
            env=self.env,
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=RESULT_TIMEOUT,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"leasehold {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done


def process_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of every process: ours minus any LEASEHOLD_*/CELERY_* settings of the
    caller's shell, plus the stack's settings, with the repository root importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASEHOLD_", "CELERY_"))}
    env.update(TIMING_ENV)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def client_app(env: Mapping[str, str]) -> Any:
    """A Celery app for the test process, built from ``celeryconfig.py`` evaluated under the
    processes' environment, so that broker, transport options, queue, serializers and result
    backend are exactly the workers' (without importing ``tasks.app`` here)."""
    settings = celeryconfig_settings(env)
    app = Celery("leasehold-e2e-client", set_as_current=False)
    app.conf.update(settings)
    return app


def close_client(app: Any) -> None:
    """Close a client app. A Redis result backend keeps a connection pool and a pub/sub
    connection of its own; the broker connections live in kombu's process-wide pools, shared by
    every app with the same broker URL, and stay there for the next one."""
    backend = app.backend
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:
        consumer.stop()
    pool = getattr(getattr(backend, "client", None), "connection_pool", None)
    if pool is not None:
        pool.disconnect()
    app.close()


@contextmanager
def sqlite_stack(
    name: str, place: Path, urls: Mapping[str, str], *, redis: bool
) -> Iterator[Stack]:
    """A deployment of its own in ``place``: a SQLite store (migrated) and the broker and result
    backend ``urls`` give (``LEASEHOLD_BROKER_URL``, ``LEASEHOLD_RESULT_BACKEND``; the embedded
    defaults under ``place/var`` otherwise), for a module whose broker is a server of its own."""
    database_url = f"sqlite:///{place / 'leasehold.sqlite3'}"
    env = process_env(
        {"LEASEHOLD_DATABASE_URL": database_url, "LEASEHOLD_VAR_DIR": str(place / "var"), **urls}
    )
    db = open_database(database_url)
    upgrade(db)
    client = client_app(env)
    try:
        yield Stack(name, place, database_url, env, db, client, redis=redis)
    finally:
        # kombu's process-wide pools keep broker connections by URL; a module's own broker goes
        # away with the module, so its connections must not be left for the collector.
        client.amqp.producer_pool.force_close_all()
        client.pool.force_close_all()
        close_client(client)
        db.dispose()


def doctor_topics(stack: Stack, timeout: float) -> dict[str, str]:
    """``leasehold doctor``'s lines by topic, each as ``<verdict> <topic> <text>`` (lower case,
    spaces collapsed)."""
    done = stack.cli("doctor", "--timeout", f"{timeout:g}", check=False)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [" ".join(line.split()).lower() for line in done.stdout.splitlines() if line.strip()]
    return {line.split()[1]: line for line in lines if len(line.split()) > 2}


# --- processes -----------------------------------------------------------------------------------

# Run in front of a celery command line: ask the kernel to SIGKILL the process when the test
# process dies (PR_SET_PDEATHSIG survives exec), so that a pytest killed before its teardown
# leaves no worker behind to consume the next run's messages.
_DIE_WITH_PARENT = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(f'{sys.argv[2:]}: parent died before exec')\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def die_with_parent(proc: CeleryProcess) -> CeleryProcess:
    """Make ``proc`` die with the test process (Linux; elsewhere unchanged)."""
    if sys.platform.startswith("linux"):
        argv = list(proc.argv)
        assert argv[0] == sys.executable, argv
        proc.argv = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv[1:]]
    return proc


@dataclass
class Cluster:
    """The celery processes of one stack. Module-scoped ones (``shared``) live across the tests
    of a module; the others are stopped at the end of the test that started them."""

    stack: Stack
    shared: list[CeleryProcess] = field(default_factory=list)
    own: list[CeleryProcess] = field(default_factory=list)
    _offsets: dict[str, int] = field(default_factory=dict)
    _serial: int = 0

    def _name(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}{self._serial}"

    def _logfile(self, name: str) -> Path:
        folder = self.stack.folder / "logs"
        folder.mkdir(exist_ok=True)
        return folder / f"{name}.log"

    def workers(
        self,
        count: int,
        *,
        apply_slots: int = 2,
        env: Mapping[str, str] | None = None,
        queues: Sequence[str] | None = None,
    ) -> list[CeleryProcess]:
        """Start ``count`` workers for this test (in parallel) and wait until they are ready;
        ``env`` overrides some of the stack's settings for them."""
        procs = []
        for _ in range(count):
            name = self._name("w")
            procs.append(
                die_with_parent(
                    worker(
                        name,
                        env={**self.stack.env, **(env or {})},
                        cwd=self.stack.folder,
                        logfile=self._logfile(name),
                        apply_slots=apply_slots,
                        queues=queues,
                    )
                )
            )
        self.own.extend(procs)
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_ready(PROCESS_START_TIMEOUT)
        return procs

    def shared_workers(self, count: int) -> list[CeleryProcess]:
        """Module-scoped workers: started on first use, replaced if one died."""
        self.shared = [p for p in self.shared if p.proc is not None and p.proc.poll() is None]
        missing = count - len(self.shared)
        if missing > 0:
            started = self.workers(missing)
            for proc in started:
                self.own.remove(proc)
            self.shared.extend(started)
        return self.shared[:count]

    def beats(
        self, count: int = 1, *, wait: bool = True, env: Mapping[str, str] | None = None
    ) -> list[CeleryProcess]:
        """Start ``count`` beat processes, each with its own schedule file; by default wait until
        each has sent its first reclaim task."""
        procs = []
        for _ in range(count):
            name = self._name("beat")
            procs.append(
                die_with_parent(
                    beat(
                        env={**self.stack.env, **(env or {})},
                        cwd=self.stack.folder,
                        logfile=self._logfile(name),
                        schedule=self.stack.folder / f"{name}-schedule",
                        name=name,
                    )
                )
            )
        self.own.extend(procs)
        for proc in procs:
            proc.start()
        if wait:
            for proc in procs:
                wait_log(proc, "Sending due task reclaim-stale-applies")
        return procs

    def begin_test(self) -> None:
        self._offsets = {p.name: len(p.log()) for p in self.shared}
        self.own = []

    def end_test(self) -> None:
        stop_all(self.own)

    def close(self) -> None:
        stop_all([*self.own, *self.shared])

    def log_sections(self) -> list[tuple[str, str]]:
        """The tail of every process's log written during the current test."""
        out = []
        for proc in [*self.shared, *self.own]:
            text = proc.log()[self._offsets.get(proc.name, 0) :]
            lines = text.splitlines()[-LOG_TAIL_LINES:]
            state = "running" if proc.proc and proc.proc.poll() is None else "exited"
            out.append((f"celery {proc.name} ({state})", "\n".join(lines)))
        return out


def stop_all(procs: Iterable[CeleryProcess], timeout: float = 20.0) -> None:
    """SIGCONT + SIGTERM all at once, then wait; SIGKILL what is still alive after ``timeout``."""
    alive = [p for p in procs if p.proc is not None and p.proc.poll() is None]
    for proc in alive:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in alive:
        assert proc.proc is not None
        try:
            proc.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.proc.wait(10)


def kill_group(proc: CeleryProcess, sig: int = signal.SIGKILL) -> None:
    """Signal the process group of ``proc`` (all its threads and children)."""
    assert proc.proc is not None, f"{proc.name} was never started"
    assert proc.proc.poll() is None, f"{proc.name} is not running"
    os.killpg(proc.pid, sig)


def wait_log(proc: CeleryProcess, text: str, timeout: float = PROCESS_START_TIMEOUT) -> None:
    wait_for(
        f"{text!r} in the log of {proc.name}",
        lambda: text in proc.log(),
        timeout=timeout,
        diagnose=lambda: proc.log()[-3000:],
    )


# --- waiting -------------------------------------------------------------------------------------


def wait_for(
    what: str,
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.05,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{diagnose()}" if diagnose is not None else ""
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


# --- applies -------------------------------------------------------------------------------------


def sleep_payload(
    *seconds: float, request_id: str | None = None, database: str | None = None
) -> dict[str, Any]:
    """A sleep apply's payload, on a line (database) of its own unless ``database`` is given."""
    payload: dict[str, Any] = {
        "database": database or new_database(),
        "environment": "e2e",
        "engine": "sleep",
        "tasks": [
            {
                "table": f"t{i + 1}",
                "ddl": f"ALTER TABLE t{i + 1} ADD COLUMN c INT",
                "options": {"seconds": s},
            }
            for i, s in enumerate(seconds)
        ],
    }
    if request_id is not None:
        payload["request_id"] = request_id
    return payload


def new_apply(db: Database, *seconds: float, database: str | None = None) -> int:
    """Insert a queued sleep apply directly (no message, not dispatched), on a line of its own
    unless ``database`` is given. A running beat's sweep dispatches it (and sends the message)
    if it heads its line: use :func:`dispatched_apply` to hold its lease instead."""
    return applies.create(db, _sleep_apply(seconds, database)).apply_id


def dispatched_apply(db: Database, *seconds: float) -> Lease:
    """Insert a sleep apply on a line of its own and dispatch it in the same transaction, as
    submit does, but send no message: its lease is the test's (nobody else can take it)."""
    token = mint_token()
    created = applies.create(db, _sleep_apply(seconds, None), turn_token=token)
    assert created.promoted is not None
    return Lease(created.apply_id, created.promoted.epoch, token)


def _sleep_apply(seconds: tuple[float, ...], database: str | None) -> applies.NewApply:
    return applies.NewApply(
        database_name=database or new_database(),
        environment="e2e",
        engine="sleep",
        tasks=[
            applies.NewTask(f"t{i + 1}", f"ALTER TABLE t{i + 1} ADD COLUMN c INT", {"seconds": s})
            for i, s in enumerate(seconds)
        ],
    )


def submit_cli(stack: Stack, payload: Mapping[str, Any]) -> int:
    path = stack.folder / f"apply-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(payload))
    out = stack.cli("submit", str(path)).stdout
    return int(json.loads(out.strip().splitlines()[-1])["apply_id"])


def submit_task(stack: Stack, payload: Mapping[str, Any]) -> int:
    """Submit like another app: ``send_task('leasehold.submit_apply', kwargs=payload)``."""
    result = stack.client.send_task("leasehold.submit_apply", kwargs=dict(payload))
    return int(result.get(timeout=RESULT_TIMEOUT)["apply_id"])


@dataclass(frozen=True)
class Log:
    id: int
    epoch: int
    event: str
    message: str
    created_at: datetime


def row(db: Database, apply_id: int) -> RowMapping:
    return applies.get(db, apply_id)


def logs(db: Database, apply_id: int) -> list[Log]:
    return [
        Log(int(r["id"]), int(r["lease_epoch"]), r["event"], r["message"], r["created_at"])
        for r in applies.logs(db, apply_id)
    ]


def events(db: Database, apply_id: int) -> list[tuple[int, str]]:
    return [(entry.epoch, entry.event) for entry in logs(db, apply_id)]


def all_apply_ids(db: Database) -> list[int]:
    table = metadata.tables["applies"]
    with db.transaction() as conn:
        return [int(i) for i in conn.execute(select(table.c.id).order_by(table.c.id)).scalars()]


def control_requests(db: Database, apply_id: int) -> list[RowMapping]:
    table = metadata.tables["control_requests"]
    with db.transaction() as conn:
        query = select(table).where(table.c.apply_id == apply_id).order_by(table.c.id)
        return list(conn.execute(query).mappings())


def describe(db: Database, apply_id: int) -> str:
    """An apply, its tasks and its log, for failure messages."""
    try:
        r = row(db, apply_id)
        lines = [
            f"apply {apply_id}: {r['state']} epoch {r['lease_epoch']} owner {r['lease_owner']} "
            f"heartbeat_age {r['heartbeat_age']} reclaims {r['reclaim_count']} error {r['error']}"
        ]
        for t in applies.tasks(db, apply_id):
            lines.append(
                f"  task {t['position'] + 1}: {t['state']} {t['progress']}% "
                f"checkpoint {t['checkpoint']} epoch {t['lease_epoch']}"
            )
        for entry in logs(db, apply_id):
            lines.append(
                f"  log {entry.id} {entry.created_at} epoch {entry.epoch} {entry.event}: "
                f"{entry.message}"
            )
        return "\n".join(lines)
    except Exception as exc:  # a diagnosis must never hide the failure it explains
        return f"(could not describe apply {apply_id}: {exc!r})"


def wait_state(db: Database, apply_id: int, *states: str, timeout: float) -> RowMapping:
    return wait_for(
        f"apply {apply_id} to be {'/'.join(states)}",
        lambda: r if (r := row(db, apply_id))["state"] in states else None,
        timeout=timeout,
        diagnose=lambda: describe(db, apply_id),
    )


def wait_log_event(
    db: Database, apply_id: int, event: str, *, timeout: float, min_epoch: int = 0
) -> Log:
    def find() -> Log | None:
        for entry in logs(db, apply_id):
            if entry.event == event and entry.epoch >= min_epoch:
                return entry
        return None

    return wait_for(
        f"a {event!r} log of apply {apply_id} at epoch >= {min_epoch}",
        find,
        timeout=timeout,
        diagnose=lambda: describe(db, apply_id),
    )


def wait_progress(
    db: Database, apply_id: int, position: int, percent: int, *, timeout: float
) -> RowMapping:
    """Wait until apply task ``position`` (0-based) is running with progress >= ``percent``."""

    def check() -> RowMapping | None:
        task = applies.tasks(db, apply_id)[position]
        if task["state"] == "running" and int(task["progress"]) >= percent:
            return task
        return None

    return wait_for(
        f"apply {apply_id} task {position + 1} running at >= {percent}%",
        check,
        timeout=timeout,
        diagnose=lambda: describe(db, apply_id),
    )


def owner_task_id(owner: str) -> str:
    """The Celery task id in a lease owner (``hostname/pid/task_id``)."""
    return owner.rsplit("/", 1)[1]


def owner_worker(owner: str, procs: Iterable[CeleryProcess]) -> CeleryProcess:
    """The process among ``procs`` that holds a lease, from its owner string."""
    pid = int(owner.split("/")[1])
    for proc in procs:
        if proc.pid == pid:
            return proc
    raise AssertionError(f"no process of ours holds the lease ({owner})")


def assert_requests_ended(db: Database, apply_id: int) -> None:
    """Every request ends: none is still pending once its apply has finished."""
    if row(db, apply_id)["state"] in ("completed", "failed", "cancelled"):
        pending = [r["id"] for r in control_requests(db, apply_id) if r["state"] == "pending"]
        assert not pending, f"control requests {pending} outlived their apply\n" + describe(
            db, apply_id
        )


def assert_epochs_non_decreasing(db: Database, apply_id: int) -> None:
    entries = logs(db, apply_id)
    for before, after in itertools.pairwise(entries):
        assert after.epoch >= before.epoch, (
            f"apply {apply_id}: log {after.id} ({after.event}) has epoch {after.epoch} after "
            f"log {before.id} ({before.event}) at epoch {before.epoch}\n{describe(db, apply_id)}"
        )


def assert_completed_once(db: Database, apply_id: int) -> None:
    r = row(db, apply_id)
    assert r["state"] == "completed", describe(db, apply_id)
    completions = [e for e in logs(db, apply_id) if e.event == "completed"]
    assert len(completions) == 1, describe(db, apply_id)
    for task in applies.tasks(db, apply_id):
        assert (task["state"], task["progress"]) == ("completed", 100), describe(db, apply_id)
    assert_epochs_non_decreasing(db, apply_id)


_RECLAIMED_FROM = re.compile(r"reclaimed from epoch (\d+)")


def reclaimed_from(db: Database, apply_id: int) -> list[int]:
    """The previous epochs of every reclaim of an apply, in log order."""
    out = []
    for entry in logs(db, apply_id):
        if entry.event == "reclaimed":
            found = _RECLAIMED_FROM.search(entry.message)
            assert found, entry
            out.append(int(found.group(1)))
    return out


def seconds_between(earlier: datetime, later: datetime) -> float:
    """Two DB timestamps (the database's clock) apart."""
    return (later - earlier).total_seconds()


# --- freezing a worker ---------------------------------------------------------------------------


def _sqlite_free(path: str) -> bool:
    """True if no connection holds a lock on the SQLite file at ``path`` now. EXCLUSIVE also
    waits for readers (in rollback-journal mode a frozen reader blocks every writer's commit)."""
    probe = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        probe.execute("BEGIN EXCLUSIVE")
        probe.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        probe.close()


def locks_free(stack: Stack, apply_id: int) -> bool:
    """True if nobody holds the apply's row lock (on SQLite: a lock on the database) now, nor,
    on the embedded default, a lock on the SQLite result backend."""
    if stack.db.is_sqlite:
        paths = [stack.database_url.removeprefix("sqlite:///")]
        backend = str(stack.client.conf.result_backend)
        if backend.startswith("db+sqlite:///"):
            paths.append(backend.removeprefix("db+sqlite:///"))
        return all(_sqlite_free(path) for path in paths)
    table = metadata.tables["applies"]
    try:
        with stack.db.transaction() as conn:
            conn.execute(
                select(table.c.id).where(table.c.id == apply_id).with_for_update(nowait=True)
            )
    except StorageError:
        return False
    return True


def freeze(stack: Stack, proc: CeleryProcess, apply_id: int) -> None:
    """SIGSTOP ``proc``'s process group at a moment when it holds no lock another worker needs.

    A process frozen inside a fenced transaction keeps the apply's row locked (on SQLite, the
    whole database), so reclaim skips it (or waits) for as long as it is frozen; on the embedded
    default one frozen inside a result-backend write (``update_state``, the STARTED state) holds
    the SQLite result database, and every other worker's tasks wait to store their states. Both
    are real liveness limits of stopped processes (the second of the embedded default only), but
    not what the tests are about.
    """

    def stopped_outside_a_transaction() -> bool:
        kill_group(proc, signal.SIGSTOP)
        if locks_free(stack, apply_id):
            return True
        kill_group(proc, signal.SIGCONT)
        return False

    wait_for(f"{proc.name} frozen outside a transaction", stopped_outside_a_transaction, timeout=10)


# --- stalling reclaim passes --------------------------------------------------------------------


@contextmanager
def stale_behind_a_table_lock(stack: Stack, apply_ids: Iterable[int], age: float) -> Iterator[None]:
    """Hold the ``applies`` table (on SQLite: the database write lock) and, inside that lock,
    age the heartbeats of ``apply_ids`` by ``age`` seconds. Every reclaim pass that starts in
    the meantime waits for the lock; on leaving the block they all see the stale applies at once.
    """
    ids = ", ".join(str(int(i)) for i in apply_ids)
    if stack.db.is_sqlite:
        path = stack.database_url.removeprefix("sqlite:///")
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE applies SET heartbeat_at = "
                f"strftime('%Y-%m-%d %H:%M:%f000', 'now', '-{float(age)} seconds') "
                f"WHERE id IN ({ids})"
            )
            yield
            conn.execute("COMMIT")
        finally:
            conn.close()
        return
    raw = stack.db.engine.raw_connection()
    if stack.db.dialect == "postgresql":
        try:
            cursor = raw.cursor()
            # One transaction: the table lock (readers wait too) and the aged heartbeats, which
            # every waiting pass then sees at once when it commits.
            cursor.execute("LOCK TABLE applies IN ACCESS EXCLUSIVE MODE")
            cursor.execute(
                "UPDATE applies SET heartbeat_at = (statement_timestamp() AT TIME ZONE 'UTC') - "
                f"{float(age)} * INTERVAL '1 second' WHERE id IN ({ids})"
            )
            yield
            raw.commit()
        finally:
            raw.close()
        return
    try:
        cursor = raw.cursor()
        cursor.execute("LOCK TABLES applies WRITE")
        try:
            cursor.execute(
                "UPDATE applies SET heartbeat_at = UTC_TIMESTAMP(6) - "
                f"INTERVAL {int(age * 1_000_000)} MICROSECOND WHERE id IN ({ids})"
            )
            raw.commit()
            yield
        finally:
            cursor.execute("UNLOCK TABLES")
            cursor.close()
    finally:
        raw.close()


# --- Flower's view: task events ------------------------------------------------------------------


class EventRecorder:
    """Task events captured from the broker and fed into ``celery.events.state.State``, as
    Flower does; remembers every state each task passed through."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = State()
        self.events: list[dict[str, Any]] = []
        self.states: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._receiver: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="e2e-events", daemon=True)

    def __enter__(self) -> EventRecorder:
        self._thread.start()
        if not self._ready.wait(RESULT_TIMEOUT):
            raise AssertionError(f"the event receiver did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)
        assert not self._thread.is_alive(), "the event receiver did not stop"

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as conn:
                self._receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
                self._receiver.on_consume_ready = lambda *a, **k: self._ready.set()
                self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:  # reported by __enter__ or the test's assertions
            self._error = exc
            self._ready.set()

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)
            self.state.event(event)
            uuid = event.get("uuid")
            if uuid and event["type"].startswith("task-"):
                task = self.state.tasks.get(uuid)
                if task is not None:
                    seen = self.states.setdefault(uuid, [])
                    if not seen or seen[-1] != task.state:
                        seen.append(task.state)

    def task(self, uuid: str) -> Any:
        with self._lock:
            return self.state.tasks.get(uuid)

    def task_events(self, uuid: str, kind: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                e
                for e in self.events
                if e.get("uuid") == uuid and (kind is None or e["type"] == kind)
            ]

    def event_types(self, uuid: str) -> list[str]:
        return [e["type"] for e in self.task_events(uuid)]

    def states_of(self, uuid: str) -> list[str]:
        with self._lock:
            return list(self.states.get(uuid, []))
