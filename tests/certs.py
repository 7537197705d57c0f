"""Certificates for tests, made with ``cryptography``: a private CA per test, server and client
certificates it issues, and lone self-signed certificates. Keys are RSA 2048, written as
unencrypted PKCS8 PEM with mode 0600; certificates are PEM."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from celery.security.serialization import register_auth
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kombu.serialization import registry

_VALID = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Issued:
    subject: str  # RFC 4514 string, e.g. "CN=leasehold-worker"
    cert_path: Path
    key_path: Path
    cert_pem: str
    key_pem: str


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}.key"
    cert_path.write_text(cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key_pem)
    os.chmod(key_path, 0o600)
    return Issued(cert.subject.rfc4514_string(), cert_path, key_path, cert_pem, key_pem)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
    )


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


class Authority:
    """A self-signed CA whose certificate and key live under ``directory``."""

    def __init__(self, directory: Path, issued: Issued, key: rsa.RSAPrivateKey) -> None:
        self.directory = directory
        self.cert_path = issued.cert_path
        self.cert_pem = issued.cert_pem
        self.subject = issued.subject
        self._key = key
        self._cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())

    def issue(self, common_name: str, *, hosts: Sequence[str] = (), client: bool = False) -> Issued:
        """A leaf for ``common_name``: ``hosts`` in its subjectAltName; serverAuth, or
        clientAuth when ``client``. Files are ``<common_name>.pem`` and ``.key``."""
        key = _key()
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _builder(_name(common_name), self._cert.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(_alt_names(hosts)), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        return _write(self.directory, common_name, cert, key)


def make_authority(directory: Path, name: str) -> Authority:
    """A self-signed CA whose CN is ``name``; files ``<name>.pem`` and ``.key`` in ``directory``."""
    key = _key()
    cert = (
        _builder(_name(name), _name(name), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(directory, _write(directory, name, cert, key), key)


def self_signed(directory: Path, common_name: str) -> Issued:
    """A lone self-signed leaf (no CA), e.g. for Celery's message signing."""
    key = _key()
    cert = (
        _builder(_name(common_name), _name(common_name), key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, common_name, cert, key)


@contextmanager
def signing_as(issued: Issued | None) -> Iterator[str]:
    """This process sends as ``issued`` (Celery's ``auth`` serializer, registered process-wide as
    a calling app's ``setup_security`` would), or unsigned (JSON) for None. Yields the serializer
    name for ``send_task``; the ``auth`` serializer is unregistered afterwards."""
    if issued is None:
        yield "json"
        return
    register_auth(issued.key_pem, None, issued.cert_pem, None, "sha256", "json")
    try:
        yield "auth"
    finally:
        registry.unregister("auth")  # type: ignore[no-untyped-call]
