"""Private servers and network partitions for the fault tests: faults that must never hit the
shared servers (restarting a store, moving its clock, cutting a worker off) are made on servers
and links of the test's own.

- ``PrivateMariaDB``: a ``mariadbd`` on its own port, datadir and socket, started by the test;
  stopped, SIGKILLed, frozen and restarted by pid.
- ``PrivateRedis``: a ``redis-server`` likewise.
- Either may serve TLS only (``TLSFiles``: the CA, certificate and key of the server): Redis on
  ``--tls-port`` with the plain port off, MariaDB with ``--ssl-*`` and, on request,
  ``require_secure_transport`` (a plain TCP connection is refused).
- ``PrivatePostgres``: ``initdb`` + ``postgres`` as the ``postgres`` OS user, in a folder of its
  own; with ``TLSFiles`` it takes TCP only over TLS (``hostssl``; ``hostnossl ... reject``).
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
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

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


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a TLS server: the CA its peers trust, its certificate and its key."""

    ca: Path
    cert: Path
    key: Path


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

    def __init__(
        self,
        folder: Path,
        *,
        time_zone: str | None = None,
        tls: TLSFiles | None = None,
        require_secure_transport: bool = False,
    ) -> None:
        for tool in ("mariadbd", "mariadb-install-db"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                unavailable(f"{tool} is not installed (Debian: mariadb-server)")
        self.folder = folder
        self.datadir = folder / "data"
        self.socket = folder / "mysqld.sock"
        self.port = free_port()
        self.time_zone = time_zone
        self.tls = tls
        self.require_secure_transport = require_secure_transport
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = folder / "mariadbd.err"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, database: str = "") -> str:
        """The plain URL (refused by a server that requires secure transport)."""
        return f"mysql+mysqldb://root@127.0.0.1:{self.port}/{database}"

    def tls_url(
        self, database: str = "", *, cert: Path | None = None, key: Path | None = None
    ) -> str:
        """The URL over TLS, verifying the server against ``tls.ca`` (mysqlclient's ``ssl``
        options as SQLAlchemy's mysqldb dialect takes them from the query); ``cert``/``key``: a
        client certificate."""
        assert self.tls is not None, "this server has no TLS files"
        query = [("ssl_ca", self.tls.ca)]
        if cert is not None and key is not None:
            query += [("ssl_cert", cert), ("ssl_key", key)]
        params = "&".join(f"{name}={quote(str(path), safe='/')}" for name, path in query)
        return f"{self.url(database)}?{params}"

    def _connect_args(self) -> dict[str, Any]:
        return {} if self.tls is None else {"ssl": {"ca": str(self.tls.ca)}}

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
        if self.tls is not None:
            argv += [
                f"--ssl-ca={self.tls.ca}",
                f"--ssl-cert={self.tls.cert}",
                f"--ssl-key={self.tls.key}",
            ]
        if self.require_secure_transport:
            argv.append("--require-secure-transport=ON")
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
                MySQLdb.connect(
                    host="127.0.0.1", port=self.port, user="root", **self._connect_args()
                ).close()
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

        conn = MySQLdb.connect(
            host="127.0.0.1", port=self.port, user="root", db=database or "", **self._connect_args()
        )
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
    """A ``redis-server`` of the test's own. With ``tls`` it listens on ``--tls-port`` only (the
    plain port is 0: off), and with ``auth_clients`` it also demands a client certificate
    signed by ``tls.ca``."""

    def __init__(
        self, folder: Path, *, tls: TLSFiles | None = None, auth_clients: bool = False
    ) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server is not installed (Debian: redis-server)")
        self.folder = folder
        self.port = free_port()
        self.tls = tls
        self.auth_clients = auth_clients
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, *, cert: Path | None = None, key: Path | None = None) -> str:
        """``redis://`` or, with TLS, ``rediss://`` verifying the server against ``tls.ca``
        (kombu's and Celery's query parameters); ``cert``/``key``: a client certificate."""
        if self.tls is None:
            return f"redis://127.0.0.1:{self.port}/{db}"
        query = [("ssl_cert_reqs", "required"), ("ssl_ca_certs", str(self.tls.ca))]
        if cert is not None and key is not None:
            query += [("ssl_certfile", str(cert)), ("ssl_keyfile", str(key))]
        params = "&".join(f"{name}={quote(value, safe='/')}" for name, value in query)
        return f"rediss://127.0.0.1:{self.port}/{db}?{params}"

    def start(self) -> PrivateRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ports = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.tls.cert),
                "--tls-key-file",
                str(self.tls.key),
                "--tls-ca-cert-file",
                str(self.tls.ca),
                "--tls-auth-clients",
                "yes" if self.auth_clients else "no",
            ]
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                *ports,
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
def private_mariadb(
    folder: Path,
    *,
    time_zone: str | None = None,
    tls: TLSFiles | None = None,
    require_secure_transport: bool = False,
) -> Iterator[PrivateMariaDB]:
    server = PrivateMariaDB(
        folder, time_zone=time_zone, tls=tls, require_secure_transport=require_secure_transport
    ).start()
    try:
        yield server
    finally:
        server.close()


@contextmanager
def private_redis(
    folder: Path, *, tls: TLSFiles | None = None, auth_clients: bool = False
) -> Iterator[PrivateRedis]:
    server = PrivateRedis(folder, tls=tls, auth_clients=auth_clients).start()
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


# --- PostgreSQL ----------------------------------------------------------------------------------

POSTGRES_BIN = Path(os.environ.get("LEASEHOLD_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
POSTGRES_USER = "postgres"  # the OS user the server runs as (postgres refuses to run as root)


class PrivatePostgres:
    """A PostgreSQL server of the test's own (``initdb`` + ``postgres`` from ``POSTGRES_BIN``) on
    its own port, listening on 127.0.0.1 and a Unix socket in its folder, run as the ``postgres``
    OS user when the test runs as root. Its superuser is ``postgres`` (trusted on the socket).

    With ``tls`` it serves TLS (``ssl=on``) and its ``pg_hba.conf`` takes TCP only over TLS:
    ``hostssl ... trust`` for everyone but ``cert_users``, who must show a client certificate
    signed by ``tls.ca`` whose CN is their name (``hostssl ... cert``); ``hostnossl ... reject``.
    The data folder is made with ``tempfile`` (not under pytest's root-only temp folder, which
    the server's user could not enter), with copies of the TLS files it can read; ``close``
    deletes it. ``initdb`` runs once per instance; ``stop``/``start`` keep the data."""

    def __init__(self, *, tls: TLSFiles | None = None, cert_users: Sequence[str] = ()) -> None:
        for tool in ("initdb", "postgres"):
            if not (POSTGRES_BIN / tool).exists():
                unavailable(f"{POSTGRES_BIN / tool} is missing (Debian: postgresql-15)")
        self.as_other_user = os.geteuid() == 0
        if self.as_other_user:
            import pwd

            try:
                entry = pwd.getpwnam(POSTGRES_USER)
            except KeyError:
                unavailable(f"there is no {POSTGRES_USER!r} OS user to run PostgreSQL as")
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
        self.folder = Path(tempfile.mkdtemp(prefix="leasehold-pg-"))
        self.datadir = self.folder / "data"
        self.socket_dir = self.folder
        self.logfile = self.folder / "postgres.log"
        self.port = free_port()
        self.tls = tls
        self.cert_users = tuple(cert_users)
        self.proc: subprocess.Popen[bytes] | None = None
        self._own(self.folder, 0o700)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _own(self, path: Path, mode: int) -> None:
        if self.as_other_user:
            os.chown(path, self._uid, self._gid)
        os.chmod(path, mode)

    def _popen_user(self) -> dict[str, Any]:
        if not self.as_other_user:
            return {}
        return {"user": self._uid, "group": self._gid, "extra_groups": []}

    def url(
        self, database: str = "postgres", *, user: str = "postgres", **query: str | Path
    ) -> str:
        """``postgresql+psycopg://user@127.0.0.1:PORT/database``, plus ``query`` (libpq's
        parameters: ``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``, ...)."""
        base = f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{database}"
        if not query:
            return base
        return base + "?" + "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in query.items())

    def _tls_files(self) -> dict[str, Path]:
        """The server's copies of the TLS files, readable by its user (the key 0600)."""
        assert self.tls is not None
        copies = {}
        for name, source, mode in (
            ("ca", self.tls.ca, 0o644),
            ("cert", self.tls.cert, 0o644),
            ("key", self.tls.key, 0o600),
        ):
            target = self.folder / f"server-{name}.pem"
            shutil.copyfile(source, target)
            self._own(target, mode)
            copies[name] = target
        return copies

    def _hba(self) -> str:
        lines = ["local all all trust"]
        if self.tls is None:
            lines.append("host all all 127.0.0.1/32 trust")
        else:
            lines += [f"hostssl all {user} 127.0.0.1/32 cert" for user in self.cert_users]
            lines += ["hostssl all all 127.0.0.1/32 trust", "hostnossl all all 127.0.0.1/32 reject"]
        return "\n".join(lines) + "\n"

    def _initdb(self) -> None:
        done = subprocess.run(
            [
                str(POSTGRES_BIN / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            capture_output=True,
            timeout=START_TIMEOUT,
            cwd=self.folder,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
            **self._popen_user(),
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{output[-2000:]}")
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(self._hba())
        self._own(hba, 0o600)

    def start(self) -> PrivatePostgres:
        if not self.datadir.exists():
            self._initdb()
        argv = [
            str(POSTGRES_BIN / "postgres"),
            "-D",
            str(self.datadir),
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir),
            "-c",
            "listen_addresses=127.0.0.1",
            # A test server: nothing here must survive a crash of the machine.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=100",
            "-c",
            "shared_buffers=32MB",
        ]
        if self.tls is not None:
            files = self._tls_files()
            argv += [
                "-c",
                "ssl=on",
                "-c",
                f"ssl_cert_file={files['cert']}",
                "-c",
                f"ssl_key_file={files['key']}",
                "-c",
                f"ssl_ca_file={files['ca']}",
            ]
        log = open(self.logfile, "ab")  # noqa: SIM115 - the server's, closed with it below
        try:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=log,
                cwd=self.folder,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
                **self._popen_user(),
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except Exception:
            _kill(self.proc)
            raise
        return self

    def _wait_ready(self) -> None:
        import psycopg

        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self._log()}")
            try:
                self._connect().close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"postgres not ready: {self._log()}") from None
                time.sleep(0.05)

    def _log(self) -> str:
        return self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""

    def _connect(self, database: str = "postgres") -> Any:
        """The superuser, over the Unix socket (trusted; no TLS there)."""
        import psycopg

        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user="postgres",
            dbname=database,
            autocommit=True,
            connect_timeout=5,
        )

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        with self._connect(database) as conn:
            cursor = conn.execute(sql)
            return list(cursor.fetchall()) if cursor.description else []

    def stop(self) -> None:
        """A fast shutdown (SIGINT): sessions ended, the data kept."""
        _kill(self.proc, signal.SIGINT)

    def kill(self) -> None:
        _kill(self.proc)

    def close(self) -> None:
        self.stop()
        _kill(self.proc)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def private_postgres(
    *, tls: TLSFiles | None = None, cert_users: Sequence[str] = ()
) -> Iterator[PrivatePostgres]:
    server = PrivatePostgres(tls=tls, cert_users=cert_users)
    try:
        yield server.start()
    finally:
        server.close()
