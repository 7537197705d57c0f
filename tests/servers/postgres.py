"""A private PostgreSQL (``initdb`` + ``postgres`` as the ``postgres`` OS user), TLS only on TCP."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.conftest import unavailable
from tests.servers._process import START_TIMEOUT, TLSFiles, _kill, free_port

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
    deletes it. ``initdb`` runs once per instance; ``stop``/``start`` keep the data.
    ``settings``: more ``-c name=value``, after the defaults, which they override (a test server
    runs without fsync; ``bench/scale.py`` turns durability back on)."""

    def __init__(
        self,
        *,
        tls: TLSFiles | None = None,
        cert_users: Sequence[str] = (),
        settings: Mapping[str, str] | None = None,
    ) -> None:
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
        self.settings = dict(settings or {})
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
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
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
    *,
    tls: TLSFiles | None = None,
    cert_users: Sequence[str] = (),
    settings: Mapping[str, str] | None = None,
) -> Iterator[PrivatePostgres]:
    server = PrivatePostgres(tls=tls, cert_users=cert_users, settings=settings)
    try:
        yield server.start()
    finally:
        server.close()
