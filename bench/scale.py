"""How leasehold's cost grows with the number of concurrent applies: N applies running at once on
real ``celery worker`` and ``celery beat`` processes, for N in ``--applies`` (default 50, 200, 500
and 1,000), on Redis + MariaDB and on Redis + PostgreSQL (``--store mariadb|postgres|both``).

The stack (``tasks.testing.processes``, as ``bench/failover.py`` runs it): a private
``redis-server`` this bench starts on ``--redis-port`` (default 6391, no persistence; stopped by its
pid at the end) as broker and result backend, and per store a scratch database
(``leasehold_bench_<hex>``, migrated, dropped at the end) on a store server of the bench's own
(``--servers private``, the default: a ``mariadbd`` and a PostgreSQL cluster with the shared
servers' InnoDB / ``shared_buffers`` and durability settings but ``--max-connections`` 2500, started
and stopped by pid), or on the shared ones (``--servers shared``: ``--mysql-url``,
``--postgres-url``). Private, because the workers open more sessions than the shared servers'
``max_connections`` (151 and 100) from N=200 on, and because MariaDB's counters are server-wide:
other clients of a shared server would be counted too. Settings as in production but short,
through the same ``LEASEHOLD_*`` variables (printed at the start): heartbeat every 1 s,
``stale_after`` 5 s, a reclaim pass every 1 s. Per N a fresh cluster: one beat and ``--workers``
(default 2) worker processes with ``ceil(N / workers) + 4`` apply slots each, so that every apply
has a slot at once and the processes' threads and memory are those of N, not of a larger N before.
A worker's database pool is what leasehold gives it (``Settings.database_connections``: two per
apply slot plus the control threads, at least 10): pooled connections open only when used at
once, so the peak number of store sessions is measured and printed, not set.

One run of N:

1. submit N ``sleep``-engine applies (``send_task("leasehold.submit_apply")``, as another app
   would), one task of ``--seconds`` (default 90) each, every one on a line of its own (a distinct
   ``database``: applies of one ``(database, environment)`` run one after another);
2. ramp-up: the seconds from the first submit (the database's clock read just before it) until
   the last of the N ``redeemed`` log rows (the database's clock too), once all N are ``running``;
3. the steady state, from ``2 x heartbeat`` after all run, for ``--window`` seconds (default 40;
   shorter if the applies would end sooner): every ``--sample-every`` seconds (0.5) the heartbeat
   age of every running apply, computed by the database (``storage.clock.age_of(heartbeat_at)``,
   the expression ``applies.get`` uses), pooled into p50 / p99 / max; the peak number of store
   sessions of the scratch database; the worker processes' RSS (``VmRSS``) and threads
   (``Threads``) from ``/proc``, summed over every process in the workers' process groups;
4. over the window: the workers' CPU (``utime + stime`` deltas from ``/proc/PID/stat``, as % of one
   core and of all cores), and the store's statements: on MariaDB the ``Questions`` delta of
   ``SHOW GLOBAL STATUS`` minus this bench's own sampling session's (its ``SHOW SESSION STATUS``),
   plus transactions as ``Com_commit + Com_rollback``; on PostgreSQL ``xact_commit +
   xact_rollback`` of the scratch database in ``pg_stat_database`` (read from the maintenance
   database) minus the sampler's own transactions. PostgreSQL counts no statements without
   ``pg_stat_statements``, so its figure is transactions, not statements. MariaDB's counters are
   server-wide: sessions of other databases at the window's end are counted and flagged, since
   other clients of the same server inflate the figure. Both per running apply per second;
5. false reclaims: ``reclaimed`` log rows written during the run (from the first submit to the end
   of the window); each is false here, since no worker is ever stopped. Must be 0, and so must the
   workers' ``lease presumed lost`` log lines (a worker that renewed no heartbeat of a lease for
   ``stale_after`` stops its run: a reclaim follows, maybe after the window), counted over the
   whole run including the cancels;
6. every apply is cancelled (``leasehold.control_apply``, action ``cancel``), the bench waits until
   none is queued, dispatched or running, and stops the cluster; each process's log is searched
   for ``Traceback``, ``ERROR`` and ``WARNING`` lines (counted, the first distinct ones shown).

Before an N of 500 or more the bench waits (up to ``--load-wait``, 20 minutes, polling every 30 s)
until the 1-minute load average is at most ``--max-load`` (1.5), and prints the load it started
at. (Linux counts runnable threads: a run of hundreds of applies raises it for minutes after.)

A PNG (``--plot``, default ``docs/img/scale.png``; matplotlib, Agg backend; skipped with a line
saying so when matplotlib is missing): heartbeat-age p99 against N, and store statements (MariaDB)
or transactions (both) per second per running apply against N, one line per store, with a dashed
line at twice the heartbeat interval.

A store's scale is the largest N with 0 false reclaims, no lease presumed lost, and a
heartbeat-age p99 under twice the heartbeat interval (with all N running through the window).
With both stores, a line ``scale_applies_mariadb=<N> scale_statements_per_apply_s_mariadb=<x>
scale_transactions_per_apply_s_mariadb=<x> scale_applies_postgres=<N>
scale_transactions_per_apply_s_postgres=<x>`` comes first. The last line is ``scale_applies=<N>
scale_statements_per_apply_s=<x>``: MariaDB's (PostgreSQL's, in transactions, when MariaDB is not
measured); ``unavailable`` when no store answers, 0 when no N qualifies. Figures, not assertions.

Run: ``.venv/bin/python bench/scale.py [--applies 50,200,500,1000] [--seconds 90]
[--store both] [--plot docs/img/scale.png]``; a quick run: ``--applies 20 --seconds 30``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, func, select, text
from sqlalchemy.engine import make_url

from storage import clock
from storage.database import open_database
from storage.tables import applies, apply_logs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _common, _stores
from bench.failover import (
    Cluster,
    Stack,
    add_interval_arguments,
    intervals_of,
    sleep_apply,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
INTERVALS = {
    "LEASEHOLD_HEARTBEAT_INTERVAL": "1",
    "LEASEHOLD_STALE_AFTER": "5",
    "LEASEHOLD_RECLAIM_INTERVAL": "1",
}
DEFAULT_APPLIES = "50,200,500,1000"
SPARE_SLOTS = 4
BIG_N = 500  # from here on, wait for a quiet machine first
LOAD_POLL = 30.0
LOAD_WAIT = 20 * 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
UNFINISHED = ("queued", "dispatched", "running")
STORE_PROCESSES = {_stores.MARIADB: ("mariadbd", "mysqld"), _stores.POSTGRES: ("postgres",)}
LOG_MARKS = re.compile(r"Traceback|ERROR|WARNING")


# --- the private Redis -----------------------------------------------------------------------


@contextmanager
def private_redis(port: int) -> Iterator[str]:
    """A ``redis-server`` of this bench's own on ``port`` (no persistence), stopped by its pid."""
    pidfile = Path(f"/tmp/scale-redis-{port}.pid")
    if pidfile.exists():
        pidfile.unlink()
    try:
        subprocess.run(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
                "--pidfile",
                str(pidfile),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise _common.BackendUnavailable(
            f"cannot start redis-server on port {port}: {exc}"
        ) from exc
    url = f"redis://127.0.0.1:{port}/0"
    pid: int | None = None
    try:
        pid = wait_for("redis-server's pidfile", lambda: _read_pid(pidfile), timeout=10)
        wait_for("redis-server to answer", lambda: _redis_ping(url), timeout=10, interval=0.1)
        yield url
    finally:
        pid = pid or _read_pid(pidfile)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split()[0])  # postmaster.pid: the pid is line 1
    except (OSError, ValueError):
        return None


def _redis_ping(url: str) -> bool | None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping()) or None
    except redis.RedisError:
        return None
    finally:
        client.close()


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.flushdb()
    finally:
        client.close()


# --- private store servers ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A store server of this bench's own: its server URL and the pid of its main process."""

    url: str
    pid: int
    kind: str

    def pids(self) -> list[int]:
        """MariaDB: one process; PostgreSQL: the postmaster and every backend it forked."""
        if self.kind == _stores.MARIADB:
            return [self.pid]
        return [self.pid, *children(self.pid)]


def children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == parent:  # fields[1]: ppid
                found.append(int(entry.name))
    return found


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))[-1:]), None
    )
    if found is None and Path(f"/usr/sbin/{name}").exists():
        found = f"/usr/sbin/{name}"
    if found is None:
        raise _common.BackendUnavailable(f"{name} is not installed")
    return found


def _stop_pid(pid: int, sig: int, timeout: float = 60.0) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)


@contextmanager
def private_mariadb(folder: Path, max_connections: int) -> Iterator[Server]:
    """A ``mariadbd`` of this bench's own (as ``tests/servers/`` starts one, with the shared
    server's InnoDB settings and room for ``max_connections``), stopped by its pid."""
    datadir = folder / "data"
    installed = subprocess.run(
        [
            _tool("mariadb-install-db"),
            "--no-defaults",
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--user=root",
        ],
        capture_output=True,
        timeout=120,
    )
    if installed.returncode != 0:
        raise _common.BackendUnavailable(f"mariadb-install-db failed: {installed.stderr[-500:]!r}")
    port = free_port()
    proc = subprocess.Popen(
        [
            _tool("mariadbd"),
            "--no-defaults",
            f"--datadir={datadir}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            f"--socket={folder / 'mysqld.sock'}",
            f"--pid-file={folder / 'mariadbd.pid'}",
            "--user=root",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=128M",
            "--innodb-log-file-size=96M",
            "--innodb-flush-log-at-trx-commit=1",
            f"--max-connections={max_connections}",
            f"--log-error={folder / 'mariadbd.err'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        import MySQLdb

        def answers() -> bool | None:
            if proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {proc.returncode}")
            try:
                MySQLdb.connect(host="127.0.0.1", port=port, user="root").close()
                return True
            except MySQLdb.OperationalError:
                return None

        wait_for("the private mariadbd", answers, timeout=60, interval=0.1)
        yield Server(f"mysql+mysqldb://root@127.0.0.1:{port}/", proc.pid, _stores.MARIADB)
    finally:
        _stop_pid(proc.pid, signal.SIGTERM)
        if proc.poll() is None:
            _stop_pid(proc.pid, signal.SIGKILL, 10)


@contextmanager
def private_postgres(max_connections: int) -> Iterator[Server]:
    """A PostgreSQL cluster of this bench's own (``initdb``, trust authentication, the shared
    server's ``shared_buffers`` and durability), run as the ``postgres`` user when this process
    is root (PostgreSQL refuses root); stopped by the postmaster's pid, its folder removed."""
    folder = Path(tempfile.mkdtemp(prefix="leasehold-scale-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    try:
        initdb = subprocess.run(
            [*as_user, _tool("initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "-N"],
            capture_output=True,
            timeout=120,
        )
        if initdb.returncode != 0:
            raise _common.BackendUnavailable(f"initdb failed: {initdb.stderr[-500:]!r}")
        port = free_port()
        log = folder / "postgres.log"
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={folder} "
            f"-c max_connections={max_connections} -c shared_buffers=128MB -c fsync=on "
            "-c synchronous_commit=on"
        )
        started = subprocess.run(
            [
                *as_user,
                _tool("pg_ctl"),
                "start",
                "-w",
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(log),
            ],
            capture_output=True,
            timeout=90,
        )
        pid = _read_pid(data / "postmaster.pid")
        if started.returncode != 0 or pid is None:
            raise _common.BackendUnavailable(f"postgres did not start: {started.stderr[-500:]!r}")
        try:
            yield Server(
                f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", pid, "postgres"
            )
        finally:
            _stop_pid(pid, signal.SIGINT)  # a fast shutdown
            if Path(f"/proc/{pid}").exists():
                _stop_pid(pid, signal.SIGQUIT, 10)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def store_stack(
    store: str, args: argparse.Namespace, redis_url: str, intervals: Mapping[str, str]
) -> Iterator[tuple[Stack, Server | None]]:
    """Redis + a scratch database on ``store``; the database dropped and Redis emptied at the
    end, also on failure."""
    with tempfile.TemporaryDirectory(prefix="leasehold-scale-") as tmp, ExitStack() as servers:
        folder = Path(tmp)
        server: Server | None = None
        if args.servers == "private":
            if store == _stores.MARIADB:
                (folder / "mariadb").mkdir()
                server = servers.enter_context(
                    private_mariadb(folder / "mariadb", args.max_connections)
                )
                args = argparse.Namespace(**{**vars(args), "mysql_url": server.url})
            else:
                server = servers.enter_context(private_postgres(args.max_connections))
                args = argparse.Namespace(**{**vars(args), "postgres_url": server.url})
            print(
                f"   a private {store} server (pid {server.pid}, max_connections "
                f"{args.max_connections}) at {server.url}",
                flush=True,
            )
        _flush_redis(redis_url)
        try:
            with _stores.scratch(store, args) as url:
                settings = dict(intervals)
                settings.update(
                    LEASEHOLD_VAR_DIR=str(folder / "var"),
                    LEASEHOLD_DATABASE_URL=url,
                    LEASEHOLD_BROKER_URL=redis_url,
                    LEASEHOLD_RESULT_BACKEND=redis_url,
                )
                yield Stack(f"redis-{store}", url, redis_url, redis_url, folder, settings), server
        finally:
            _flush_redis(redis_url)


# --- /proc ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcSample:
    ticks: int  # utime + stime, clock ticks
    rss_kib: int
    threads: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: fields start after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def group_pids(pgids: Sequence[int]) -> list[int]:
    """Every live process whose process group is one of ``pgids`` (a celery process and any child
    it forked: each is started in a session and group of its own)."""
    wanted = set(pgids)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[2]) in wanted:  # fields[2]: pgrp
            found.append(int(entry.name))
    return found


def named_pids(names: Sequence[str]) -> list[int]:
    """Processes whose command name is one of ``names`` (the store's server processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in names:
            found.append(int(entry.name))
    return found


def proc_sample(pids: Sequence[int]) -> ProcSample:
    """CPU ticks, RSS and threads summed over ``pids`` (those that have gone are left out)."""
    ticks = rss = threads = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("Threads:"):
                threads += int(line.split()[1])
    return ProcSample(ticks, rss, threads)


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_quiet(max_load: float, patience: float = LOAD_WAIT) -> float:
    """Wait (polling every 30 s, up to ``patience``, 20 minutes by default) until the 1-minute
    load is at most ``max_load``; the load measured last (printed: it may still be higher)."""
    deadline = time.monotonic() + patience
    load = load1()
    while load > max_load and time.monotonic() < deadline:
        print(f"   load {load:.2f} > {max_load:g}: waiting {LOAD_POLL:g} s", flush=True)
        time.sleep(LOAD_POLL)
        load = load1()
    return load


# --- store counters -----------------------------------------------------------------------------


class Sampler:
    """This bench's one session on the scratch database (autocommit), and the store's counters.

    Its own statements are counted so that they can be taken out of the store's."""

    def __init__(self, store: str, url: str, postgres_admin_url: str) -> None:
        self.store = store
        self.url = url
        self.db = open_database(url, pool_size=1, max_overflow=0)
        self.conn: Connection = self.db.engine.connect().execution_options(
            isolation_level="AUTOCOMMIT"
        )
        self.database_name = make_url(url).database
        self.own = 0  # statements / transactions this session ran on the scratch database
        self.admin: Connection | None = None
        if store == _stores.POSTGRES:
            # pg_stat_database read from the maintenance database: not counted in the scratch's.
            admin_engine = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
            self.admin = admin_engine.connect()

    def close(self) -> None:
        self.conn.close()
        self.db.dispose()
        if self.admin is not None:
            engine = self.admin.engine
            self.admin.close()
            engine.dispose()

    def _scalar(self, statement: Any) -> Any:
        self.own += 1
        return self.conn.execute(statement).scalar()

    def ages(self) -> list[float]:
        """Heartbeat ages of every running apply, by the database clock."""
        self.own += 1
        rows = self.conn.execute(
            select(clock.age_of(applies.c.heartbeat_at)).where(applies.c.state == "running")
        ).all()
        return [float(r[0]) for r in rows]

    def count(self, states: Sequence[str], above_id: int) -> int:
        return int(
            self._scalar(
                select(func.count())
                .select_from(applies)
                .where(applies.c.state.in_(states), applies.c.id > above_id)
            )
        )

    def now(self) -> datetime:
        value = self._scalar(select(clock.now()))
        assert isinstance(value, datetime), value
        return value

    def max_apply_id(self) -> int:
        return int(self._scalar(select(func.coalesce(func.max(applies.c.id), 0))))

    def max_log_id(self) -> int:
        return int(self._scalar(select(func.coalesce(func.max(apply_logs.c.id), 0))))

    def apply_ids(self, above_id: int) -> list[int]:
        self.own += 1
        return [
            int(r[0])
            for r in self.conn.execute(
                select(applies.c.id).where(applies.c.id > above_id).order_by(applies.c.id)
            )
        ]

    def last_redeemed(self, above_id: int) -> datetime | None:
        value = self._scalar(
            select(func.max(apply_logs.c.created_at)).where(
                apply_logs.c.event == "redeemed", apply_logs.c.apply_id > above_id
            )
        )
        assert value is None or isinstance(value, datetime), value
        return value

    def reclaims(self, above_log_id: int) -> int:
        return int(
            self._scalar(
                select(func.count())
                .select_from(apply_logs)
                .where(apply_logs.c.event == "reclaimed", apply_logs.c.id > above_log_id)
            )
        )

    def sessions(self) -> int:
        """Store sessions on the scratch database (this one included)."""
        if self.store == _stores.POSTGRES:
            assert self.admin is not None
            value = self.admin.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name"),
                {"name": self.database_name},
            ).scalar()
            return int(value or 0)
        return int(
            self._scalar(
                text(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = :name"
                ).bindparams(name=self.database_name)
            )
        )

    def other_sessions(self) -> int:
        """MariaDB: sessions on other databases that ran a statement in the last seconds (their
        statements are in the server-wide counters too)."""
        if self.store != _stores.MARIADB:
            return 0
        return int(
            self._scalar(
                text(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                    "WHERE (DB IS NULL OR DB <> :name) AND ID <> CONNECTION_ID() "
                    "AND COMMAND NOT IN ('Daemon', 'Binlog Dump') "
                    "AND NOT (COMMAND = 'Sleep' AND TIME > 60)"
                ).bindparams(name=self.database_name)
            )
        )

    def counters(self) -> tuple[int | None, int, int]:
        """(statements, transactions, this session's own count so far): MariaDB's server-wide
        ``Questions`` and ``Com_commit + Com_rollback`` (and this session's ``Questions``);
        PostgreSQL's scratch-database ``xact_commit + xact_rollback`` (no statements)."""
        if self.store == _stores.POSTGRES:
            assert self.admin is not None
            row = self.admin.execute(
                text(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :name"
                ),
                {"name": self.database_name},
            ).one()
            return None, int(row[0]), self.own
        self.own += 2
        rows: dict[str, str] = dict(
            self.conn.execute(
                text(
                    "SHOW GLOBAL STATUS WHERE Variable_name IN "
                    "('Questions', 'Com_commit', 'Com_rollback')"
                )
            ).all()
        )
        own = self.conn.execute(text("SHOW SESSION STATUS LIKE 'Questions'")).one()
        return (
            int(rows["Questions"]),
            int(rows["Com_commit"]) + int(rows["Com_rollback"]),
            int(own[1]),
        )


# --- one N --------------------------------------------------------------------------------------


@dataclass
class Result:
    store: str
    n: int
    workers: int
    slots: int
    ramp_s: float | None = None
    all_running: bool = False
    window_s: float = 0.0
    samples: int = 0
    min_running: int = 0
    p50: float = math.nan
    p99: float = math.nan
    max_age: float = math.nan
    reclaims: int = 0
    presumed_lost: int = 0  # "lease presumed lost" lines in the workers' logs
    statements_per_apply_s: float | None = None
    transactions_per_apply_s: float = math.nan
    other_sessions: int = 0
    cpu_one_core: float = math.nan  # workers' CPU, % of one core
    beat_cpu: float = math.nan
    store_cpu: float = math.nan
    rss_mib: float = math.nan
    threads: int = 0
    peak_sessions: int = 0
    load_before: float = math.nan
    load_after: float = math.nan
    cancel_s: float = math.nan
    log_findings: dict[str, int] = field(default_factory=dict)
    log_examples: list[str] = field(default_factory=list)
    error: str | None = None

    def ok(self, interval: float) -> bool:
        return (
            self.error is None
            and self.all_running
            and self.samples > 0
            and self.min_running == self.n
            and self.reclaims == 0
            and self.presumed_lost == 0
            and self.p99 < 2 * interval
        )


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the order statistics."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = fraction * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class ScaleRun:
    def __init__(
        self,
        store: str,
        stack: Stack,
        sampler: Sampler,
        args: argparse.Namespace,
        server: Server | None,
    ) -> None:
        from tasks.app import app

        self.app = app
        self.store = store
        self.stack = stack
        self.sampler = sampler
        self.args = args
        self.interval = float(stack.settings["LEASEHOLD_HEARTBEAT_INTERVAL"])
        self.server = server

    def run(self, n: int) -> Result:
        workers = max(1, min(self.args.workers, n))
        slots = math.ceil(n / workers) + SPARE_SLOTS
        result = Result(self.store, n, workers, slots)
        folder = self.stack.folder / f"n{n}"
        folder.mkdir()
        stack = dataclasses.replace(self.stack, folder=folder)
        cluster = Cluster(stack)
        names = [f"scale-{chr(ord('a') + i)}" for i in range(workers)]
        base_id = self.sampler.max_apply_id()
        base_log_id = self.sampler.max_log_id()
        try:
            for name in names:
                cluster.start_worker(name, apply_slots=slots)
            cluster.start_beat()
            for name in names:
                cluster.procs[name].wait_ready(timeout=120)
            self._measure(n, cluster, names, base_id, base_log_id, result)
        except (TimeoutError, RuntimeError) as exc:
            result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            result.reclaims = self.sampler.reclaims(base_log_id)
            result.min_running = self.sampler.count(["running"], base_id)
            print(
                f"   FAILED: {result.error} ({result.min_running} running at that point, "
                f"{result.reclaims} reclaims so far)",
                flush=True,
            )
        finally:
            started = time.monotonic()
            try:
                self._cancel_all(base_id, cluster)
                result.cancel_s = time.monotonic() - started
            except TimeoutError as exc:
                result.error = result.error or f"cancel: {exc}"
                print(f"   FAILED: {exc}", flush=True)
            cluster.stop_all()
            self._read_logs(cluster, result)
        return result

    def _measure(
        self,
        n: int,
        cluster: Cluster,
        names: Sequence[str],
        base_id: int,
        base_log_id: int,
        result: Result,
    ) -> None:
        sampler = self.sampler
        pgids = [cluster.procs[name].pid for name in names]

        def alive() -> None:
            cluster.check_alive(*names, "beat")

        tag = uuid.uuid4().hex[:8]
        start_db = sampler.now()
        started = time.monotonic()
        for i in range(n):
            request_id = f"scale-{tag}-{n}-{i}"
            self.app.send_task(
                "leasehold.submit_apply",
                kwargs=sleep_apply(request_id, self.args.seconds, database=f"scale-{tag}-{i}"),
            )
        sent_s = time.monotonic() - started
        # The applies begin to end `seconds` after the first could have started, at the earliest.
        end_by = started + self.args.seconds - 3.0
        peak = 0

        def everyone_runs() -> bool | None:
            nonlocal peak
            peak = max(peak, sampler.sessions())
            return sampler.count(["running"], base_id) >= n or None

        ramp_timeout = max(10.0, end_by - time.monotonic() - 5.0)
        wait_for(
            f"{n} applies to run", everyone_runs, timeout=ramp_timeout, interval=0.25, check=alive
        )
        last = sampler.last_redeemed(base_id)
        assert last is not None
        result.all_running = True
        result.ramp_s = (last - start_db).total_seconds()
        print(
            f"   {n} submitted in {sent_s:.2f} s; all running {result.ramp_s:.2f} s after the "
            f"first submit (database clock)",
            flush=True,
        )
        time.sleep(2 * self.interval)  # settle: every lease renewed at least once in its batch
        window = min(self.args.window, end_by - time.monotonic())
        if window < 5.0:
            raise RuntimeError(
                f"no steady state left to measure ({window:.1f} s): --seconds is too short "
                f"for a ramp-up of {result.ramp_s:.1f} s"
            )
        ages: list[float] = []
        running_counts: list[int] = []
        rss_max = threads_max = 0
        statements0, transactions0, own0 = sampler.counters()
        procs0 = proc_sample(group_pids(pgids))
        beat0 = proc_sample(group_pids([cluster.procs["beat"].pid]))
        store_pids = self._store_pids()
        store0 = proc_sample(store_pids)
        t0 = time.monotonic()
        deadline = t0 + window
        next_at = t0
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if now < next_at:
                time.sleep(min(next_at - now, deadline - now))
                continue
            next_at += self.args.sample_every
            sample = sampler.ages()
            ages.extend(sample)
            running_counts.append(len(sample))
            peak = max(peak, sampler.sessions())
            mem = proc_sample(group_pids(pgids))
            rss_max = max(rss_max, mem.rss_kib)
            threads_max = max(threads_max, mem.threads)
            alive()
        elapsed = time.monotonic() - t0
        statements1, transactions1, own1 = sampler.counters()
        procs1 = proc_sample(group_pids(pgids))
        beat1 = proc_sample(group_pids([cluster.procs["beat"].pid]))
        store1 = proc_sample(store_pids)
        result.other_sessions = sampler.other_sessions() if self.server is None else 0
        result.reclaims = sampler.reclaims(base_log_id)
        result.load_after = load1()

        result.window_s = elapsed
        result.samples = len(running_counts)
        result.min_running = min(running_counts) if running_counts else 0
        result.p50, result.p99 = percentile(ages, 0.50), percentile(ages, 0.99)
        result.max_age = max(ages) if ages else math.nan
        # Per running apply: the mean number running over the samples (N when all of them ran).
        apply_seconds = statistics.fmean(running_counts or [n]) * elapsed
        own = own1 - own0
        if statements0 is not None and statements1 is not None:
            # The sampler's own statements: its session's Questions (MariaDB counts every one).
            result.statements_per_apply_s = (statements1 - statements0 - own) / apply_seconds
            result.transactions_per_apply_s = (transactions1 - transactions0) / apply_seconds
        else:
            # PostgreSQL: each of the sampler's autocommit statements is a transaction.
            result.transactions_per_apply_s = (transactions1 - transactions0 - own) / apply_seconds
        cpu_s = (procs1.ticks - procs0.ticks) / CLK_TCK
        result.cpu_one_core = 100.0 * cpu_s / elapsed
        result.beat_cpu = 100.0 * (beat1.ticks - beat0.ticks) / CLK_TCK / elapsed
        result.store_cpu = 100.0 * (store1.ticks - store0.ticks) / CLK_TCK / elapsed
        result.rss_mib = rss_max / 1024.0
        result.threads = threads_max
        result.peak_sessions = peak

    def _store_pids(self) -> list[int]:
        """The store server's processes: ours when private; else by name (shared with others)."""
        if self.server is not None:
            return self.server.pids()
        return named_pids(STORE_PROCESSES.get(self.store, ()))

    def _cancel_all(self, base_id: int, cluster: Cluster) -> None:
        """Cancel every apply of this N and wait until none is unfinished."""
        for apply_id in self.sampler.apply_ids(base_id):
            self.app.send_task(
                "leasehold.control_apply",
                kwargs={"apply_id": apply_id, "action": "cancel", "requested_by": "bench/scale"},
            )

        def settled() -> bool | None:
            return self.sampler.count(UNFINISHED, base_id) == 0 or None

        wait_for("every apply to be cancelled", settled, timeout=240, interval=0.25)

    def _read_logs(self, cluster: Cluster, result: Result) -> None:
        """Count the Traceback / ERROR / WARNING lines; the most frequent distinct messages (numbers
        and hex ids blurred), each with a count and a first example. ``--logs``: keep the logs."""
        kinds: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for name, proc in cluster.procs.items():
            for line in proc.log().splitlines():
                mark = LOG_MARKS.search(line)
                if mark is None:
                    continue
                kinds[f"{name}:{mark.group(0)}"] += 1
                result.presumed_lost += "lease presumed lost" in line
                key = re.sub(r"[0-9a-f]{6,}…?|\d+(\.\d+)?", "#", line.split("] ", 1)[-1])[:120]
                messages[key] += 1
                examples.setdefault(key, f"{name}: {line.strip()[:220]}")
            if self.args.logs is not None and proc.logfile is not None:
                target = self.args.logs / f"{self.store}-n{result.n}"
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(proc.logfile, target / proc.logfile.name)
        result.log_findings = dict(kinds)
        result.log_examples = [f"{n} x {examples[key]}" for key, n in messages.most_common(8)]


# --- the runs -----------------------------------------------------------------------------------


def run_store(
    store: str, args: argparse.Namespace, redis_url: str, intervals: Mapping[str, str]
) -> list[Result]:
    results: list[Result] = []
    with store_stack(store, args, redis_url, intervals) as (stack, server):
        stack.activate()
        print(f"== {store}: {stack.describe()}", flush=True)
        admin_url = server.url if server is not None else args.postgres_url
        sampler = Sampler(store, stack.database_url, admin_url)
        try:
            bench = ScaleRun(store, stack, sampler, args, server)
            for n in args.applies_list:
                load = wait_for_quiet(args.max_load, args.load_wait) if n >= BIG_N else load1()
                workers = max(1, min(args.workers, n))
                print(
                    f"-- {store} N={n}: {workers} workers x "
                    f"{math.ceil(n / workers) + SPARE_SLOTS} apply slots; load {load:.2f}",
                    flush=True,
                )
                result = bench.run(n)
                result.load_before = load
                results.append(result)
                print_result(result, float(intervals["LEASEHOLD_HEARTBEAT_INTERVAL"]))
        finally:
            sampler.close()
    return results


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def print_result(r: Result, interval: float) -> None:
    cores = os.cpu_count() or 1
    print(
        f"   ramp {_f(r.ramp_s)} s; window {r.window_s:.1f} s, {r.samples} samples, running "
        f">= {r.min_running}/{r.n}; heartbeat age p50 {_f(r.p50, 3)} p99 {_f(r.p99, 3)} max "
        f"{_f(r.max_age, 3)} s; false reclaims {r.reclaims}; leases presumed lost by their worker "
        f"{r.presumed_lost}",
        flush=True,
    )
    print(
        f"   per running apply per s: statements {_f(r.statements_per_apply_s, 3)}, "
        f"transactions {_f(r.transactions_per_apply_s, 3)}"
        + (
            f" (sessions of other clients active on the shared server: {r.other_sessions})"
            * bool(r.other_sessions)
        ),
        flush=True,
    )
    print(
        f"   workers: CPU {_f(r.cpu_one_core, 1)}% of one core ({_f(r.cpu_one_core / cores, 1)}% "
        f"of {cores}), RSS {_f(r.rss_mib, 0)} MiB, {r.threads} threads; beat CPU "
        f"{_f(r.beat_cpu, 1)}%; store server CPU {_f(r.store_cpu, 1)}%; peak store sessions "
        f"{r.peak_sessions}; load {_f(r.load_before)} -> {_f(r.load_after)}; cancelled in "
        f"{_f(r.cancel_s, 1)} s; {'OK' if r.ok(interval) else 'NOT OK'}",
        flush=True,
    )
    if r.log_findings:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.log_findings.items()))
        print(f"   logs: {counts}", flush=True)
        for example in r.log_examples:
            print(f"     {example}", flush=True)


def print_table(results: Sequence[Result], interval: float) -> None:
    cores = os.cpu_count() or 1
    print(
        "| store | N | workers x slots | ramp s | hb age p50 / p99 / max s | false reclaims "
        "(presumed lost) | "
        "stmts/s/apply | xacts/s/apply | worker CPU % (1 core / all) | RSS MiB | threads | "
        "peak sessions | load | ok |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.store} | {r.n} | {r.workers} x {r.slots} | {_f(r.ramp_s, 1)} | "
            f"{_f(r.p50)} / {_f(r.p99)} / {_f(r.max_age)} | {r.reclaims} ({r.presumed_lost}) | "
            f"{_f(r.statements_per_apply_s)} | {_f(r.transactions_per_apply_s)} | "
            f"{_f(r.cpu_one_core, 0)} / {_f(r.cpu_one_core / cores, 0)} | {_f(r.rss_mib, 0)} | "
            f"{r.threads} | {r.peak_sessions} | {_f(r.load_before)} | "
            f"{'yes' if r.ok(interval) else 'no'} |"
        )


def plot(results: Sequence[Result], path: Path, interval: float) -> None:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        print(f"plot skipped: matplotlib is not installed ({path} not written)")
        return
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for store in dict.fromkeys(r.store for r in results):
        rows = [r for r in results if r.store == store and r.samples]
        if not rows:
            continue
        ns = [r.n for r in rows]
        series: list[tuple[Any, list[float | None], str, str, str]] = [
            (left, [r.p99 for r in rows], "o", "-", store)
        ]
        if store == _stores.MARIADB:
            series.append(
                (right, [r.statements_per_apply_s for r in rows], "o", "-", f"{store}: statements")
            )
        series.append(
            (right, [r.transactions_per_apply_s for r in rows], "s", ":", f"{store}: transactions")
        )
        for ax, values, marker, style, label in series:
            (line,) = ax.plot(ns, values, marker=marker, linestyle=style, label=label)
            # An N that did not hold (false reclaims, p99 over the line): a hollow marker.
            failed = [
                (n, v) for n, v, r in zip(ns, values, rows, strict=True) if not r.ok(interval)
            ]
            if failed:
                ax.plot(
                    *zip(*failed, strict=True),
                    marker=marker,
                    linestyle="none",
                    markersize=9,
                    markerfacecolor="white",
                    color=line.get_color(),
                )
    left.axhline(
        2 * interval, linestyle="--", color="grey", label=f"2 x heartbeat ({interval:g} s)"
    )
    left.set_yscale("log")
    left.set_xlabel("concurrent applies N")
    left.set_ylabel("heartbeat age p99, s (database clock, log scale)")
    left.set_title("heartbeat age p99 (hollow: N did not hold)")
    left.legend()
    right.set_xlabel("concurrent applies N")
    right.set_ylabel("per running apply per second")
    right.set_ylim(bottom=0)
    right.set_title("store statements / transactions per running apply")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")


def headline(results: Sequence[Result], store: str, interval: float) -> tuple[str, str, str]:
    """(largest qualifying N, its statements/s per apply, its transactions/s per apply)."""
    rows = [r for r in results if r.store == store]
    if not rows:
        return "unavailable", "unavailable", "unavailable"
    good = [r for r in rows if r.ok(interval)]
    if not good:
        return "0", "unavailable", "unavailable"
    best = max(good, key=lambda r: r.n)
    return str(best.n), _f(best.statements_per_apply_s, 3), _f(best.transactions_per_apply_s, 3)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--applies", default=DEFAULT_APPLIES, help="comma-separated values of N")
    parser.add_argument("--seconds", type=float, default=90.0, help="each apply's one task")
    parser.add_argument("--window", type=float, default=40.0, help="steady-state seconds")
    parser.add_argument("--sample-every", type=float, default=0.5)
    parser.add_argument("--store", choices=["mariadb", "postgres", "both"], default="both")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--redis-port", type=int, default=6391, help="the private redis-server")
    parser.add_argument("--max-load", type=float, default=1.5, help="before N >= 500")
    parser.add_argument(
        "--load-wait", type=float, default=LOAD_WAIT, help="seconds to wait for --max-load"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "scale.png")
    parser.add_argument("--no-plot", action="store_true")
    add_interval_arguments(parser, INTERVALS)
    parser.add_argument("--mysql-url", default=_common.mysql_server_url(), help="server URL")
    parser.add_argument(
        "--servers",
        choices=["private", "shared"],
        default="private",
        help="private (default): a mariadbd and a PostgreSQL cluster of this bench's own, with "
        "room for the sessions the workers open and counters that count them alone; shared: "
        "--mysql-url and --postgres-url (their max_connections, 151 and 100 by default, are "
        "exhausted from N=200 on)",
    )
    parser.add_argument("--max-connections", type=int, default=2500, help="private servers")
    parser.add_argument("--logs", type=Path, help="a folder to keep the celery processes' logs in")
    parser.add_argument(
        "--postgres-url", default=_stores.postgres_server_url(), help="server URL (maintenance db)"
    )
    args = parser.parse_args(argv)
    try:
        args.applies_list = sorted({int(v) for v in args.applies.split(",") if v.strip()})
    except ValueError:
        parser.error(f"--applies: not a comma-separated list of numbers: {args.applies!r}")
    if not args.applies_list or min(args.applies_list) < 1:
        parser.error("--applies: every N must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    args.stores = [_stores.MARIADB, _stores.POSTGRES] if args.store == "both" else [args.store]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    intervals = intervals_of(args, INTERVALS)
    interval = float(intervals["LEASEHOLD_HEARTBEAT_INTERVAL"])
    print(
        "intervals (environment of every process): "
        + ", ".join(f"{k}={v}" for k, v in intervals.items())
    )
    print(
        f"N = {', '.join(map(str, args.applies_list))}; applies of one {args.seconds:g} s task; "
        f"steady window up to {args.window:g} s, sampled every {args.sample_every:g} s; stores "
        f"{', '.join(args.stores)}; load {load1():.2f}",
        flush=True,
    )
    started = time.monotonic()
    results: list[Result] = []
    try:
        with private_redis(args.redis_port) as redis_url:
            for store in args.stores:
                try:
                    results += run_store(store, args, redis_url, intervals)
                except _common.BackendUnavailable as exc:
                    print(f"== {store}: SKIPPED, NOT MEASURED: {exc}", flush=True)
    except _common.BackendUnavailable as exc:
        print(f"== SKIPPED, NOT MEASURED: {exc}")
    print(f"== {len(results)} runs, {time.monotonic() - started:.0f} s in all")
    if results:
        print_table(results, interval)
        if not args.no_plot:
            plot(results, args.plot, interval)
    figures = {store: headline(results, store, interval) for store in args.stores}
    if len(args.stores) > 1:
        keys: list[tuple[str, str]] = []
        for store in args.stores:
            n, statements, transactions = figures[store]
            keys.append((f"scale_applies_{store}", n))
            if store == _stores.MARIADB:
                keys.append((f"scale_statements_per_apply_s_{store}", statements))
            keys.append((f"scale_transactions_per_apply_s_{store}", transactions))
        print(_stores.key_line(keys))
    measured = [s for s in args.stores if figures[s][0] != "unavailable"]
    main_store = measured[0] if measured else args.stores[0]
    n, statements, transactions = figures[main_store]
    per_apply = statements if main_store == _stores.MARIADB else transactions
    print(f"scale_applies={n} scale_statements_per_apply_s={per_apply}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
