"""The servers ``bench/scale.py`` runs on: a ``redis-server`` of its own (broker and results),
a ``mariadbd`` and a PostgreSQL cluster of its own with room for ``--max-connections`` sessions
(``--servers private``), each stopped by its pid; and the stack of one store: a scratch database
on a private or a shared server, with the ``LEASEHOLD_*`` settings of every process."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from bench import _common, _stores
from bench._scale_proc import children
from bench.failover import Stack, wait_for

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
                yield stack_on(store, url, redis_url, folder, intervals), server
        finally:
            _flush_redis(redis_url)


def stack_on(
    store: str, database_url: str, redis_url: str, folder: Path, intervals: Mapping[str, str]
) -> Stack:
    """The stack of a migrated database and a Redis database that exist already (broker and
    results), the processes' files in ``folder``: what ``store_stack`` yields, and what the
    suite's smoke run (``tests/e2e/test_scale_smoke.py``) builds on the shared servers."""
    settings = dict(intervals)
    settings.update(
        LEASEHOLD_VAR_DIR=str(folder / "var"),
        LEASEHOLD_DATABASE_URL=database_url,
        LEASEHOLD_BROKER_URL=redis_url,
        LEASEHOLD_RESULT_BACKEND=redis_url,
    )
    return Stack(f"redis-{store}", database_url, redis_url, redis_url, folder, settings)
