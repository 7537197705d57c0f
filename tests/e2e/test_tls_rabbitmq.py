"""TLS to RabbitMQ (``amqps://``) with a private CA and client certificates (issue 14, part
"TLS"). The shared RabbitMQ listens in plain AMQP only, so TLS is put in front of it by ``socat
OPENSSL-LISTEN`` with a CA and server certificate of the test's own (``verify=1``: it also demands
a client certificate signed by that CA), relaying to ``127.0.0.1:5672``; the test works in a vhost
of its own. A real worker is configured only by

    LEASEHOLD_BROKER_URL=amqps://guest:guest@localhost:PORT/VHOST?ssl_ca_certs=/path/ca.pem
        &ssl_cert_reqs=required  (+ &ssl_certfile=/path/client.pem&ssl_keyfile=/path/client.key)

which celeryconfig turns into Celery's ``broker_use_ssl`` (py-amqp verifies the chain and the
host name ``localhost``). Two deployments: socat ``verify=0`` (the server's certificate only) and
``verify=1`` (a client certificate too). On each, an apply submitted through the broker completes
on the worker and ``leasehold doctor`` reaches the broker over ``amqps://``. A plaintext client, a
client trusting another CA, a client that names a host the certificate does not, and (under
``verify=1``) a client without a certificate are refused.

The store and the result backend are SQLite files: the store over TLS is
``tests/contract/test_store_tls.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from tests.certs import Authority, Issued, make_authority
from tests.conftest import unavailable
from tests.e2e.conftest import AMQP_URL, rabbitmq_vhost
from tests.e2e.faults import fault_cluster
from tests.e2e.helpers import (
    RESULT_TIMEOUT,
    Stack,
    client_app,
    describe,
    doctor_topics,
    process_env,
    row,
    sleep_payload,
    sqlite_stack,
    submit_task,
    wait_state,
)
from tests.servers import START_TIMEOUT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]

RABBIT = urlsplit(AMQP_URL)
RABBIT_HOST, RABBIT_PORT = RABBIT.hostname or "127.0.0.1", RABBIT.port or 5672


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls-rabbitmq")


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    """A vhost of the module's own on the shared RabbitMQ (deleted after it)."""
    if shutil.which("socat") is None:
        unavailable("socat is not installed (Debian: socat)")
    try:
        socket.create_connection((RABBIT_HOST, RABBIT_PORT), timeout=5).close()
    except OSError as exc:
        unavailable(f"RabbitMQ does not listen on {RABBIT_HOST}:{RABBIT_PORT}: {exc}")
    with rabbitmq_vhost("leasehold_tls") as url:
        yield urlsplit(url).path.lstrip("/")


class TLSFront:
    """``socat`` terminating TLS on ``port`` and relaying to RabbitMQ's plain port; started in
    a process group of its own (its ``fork`` children serve the connections) and killed by it."""

    def __init__(self, folder: Path, authority: Authority, *, verify: bool) -> None:
        issued = authority.issue(f"rabbitmq-verify{int(verify)}", hosts=["localhost", "127.0.0.1"])
        pem = folder / f"rabbitmq-verify{int(verify)}-server.pem"
        fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(issued.cert_pem + issued.key_pem)
        self.ca = authority.cert_path
        self.verify = verify
        self.port = free_port()
        self.log = folder / f"socat-verify{int(verify)}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "socat",
                    "-d",
                    f"OPENSSL-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,cert={pem},"
                    f"cafile={self.ca},verify={int(verify)}",
                    f"TCP:{RABBIT_HOST}:{RABBIT_PORT}",
                ],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            self._wait()
        except Exception:
            self.close()
            raise

    def _wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"socat exited with {self.proc.returncode}: {self._tail()}")
            with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.05)
        raise TimeoutError(f"socat does not listen on {self.port}: {self._tail()}")

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # The fork children (one per connection) are in the same group.
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module", params=["server-cert", "client-cert"])
def front(
    request: pytest.FixtureRequest, folder: Path, authority: Authority, vhost: str
) -> Iterator[TLSFront]:
    """TLS in front of RabbitMQ; ``client-cert``: socat ``verify=1`` demands a client's."""
    tls = TLSFront(folder, authority, verify=request.param == "client-cert")
    try:
        yield tls
    finally:
        tls.close()


def amqps_url(
    port: int,
    vhost: str,
    ca: Path,
    *,
    host: str = "localhost",
    cert: Issued | None = None,
    cert_reqs: str = "required",
) -> str:
    query = [("ssl_ca_certs", str(ca)), ("ssl_cert_reqs", cert_reqs)]
    if cert is not None:
        query += [("ssl_certfile", str(cert.cert_path)), ("ssl_keyfile", str(cert.key_path))]
    params = "&".join(f"{name}={quote(value, safe='/')}" for name, value in query)
    return f"amqps://guest:guest@{host}:{port}/{quote(vhost, safe='')}?{params}"


def _url(front: TLSFront, vhost: str, client_cert: Issued, **more: Any) -> str:
    """The deployment's broker URL (with the client certificate where socat demands one)."""
    cert = client_cert if front.verify else None
    return amqps_url(front.port, vhost, front.ca, cert=cert, **more)


@pytest.fixture(scope="module")
def stack(front: TLSFront, vhost: str, client_cert: Issued, folder: Path) -> Iterator[Stack]:
    """A deployment whose broker is RabbitMQ through ``front``, over TLS."""
    place = folder / f"deploy-{front.port}"
    place.mkdir()
    # The result backend: the embedded default's SQLite under place/var.
    urls = {"LEASEHOLD_BROKER_URL": _url(front, vhost, client_cert)}
    with sqlite_stack("rabbitmq-tls", place, urls, redis=False) as made:
        yield made


def test_an_apply_completes_over_amqps(
    stack: Stack, front: TLSFront, request: pytest.FixtureRequest
) -> None:
    conf = stack.client.conf
    assert conf.broker_url.startswith("amqps://")
    assert "ssl_" not in conf.broker_url
    assert conf.broker_use_ssl["cert_reqs"] == ssl.CERT_REQUIRED
    assert conf.broker_use_ssl["server_hostname"] == "localhost"
    with fault_cluster(stack, request) as cluster:
        cluster.workers(1)
        # Through the broker: the submit task, then run_apply; the submit's result comes back
        # through the SQLite result backend.
        apply_id = submit_task(stack, sleep_payload(0.2))
        wait_state(stack.db, apply_id, "completed", "failed", timeout=RESULT_TIMEOUT)
        assert row(stack.db, apply_id)["state"] == "completed", describe(stack.db, apply_id)
        assert row(stack.db, apply_id)["error"] is None

        # The test process's app, configured like the worker, speaks TLS to the front, having
        # checked its certificate (and shown its own where socat wants one).
        with stack.client.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            sock = conn.connection.transport.sock
            assert isinstance(sock, ssl.SSLSocket)
            assert sock.getpeername()[1] == front.port
            assert sock.version() in ("TLSv1.2", "TLSv1.3")
            assert sock.context.check_hostname
            assert sock.context.verify_mode == ssl.CERT_REQUIRED
            peer = sock.getpeercert()
            assert peer is not None
            assert ("DNS", "localhost") in peer["subjectAltName"]

        found = doctor_topics(stack, timeout=2)
        assert found["broker"] == "ok broker reachable (amqps://)", found
        assert found["workers"].startswith("ok workers queue"), found
        assert found["dead"].startswith("ok dead no dead letters"), found


def test_clients_without_what_the_server_wants_are_refused(
    front: TLSFront, vhost: str, folder: Path, client_cert: Issued
) -> None:
    var = folder / f"refused-{front.port}"
    url = _url(front, vhost, client_cert)
    # Plaintext AMQP to the TLS port: socat drops it.
    _refused(
        f"amqp://guest:guest@127.0.0.1:{front.port}/{vhost}",
        var,
        "reset by peer|EOF occurred|Socket closed|Server unexpectedly",
    )

    # TLS, but the server's certificate is checked against another CA.
    stranger = make_authority(folder / f"stranger-{front.port}", "some-other-ca")
    _refused(url.replace(str(front.ca), str(stranger.cert_path)), var, "certificate verify failed")

    # The right CA, but the client expects another host name (socat listens on 127.0.0.1 only,
    # whose names are in the certificate): the name py-amqp checks is changed, not the address.
    _refused(url, var, "hostname mismatch", server_hostname="rabbit.example")

    # No client certificate where socat demands one. TLS 1.3 checks it after the handshake:
    # the server's alert or its hang-up, whichever the client reads first.
    if front.verify:
        _refused(
            amqps_url(front.port, vhost, front.ca),
            var,
            "certificate required|EOF occurred|reset by peer|Socket closed|Server unexpectedly",
        )


def _refused(url: str, var: Path, why: str, **use_ssl: str) -> None:
    """``url``, read by celeryconfig as the workers read it (``use_ssl``: then changed in its
    ``broker_use_ssl``), cannot connect, with an error matching ``why``."""
    app = client_app(process_env({"LEASEHOLD_BROKER_URL": url, "LEASEHOLD_VAR_DIR": str(var)}))
    try:
        if use_ssl:
            app.conf.broker_use_ssl = dict(app.conf.broker_use_ssl, **use_ssl)
        conn = app.connection_for_write()
        try:
            with pytest.raises(Exception, match=f"(?i){why}"):
                conn.ensure_connection(max_retries=0, timeout=5)
        finally:
            conn.release()
    finally:
        app.close()
