"""``LEASEHOLD_BROKER_URL=amqps://...?ssl_*``: celeryconfig moves the rediss:// names of the query
(``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``) into Celery's
``broker_use_ssl``, the only place py-amqp reads them from, and strips them from the URL. And
py-amqp, given that dict, verifies the chain against the CA and checks the host name. Against a
real RabbitMQ behind TLS: ``tests/e2e/test_tls_rabbitmq.py``."""

from __future__ import annotations

import os
import runpy
import socket
import ssl
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from amqp.transport import SSLTransport  # type: ignore[import-untyped]
from celery import Celery

from tests.certs import make_authority

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, broker_url: str) -> dict[str, Any]:
    env = {"LEASEHOLD_BROKER_URL": broker_url, "LEASEHOLD_VAR_DIR": str(tmp_path / "var")}
    with mock.patch.dict(os.environ, env, clear=True):
        return runpy.run_path(str(ROOT / "celeryconfig.py"), run_name="unit_celeryconfig")


def _config_error(tmp_path: Path, broker_url: str) -> str:
    with pytest.raises(ValueError, match=r"^LEASEHOLD_BROKER_URL: ") as caught:
        _config(tmp_path, broker_url)
    # LeaseholdConfigError, a class of the celeryconfig run
    assert type(caught.value).__name__ == "LeaseholdConfigError"
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_private_ca_and_client_certificate_go_to_broker_use_ssl(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        "amqps://user:pa%2Fss@rabbit.example:5671/lh?heartbeat=30&ssl_ca_certs=/etc/lh/ca.pem"
        "&ssl_cert_reqs=required&ssl_certfile=%2Fetc%2Flh%2Fclient.pem&ssl_keyfile=/etc/lh/c.key",
    )
    assert config["broker_use_ssl"] == {
        "ca_certs": "/etc/lh/ca.pem",
        "certfile": "/etc/lh/client.pem",  # percent-decoded
        "keyfile": "/etc/lh/c.key",
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": "rabbit.example",
    }
    # Stripped of the ssl_* names; everything else (credentials, vhost, other options) kept.
    assert config["broker_url"] == "amqps://user:pa%2Fss@rabbit.example:5671/lh?heartbeat=30"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("required", ssl.CERT_REQUIRED),
        ("CERT_REQUIRED", ssl.CERT_REQUIRED),
        ("optional", ssl.CERT_OPTIONAL),
        ("none", ssl.CERT_NONE),
        ("CERT_NONE", ssl.CERT_NONE),
    ],
)
def test_cert_reqs_names(tmp_path: Path, given: str, expected: ssl.VerifyMode) -> None:
    config = _config(tmp_path, f"amqps://rabbit.example/lh?ssl_cert_reqs={given}")
    use_ssl = config["broker_use_ssl"]
    assert use_ssl["cert_reqs"] == expected
    # No host name with CERT_NONE: py-amqp would turn check_hostname on, and Python refuses
    # CERT_NONE with it.
    assert ("server_hostname" in use_ssl) is (expected != ssl.CERT_NONE)
    assert config["broker_url"] == "amqps://rabbit.example/lh"


def test_a_ca_alone_means_required(tmp_path: Path) -> None:
    config = _config(tmp_path, "amqps://localhost:5671/?ssl_ca_certs=/ca.pem")
    assert config["broker_use_ssl"] == {
        "ca_certs": "/ca.pem",
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": "localhost",
    }
    assert config["broker_url"] == "amqps://localhost:5671/"


@pytest.mark.parametrize("value", ["yes", "", "CERT_MAYBE"])
def test_unknown_cert_reqs_is_refused(tmp_path: Path, value: str) -> None:
    message = _config_error(tmp_path, f"amqps://rabbit.example/?ssl_cert_reqs={value}")
    assert message == (
        f"LEASEHOLD_BROKER_URL: ssl_cert_reqs={value!r} is not required, optional or none"
    )


def test_a_failover_list_with_ssl_parameters_is_refused(tmp_path: Path) -> None:
    message = _config_error(
        tmp_path, "amqps://a.example/;amqps://b.example/?ssl_cert_reqs=required"
    )
    assert "single amqps:// URL" in message


@pytest.mark.parametrize(
    "url",
    [
        "amqps://rabbit.example:5671/lh",  # no ssl_*: kombu's own amqps:// (system CAs)
        "amqp://rabbit.example/lh?ssl_cert_reqs=required",  # not TLS: left to kombu as it is
        "rediss://redis.example/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem",
        "filesystem://",
    ],
)
def test_other_urls_are_left_alone(tmp_path: Path, url: str) -> None:
    config = _config(tmp_path, url)
    assert "broker_use_ssl" not in config
    assert config["broker_url"] == url


def test_celery_hands_it_to_py_amqp_which_checks_chain_and_host_name(tmp_path: Path) -> None:
    ca = make_authority(tmp_path / "pki", "unit-ca")
    client = ca.issue("client", client=True)
    config = _config(
        tmp_path,
        f"amqps://guest:guest@localhost:5671/lh?ssl_ca_certs={ca.cert_path}"
        f"&ssl_cert_reqs=required&ssl_certfile={client.cert_path}&ssl_keyfile={client.key_path}",
    )
    app = Celery("unit-broker-tls", set_as_current=False)
    app.conf.update(broker_url=config["broker_url"], broker_use_ssl=config["broker_use_ssl"])
    try:
        conn = app.connection_for_write()  # not connected: nothing listens
        try:
            assert conn.transport_cls == "amqps"
            assert conn.ssl == config["broker_use_ssl"]
            assert (conn.hostname, conn.port, conn.virtual_host) == ("localhost", 5671, "lh")
        finally:
            conn.release()
    finally:
        app.close()

    # What py-amqp's SSLTransport does with the dict (its _wrap_socket, before the handshake).
    transport = SSLTransport("localhost:5671", ssl=dict(config["broker_use_ssl"]))
    with socket.socket() as raw:
        wrapped = transport._wrap_socket(raw, **transport.sslopts)
        try:
            context = wrapped.context
            assert context.verify_mode == ssl.CERT_REQUIRED
            assert context.check_hostname is True
            assert wrapped.server_hostname == "localhost"
            assert [c["subject"] for c in context.get_ca_certs()] == [
                ((("commonName", "unit-ca"),),)
            ]
        finally:
            wrapped.detach()
