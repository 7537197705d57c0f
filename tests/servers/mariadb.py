"""A private ``mariadbd`` (optionally TLS only), started, frozen, killed and restarted by pid."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.conftest import unavailable
from tests.servers._process import START_TIMEOUT, TLSFiles, _kill, free_port


class PrivateMariaDB:
    """A MariaDB server of the test's own. ``time_zone``: its global ``time_zone`` at start
    (``SYSTEM`` by default, as most servers run). ``options``: more ``mariadbd`` options, after
    the defaults (the last value of an option wins: ``bench/scale.py``'s ``--max-connections``)."""

    def __init__(
        self,
        folder: Path,
        *,
        time_zone: str | None = None,
        tls: TLSFiles | None = None,
        require_secure_transport: bool = False,
        options: Sequence[str] = (),
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
        self.options = tuple(options)
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
        argv += self.options
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


@contextmanager
def private_mariadb(
    folder: Path,
    *,
    time_zone: str | None = None,
    tls: TLSFiles | None = None,
    require_secure_transport: bool = False,
    options: Sequence[str] = (),
) -> Iterator[PrivateMariaDB]:
    server = PrivateMariaDB(
        folder,
        time_zone=time_zone,
        tls=tls,
        require_secure_transport=require_secure_transport,
        options=options,
    ).start()
    try:
        yield server
    finally:
        server.close()
