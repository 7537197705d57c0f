"""Signed messages: Celery's ``auth`` serializer over JSON, set up from ``LEASEHOLD_SECURITY_*``.

When the three settings are given (celeryconfig checks they come together), :func:`setup` makes
every message a leasehold process sends (dispatch, beat's reclaim, notifications, control
broadcasts such as ``doctor``'s ping) signed with its key, and makes every consumer accept only
``auth``: Celery then verifies each body against the certificate store before decoding it.

A worker's guard (``tasks/guard.py``) decodes every message before any task sees it, so an
unsigned message, or one signed by a certificate outside the store, is refused there: one log
line, a dead letter, a ``FAILURE`` for its sender, and nothing written to the store. For a
message that passed, :func:`signer_of` names its signer (the certificate's subject), which the
guard puts on the request as :data:`SIGNER_HEADER`, replacing any header of that name the sender
wrote (headers are not signed); the tasks record it as the requester.

Celery reads key, certificate and store from files; a setting given as PEM text is written to a
file of its own under ``LEASEHOLD_VAR_DIR/security`` (mode 0600, named by its digest, so that
processes starting together write the same file).
"""

from __future__ import annotations

import base64
import glob
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from celery.exceptions import SecurityError
from cryptography import x509

log = logging.getLogger(__name__)

SIGNER_HEADER: Final = "leasehold_signer"
AUTH_CONTENT_TYPE: Final = "application/data"  # what Celery's auth serializer labels a body
_SEPARATOR: Final = b"\x00\x01"  # celery.security.serialization.DEFAULT_SEPARATOR
_UNKNOWN_CERTIFICATE = re.compile(r"Unknown certificate: b?'([^']*)'")  # str or bytes repr
_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----"
)


@dataclass(frozen=True, slots=True)
class Signing:
    """Where Celery finds the key, the certificate and the store, and whom the store trusts."""

    key: str
    certificate: str
    store: str
    signer: str  # this process's own subject
    trusted: dict[str, str]  # Celery's certificate id (issuer and serial) -> subject


_signing: Signing | None = None


def setup(app: Any) -> Signing | None:
    """Turn signing on for ``app`` if it is configured; a no-op (None) otherwise. Raises
    ``LeaseholdConfigError`` (a ValueError) for a key, certificate or store that does not load."""
    global _signing
    conf = app.conf
    raw = (
        conf.get("leasehold_security_key"),
        conf.get("leasehold_security_certificate"),
        conf.get("leasehold_security_cert_store"),
    )
    if not all(raw):
        return None
    folder = Path(conf.get("leasehold_var_dir") or "var") / "security"
    key = _file(raw[0], folder, "key", marker="PRIVATE KEY")
    certificate = _file(raw[1], folder, "certificate", marker="CERTIFICATE")
    store = _store(raw[2], folder)
    trusted = _trusted(store)
    own = _load(Path(certificate).read_bytes(), "LEASEHOLD_SECURITY_CERTIFICATE")
    if _celery_id(own) not in trusted:
        # Workers take leasehold's own messages (dispatches, beat's passes) only if they trust
        # the certificate those are signed with: without it every apply would wait forever.
        raise _config_error(
            f"LEASEHOLD_SECURITY_CERT_STORE does not hold this process's own certificate "
            f"({own.subject.rfc4514_string()}): workers would refuse leasehold's own messages"
        )
    signer = own.subject.rfc4514_string()
    conf.update(
        security_key=key,
        security_certificate=certificate,
        security_cert_store=store,
        task_serializer="auth",
        accept_content=["auth"],
        # Results and events stay JSON: results answer a caller that already proved itself, and
        # Flower reads events without a key.
        result_serializer="json",
        result_accept_content=["json"],
        event_serializer="json",
    )
    try:
        # Content types, not names: "auth" is registered only by this very call.
        app.setup_security(allowed_serializers=["json", AUTH_CONTENT_TYPE], serializer="json")
    except (SecurityError, ValueError, OSError) as exc:
        raise _config_error(f"signed messages cannot be set up: {exc}") from None
    _signing = Signing(key, certificate, store, signer, trusted)
    return _signing


def signing() -> Signing | None:
    """This process's signing, if :func:`setup` turned it on."""
    return _signing


def signer_of(body: bytes | str) -> str:
    """The subject of the certificate that signed ``body`` (an ``auth`` body Celery verified)."""
    if _signing is None:
        raise SecurityError("messages are not signed here")
    try:
        fields = base64.b64decode(body if isinstance(body, bytes) else body.encode("ascii"))
        signer = base64.b64decode(fields.split(_SEPARATOR, 1)[0]).decode("utf-8")
    except (ValueError, UnicodeError) as exc:
        raise SecurityError(f"not a signed body: {exc}") from None
    try:
        return _signing.trusted[signer]
    except KeyError:
        raise SecurityError(f"signed by a certificate outside the store ({signer})") from None


def describe_refusal(content_type: str | None, cause: BaseException | None) -> str | None:
    """Why a worker that takes signed messages only could not decode a message, in words for an
    operator; None when the reason has nothing to do with signing."""
    if _signing is None:
        return None
    if content_type != AUTH_CONTENT_TYPE:
        return (
            f"unsigned ({content_type or 'no content type'}): this worker takes only messages "
            "signed by a certificate in LEASEHOLD_SECURITY_CERT_STORE"
        )
    text = str(cause) if cause is not None else "unknown reason"
    unknown = _UNKNOWN_CERTIFICATE.search(text)
    if unknown is not None:
        # Celery's id of the signer: its issuer's values and serial number, nothing secret.
        return (
            "signed by a certificate outside LEASEHOLD_SECURITY_CERT_STORE "
            f"(issuer and serial {unknown.group(1)[:120]!r})"
        )
    return f"signature refused ({text[:200]})"


# --- files ----------------------------------------------------------------------------------------


def _file(value: str, folder: Path, name: str, *, marker: str) -> str:
    """``value`` itself if it is a path, else the PEM text in it written to a file of its own."""
    if "-----BEGIN" not in value:
        if not Path(value).is_file():
            raise _config_error(f"LEASEHOLD_SECURITY_{name.upper()}: no file {value!r}")
        return value
    if marker not in value:
        raise _config_error(f"LEASEHOLD_SECURITY_{name.upper()} holds PEM text without {marker}")
    return str(_write(folder, name, value))


def _store(value: str, folder: Path) -> str:
    """The store as Celery reads it (a file, a directory or a glob); PEM text of one or more
    certificates becomes a directory of one file each, as Celery reads one per file."""
    if "-----BEGIN" not in value:
        if not glob.glob(value if not os.path.isdir(value) else os.path.join(value, "*")):
            raise _config_error(f"LEASEHOLD_SECURITY_CERT_STORE: nothing at {value!r}")
        return value
    pems = _PEM_CERTIFICATE.findall(value)
    if not pems:
        raise _config_error("LEASEHOLD_SECURITY_CERT_STORE holds PEM text without a certificate")
    digest = hashlib.sha256(value.encode()).hexdigest()[:16]
    store = folder / f"store-{digest}"
    for index, pem in enumerate(pems):
        _write(store, f"certificate-{index}", pem + "\n", fixed=True)
    return str(store)


def _write(folder: Path, name: str, text: str, *, fixed: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = folder / (f"{name}.pem" if fixed else f"{name}-{digest}.pem")
    if path.is_file() and path.read_text() == text:
        return path
    # Written aside and renamed: a process starting beside this one never reads half a key.
    partial = folder / f".{path.name}.{os.getpid()}"
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    os.replace(partial, path)
    return path


def _trusted(store: str) -> dict[str, str]:
    """Celery's id of every certificate in the store (its issuer's values and serial, as
    ``celery.security.certificate.Certificate.get_id`` makes it), with its subject."""
    pattern = os.path.join(store, "*") if os.path.isdir(store) else store
    trusted = {}
    for path in sorted(glob.glob(pattern)):
        pem = Path(path).read_bytes()
        cert = _load(pem, path)
        trusted[_celery_id(cert)] = cert.subject.rfc4514_string()
    return trusted


def _celery_id(cert: x509.Certificate) -> str:
    """The id Celery signs with and looks certificates up by: the issuer's values and the serial
    number (``celery.security.certificate.Certificate.get_id``)."""
    issuer = " ".join(str(attribute.value) for attribute in cert.issuer)
    return f"{issuer} {cert.serial_number}"


def _load(pem: bytes, where: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise _config_error(f"{where} is not a PEM certificate: {exc}") from None


def _config_error(message: str) -> ValueError:
    from celeryconfig import LeaseholdConfigError  # the configuration's own error

    return LeaseholdConfigError(message)
