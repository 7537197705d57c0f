"""Private servers and network partitions for the fault tests: faults that must never hit the
shared servers (restarting a store, moving its clock, cutting a worker off) are made on servers
and links of the test's own.

- ``PrivateMariaDB``: a ``mariadbd`` on its own port, datadir and socket, started by the test;
  stopped, SIGKILLed, frozen and restarted by pid.
- ``PrivateRedis``: a ``redis-server`` likewise.
- ``Namespace``: a network namespace joined to this host by a veth pair. Processes started in it
  reach the host's servers only through ``socat`` forwarders listening on the host side of the
  pair, so ``cut()`` (the host end of the pair set down) drops their packets silently, as a
  partition does; ``heal()`` brings it back. Needs root (CI runs as root).

Everything is cleaned up by pid or by the names this module made, never by a process name.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tests.conftest import unavailable

START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        with suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def _kill(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
    if proc is not None and proc.poll() is None:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(30)


class PrivateMariaDB:
    """A MariaDB server of the test's own. ``time_zone``: its global ``time_zone`` at start
    (``SYSTEM`` by default, as most servers run)."""

    def __init__(self, folder: Path, *, time_zone: str | None = None) -> None:
        for tool in ("mariadbd", "mariadb-install-db"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                unavailable(f"{tool} is not installed (Debian: mariadb-server)")
        self.folder = folder
        self.datadir = folder / "data"
        self.socket = folder / "mysqld.sock"
        self.port = free_port()
        self.time_zone = time_zone
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = folder / "mariadbd.err"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, database: str = "") -> str:
        return f"mysql+mysqldb://root@127.0.0.1:{self.port}/{database}"

    def start(self) -> PrivateMariaDB:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.datadir.exists():
            installed = subprocess.run(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    f"--datadir={self.datadir}",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    "--user=root",
                ],
                capture_output=True,
                timeout=START_TIMEOUT,
            )
            if installed.returncode != 0:
                output = (installed.stdout + installed.stderr).decode(errors="replace")
                raise RuntimeError(
                    f"mariadb-install-db failed ({installed.returncode}) for {self.datadir}:\n"
                    f"{output[-2000:]}"
                )
        argv = [
            shutil.which("mariadbd") or "/usr/sbin/mariadbd",
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket}",
            f"--pid-file={self.folder / 'mariadbd.pid'}",
            "--user=root",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=48M",
            "--max-connections=300",
            f"--log-error={self.logfile}",
        ]
        if self.time_zone is not None:
            argv.append(f"--default-time-zone={self.time_zone}")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except Exception:
            _kill(self.proc)
            raise
        return self

    def _wait_ready(self) -> None:
        import MySQLdb

        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mariadbd exited with {self.proc.returncode}: {self._log_tail()}"
                )
            try:
                MySQLdb.connect(host="127.0.0.1", port=self.port, user="root").close()
                return
            except MySQLdb.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"mariadbd not ready: {self._log_tail()}") from None
                time.sleep(0.1)

    def _log_tail(self) -> str:
        if not self.logfile.exists():
            return ""
        return self.logfile.read_text(errors="replace")[-2000:]

    def execute(self, sql: str, database: str | None = None) -> list[tuple[Any, ...]]:
        import MySQLdb

        conn = MySQLdb.connect(host="127.0.0.1", port=self.port, user="root", db=database or "")
        try:
            cursor = conn.cursor()
            cursor.execute(sql)
            rows = list(cursor.fetchall()) if cursor.description else []
            conn.commit()
            return rows
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        self.execute(f"CREATE DATABASE IF NOT EXISTS `{name}`")
        return self.url(name)

    def kill(self) -> None:
        """SIGKILL: a crash, as a failover sees it."""
        _kill(self.proc)

    def stop(self) -> None:
        _kill(self.proc, signal.SIGTERM)

    def restart(self, down_for: float = 0.0, *, crash: bool = True) -> None:
        (self.kill if crash else self.stop)()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        _kill(self.proc)
        shutil.rmtree(self.folder, ignore_errors=True)


class PrivateRedis:
    def __init__(self, folder: Path) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server is not installed (Debian: redis-server)")
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> PrivateRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port("127.0.0.1", self.port, START_TIMEOUT, self.proc)
        return self

    def kill(self) -> None:
        _kill(self.proc)

    def restart(self, down_for: float = 0.0) -> None:
        self.kill()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        _kill(self.proc)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def private_mariadb(folder: Path, *, time_zone: str | None = None) -> Iterator[PrivateMariaDB]:
    server = PrivateMariaDB(folder, time_zone=time_zone).start()
    try:
        yield server
    finally:
        server.close()


@contextmanager
def private_redis(folder: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(folder).start()
    try:
        yield server
    finally:
        server.close()


# --- partitions ----------------------------------------------------------------------------------

_SUBNETS = itertools.count(1)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def namespaces_available() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("socat") is None:
        return "ip (iproute2) and socat are needed"
    return None


class Namespace:
    """A network namespace whose only way out is a veth pair to this host, where ``socat``
    forwarders relay chosen ports to the host's loopback servers."""

    def __init__(self) -> None:
        reason = namespaces_available()
        if reason is not None:
            unavailable(reason)
        serial = next(_SUBNETS)
        tag = f"{os.getpid() % 100000}x{serial}"
        self.name = f"lh{tag}"
        self.host_if = f"lhh{tag}"[:15]
        self.ns_if = f"lhn{tag}"[:15]
        # A /28 of 10.213.0.0/16 per namespace (pid and serial keep concurrent runs apart).
        block = (os.getpid() * 7 + serial) % 4096
        prefix = f"10.213.{block // 16}"
        first = (block % 16) * 16
        self.host_ip = f"{prefix}.{first + 1}"
        self.ns_ip = f"{prefix}.{first + 2}"
        self.forwarders: list[subprocess.Popen[bytes]] = []
        self._created = False

    def create(self) -> Namespace:
        _ip("netns", "add", self.name)
        self._created = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/28", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.ns_ip}/28", "dev", self.ns_if)
        _ip("-n", self.name, "link", "set", self.ns_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def forward(self, port: int) -> tuple[str, int]:
        """Relay ``host_ip:port`` (reachable from the namespace) to ``127.0.0.1:port``; returns
        the address processes in the namespace use."""
        proc = subprocess.Popen(
            [
                "socat",
                f"TCP-LISTEN:{port},bind={self.host_ip},fork,reuseaddr",
                f"TCP:127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.forwarders.append(proc)
        _wait_port(self.host_ip, port, START_TIMEOUT, proc)
        return self.host_ip, port

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        """Drop every packet between the namespace and the host, without a reset."""
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def close(self) -> None:
        for proc in self.forwarders:
            _kill(proc)
        if self._created:
            # Deleting the namespace deletes its end of the pair, and with it the host's end.
            with suppress(subprocess.CalledProcessError):
                _ip("netns", "del", self.name)
            with suppress(subprocess.CalledProcessError):
                _ip("link", "del", self.host_if)


@contextmanager
def namespace() -> Iterator[Namespace]:
    ns = Namespace()
    try:
        yield ns.create()
    finally:
        ns.close()
