"""TLS to Redis (issue 14, part "TLS"): a private ``redis-server`` that listens on ``--tls-port``
only (its plain port is off), with a CA of the test's own, is the broker and the result backend of
a real worker, configured only by ``rediss://`` URLs in ``LEASEHOLD_BROKER_URL`` and
``LEASEHOLD_RESULT_BACKEND``:

    rediss://127.0.0.1:PORT/0?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem
    (+ &ssl_certfile=/path/client.pem&ssl_keyfile=/path/client.key when Redis wants clients' certs)

kombu (broker) and Celery's Redis backend both read those query parameters; leasehold sets no
``broker_use_ssl`` or ``redis_backend_use_ssl``. Two deployments: the server's certificate only,
and ``--tls-auth-clients yes`` with a client certificate. On each, an apply submitted through the
broker completes on the worker, its result comes back through the backend, and
``leasehold doctor`` reaches the broker over ``rediss://``. A plaintext client, a client that
does not trust the CA and (where required) a client without a certificate are refused.

The store is a SQLite file: the store over TLS is ``tests/contract/test_store_tls.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import connection as kombu_connection

from tests.certs import Authority, Issued, make_authority
from tests.e2e.faults import fault_cluster
from tests.e2e.helpers import (
    RESULT_TIMEOUT,
    Stack,
    describe,
    doctor_topics,
    row,
    sleep_payload,
    sqlite_stack,
    submit_task,
    wait_state,
)
from tests.servers import PrivateRedis, TLSFiles, private_redis

pytestmark = pytest.mark.slow

Connection: Any = kombu_connection.Connection  # kombu ships no type hints


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module", params=["server-cert", "client-cert"])
def broker(
    request: pytest.FixtureRequest, folder: Path, authority: Authority
) -> Iterator[PrivateRedis]:
    """Redis over TLS only; ``client-cert``: it also demands a certificate from every client."""
    kind = str(request.param)
    issued = authority.issue(f"redis-{kind}", hosts=["127.0.0.1", "localhost"])
    tls = TLSFiles(authority.cert_path, issued.cert_path, issued.key_path)
    with private_redis(folder / kind, tls=tls, auth_clients=kind == "client-cert") as server:
        yield server


def _urls(broker: PrivateRedis, client_cert: Issued) -> tuple[str, str]:
    """The broker's and the result backend's ``rediss://`` URLs (with the client certificate
    when the server demands one)."""
    cert = client_cert if broker.auth_clients else None
    files = {} if cert is None else {"cert": cert.cert_path, "key": cert.key_path}
    return broker.url(0, **files), broker.url(1, **files)


@pytest.fixture(scope="module")
def stack(broker: PrivateRedis, client_cert: Issued, folder: Path) -> Iterator[Stack]:
    """A deployment whose broker and result backend are ``broker``, over TLS."""
    place = folder / f"deploy-{broker.port}"
    place.mkdir()
    broker_url, backend_url = _urls(broker, client_cert)
    assert broker_url.startswith("rediss://")
    urls = {"LEASEHOLD_BROKER_URL": broker_url, "LEASEHOLD_RESULT_BACKEND": backend_url}
    with sqlite_stack("redis-tls", place, urls, redis=True) as made:
        yield made


def test_an_apply_completes_over_tls(stack: Stack, request: pytest.FixtureRequest) -> None:
    with fault_cluster(stack, request) as cluster:
        cluster.workers(1)
        # Through the broker (the submit task, then run_apply) and back through the result
        # backend (submit's result).
        apply_id = submit_task(stack, sleep_payload(0.2))
        wait_state(stack.db, apply_id, "completed", "failed", timeout=RESULT_TIMEOUT)
        assert row(stack.db, apply_id)["state"] == "completed", describe(stack.db, apply_id)
        assert row(stack.db, apply_id)["error"] is None

        # The test process's app, configured like the worker, is on TLS to both servers.
        with stack.client.connection_for_write() as conn:
            broker_pool = conn.default_channel.client.connection_pool
            assert issubclass(broker_pool.connection_class, redis.SSLConnection)
        backend_pool = stack.client.backend.client.connection_pool
        assert issubclass(backend_pool.connection_class, redis.SSLConnection)

        found = doctor_topics(stack, timeout=1)
        assert found["broker"] == "ok broker reachable (rediss://)", found
        assert found["dead"].startswith("ok dead no dead letters"), found


def test_clients_without_what_redis_wants_are_refused(
    broker: PrivateRedis, folder: Path, client_cert: Issued
) -> None:
    # Plaintext to the TLS port: the server drops the connection.
    plain = redis.Redis(host="127.0.0.1", port=broker.port, socket_timeout=5)
    try:
        with pytest.raises(redis.ConnectionError):
            plain.ping()
    finally:
        plain.close()

    # TLS, but the server's certificate is checked against another CA.
    assert broker.tls is not None
    stranger = make_authority(folder / f"stranger-{broker.port}", "some-other-ca")
    url, _ = _urls(broker, client_cert)
    _refused(url.replace(str(broker.tls.ca), str(stranger.cert_path)), "certificate verify failed")

    # No client certificate where Redis demands one.
    if broker.auth_clients:
        # TLS 1.3 checks it after the handshake: the server's alert or its hang-up, whichever
        # the client reads first.
        _refused(broker.url(0), "certificate required|EOF occurred|reset by peer")


def _refused(url: str, why: str) -> None:
    conn = Connection(url, connect_timeout=5)
    try:
        with pytest.raises(Exception, match=f"(?i){why}"):
            conn.ensure_connection(max_retries=0)
    finally:
        conn.release()
