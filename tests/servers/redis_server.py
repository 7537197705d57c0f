"""A private ``redis-server`` (optionally TLS only), started, killed and restarted by pid."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from tests.conftest import unavailable
from tests.servers._process import START_TIMEOUT, TLSFiles, _kill, _wait_port, free_port


class PrivateRedis:
    """A ``redis-server`` of the test's own. With ``tls`` it listens on ``--tls-port`` only (the
    plain port is 0: off), and with ``auth_clients`` it also demands a client certificate
    signed by ``tls.ca``. ``port``: a fixed one (a free one by default)."""

    def __init__(
        self,
        folder: Path,
        *,
        tls: TLSFiles | None = None,
        auth_clients: bool = False,
        port: int | None = None,
    ) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server is not installed (Debian: redis-server)")
        self.folder = folder
        self.port = port or free_port()
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
def private_redis(
    folder: Path,
    *,
    tls: TLSFiles | None = None,
    auth_clients: bool = False,
    port: int | None = None,
) -> Iterator[PrivateRedis]:
    server = PrivateRedis(folder, tls=tls, auth_clients=auth_clients, port=port).start()
    try:
        yield server
    finally:
        server.close()


# --- partitions ----------------------------------------------------------------------------------
