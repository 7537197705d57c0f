"""Signed messages' configuration (tasks/security.py, celeryconfig): what a worker trusts, how a
signer is named, and what an operator reads when a setting is wrong. The end-to-end refusals are
in tests/e2e/test_security.py.

``security.setup`` changes kombu's process-wide serializer registry, so it runs in a subprocess
here, the way a worker starts; the pure parts run in-process against a :class:`Signing` made for
the test.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from celery.exceptions import SecurityError
from celery.security.certificate import Certificate
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer

from tasks import security
from tests.certs import Issued, self_signed

ROOT = Path(__file__).resolve().parents[2]
SETUP = (
    "import json; from tasks.app import app; from tasks import security; app.conf.broker_url; "
    "s = security.signing(); "
    "print(json.dumps(None if s is None else {'signer': s.signer, 'trusted': sorted("
    "s.trusted.values()), 'key': s.key, 'store': s.store, 'serializer': app.conf.task_serializer,"
    " 'accept': list(app.conf.accept_content), 'results': app.conf.result_serializer}))"
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issued]:
    folder = tmp_path_factory.mktemp("certs")
    return {name: self_signed(folder, name) for name in ("worker", "client", "rogue")}


def start(tmp_path: Path, **values: str) -> subprocess.CompletedProcess[str]:
    """Import the Celery app as a worker does, under ``values`` (LEASEHOLD_* without the
    prefix), and print what signing it set up."""
    return run(tmp_path, values, "-c", SETUP)


def run(tmp_path: Path, values: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """``python ARGV`` in ``tmp_path``, configured by ``values`` (LEASEHOLD_* without the prefix)
    and nothing of the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASEHOLD_", "CELERY_"))}
    env |= {f"LEASEHOLD_{k}": v for k, v in values.items()}
    env |= {"LEASEHOLD_VAR_DIR": str(tmp_path / "var"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unset_means_unsigned(tmp_path: Path) -> None:
    done = start(tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) is None


def test_pem_text_is_written_to_private_files(tmp_path: Path, certs: dict[str, Issued]) -> None:
    done = start(
        tmp_path,
        SECURITY_KEY=certs["worker"].key_pem,
        SECURITY_CERTIFICATE=certs["worker"].cert_pem,
        SECURITY_CERT_STORE=certs["worker"].cert_pem + certs["client"].cert_pem,
    )
    assert done.returncode == 0, done.stderr
    signing = json.loads(done.stdout)
    assert signing["signer"] == "CN=worker"
    assert signing["trusted"] == ["CN=client", "CN=worker"]
    assert (signing["serializer"], signing["accept"], signing["results"]) == (
        "auth",
        ["auth"],
        "json",
    )
    key = Path(signing["key"])
    assert key.read_text() == certs["worker"].key_pem
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    # Celery reads one certificate per file: the store's PEM text became one file each.
    assert len(list(Path(signing["store"]).iterdir())) == 2
    # A second process with the same settings finds the same files (no litter, no race).
    again = start(
        tmp_path,
        SECURITY_KEY=certs["worker"].key_pem,
        SECURITY_CERTIFICATE=certs["worker"].cert_pem,
        SECURITY_CERT_STORE=certs["worker"].cert_pem + certs["client"].cert_pem,
    )
    assert json.loads(again.stdout)["key"] == signing["key"]
    assert sorted(p.name for p in key.parent.iterdir() if p.name.startswith(".")) == []


def test_paths_are_used_as_they_are(tmp_path: Path, certs: dict[str, Issued]) -> None:
    store = tmp_path / "trusted"
    store.mkdir()
    for name in ("worker", "client"):
        (store / f"{name}.pem").write_text(certs[name].cert_pem)
    done = start(
        tmp_path,
        SECURITY_KEY=str(certs["worker"].key_path),
        SECURITY_CERTIFICATE=str(certs["worker"].cert_path),
        SECURITY_CERT_STORE=str(store),
    )
    assert done.returncode == 0, done.stderr
    signing = json.loads(done.stdout)
    assert (signing["key"], signing["store"]) == (str(certs["worker"].key_path), str(store))
    assert signing["trusted"] == ["CN=client", "CN=worker"]
    assert not (tmp_path / "var" / "security").exists()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param(
            {"SECURITY_KEY": "/k.pem"},
            "missing LEASEHOLD_SECURITY_CERTIFICATE, LEASEHOLD_SECURITY_CERT_STORE",
            id="only-a-key",
        ),
        pytest.param(
            {
                "SECURITY_KEY": "/nowhere/key.pem",
                "SECURITY_CERTIFICATE": "/nowhere/cert.pem",
                "SECURITY_CERT_STORE": "/nowhere/*.pem",
            },
            "LEASEHOLD_SECURITY_KEY: no file '/nowhere/key.pem'",
            id="no-such-file",
        ),
        pytest.param(
            {
                "SECURITY_KEY": "-----BEGIN PRIVATE KEY-----\nbm9wZQ==\n-----END PRIVATE KEY-----",
                "SECURITY_CERTIFICATE": "CERT",
                "SECURITY_CERT_STORE": "STORE",
            },
            "signed messages cannot be set up",
            id="a-broken-key",
        ),
        pytest.param(
            {
                "SECURITY_KEY": "KEY",
                "SECURITY_CERTIFICATE": "CERT",
                "SECURITY_CERT_STORE": "OTHER",
            },
            "does not hold this process's own certificate (CN=worker)",
            id="own-certificate-untrusted",
        ),
        pytest.param(
            {"BROKER_URL": "rediss://127.0.0.1:6380/0"},
            "LEASEHOLD_BROKER_URL is rediss:// without ssl_cert_reqs",
            id="rediss-unverified",
        ),
    ],
)
def test_a_wrong_setting_is_one_clear_line(
    tmp_path: Path, certs: dict[str, Issued], values: dict[str, str], expected: str
) -> None:
    # The placeholders stand for the parts of a setting that are right.
    fill = {
        "KEY": certs["worker"].key_pem,
        "CERT": certs["worker"].cert_pem,
        "STORE": certs["worker"].cert_pem,
        "OTHER": certs["client"].cert_pem,
    }
    values = {k: fill.get(v, v) for k, v in values.items()}
    done = run(tmp_path, values, "-m", "tasks.cli", "status")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("leasehold: configuration: "), done.stderr
    assert expected in done.stderr, done.stderr
    assert "bm9wZQ" not in done.stderr  # a key's text is never repeated back


# --- in-process: the signer of a verified body, and the refusal's words -------------------------


@pytest.fixture
def signing(certs: dict[str, Issued], monkeypatch: pytest.MonkeyPatch) -> security.Signing:
    trusted = {
        Certificate(certs[name].cert_pem).get_id(): certs[name].subject
        for name in ("worker", "client")
    }
    made = security.Signing("key", "cert", "store", certs["worker"].subject, trusted)
    monkeypatch.setattr(security, "_signing", made)
    return made


def signed_by(issued: Issued, data: object) -> str:
    serializer = SecureSerializer(
        PrivateKey(issued.key_pem), Certificate(issued.cert_pem), None, "sha256", "json"
    )
    return str(serializer.serialize(data))


def test_the_signer_is_named_by_its_certificate_subject(
    signing: security.Signing, certs: dict[str, Issued]
) -> None:
    body = signed_by(certs["client"], [[], {"apply_id": 1}, {}])
    assert security.signer_of(body) == "CN=client"
    assert security.signer_of(body.encode("ascii")) == "CN=client"  # as a transport may give it


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b"not base64 at all!", "not a signed body", id="garbage"),
        pytest.param("é", "not a signed body", id="not-ascii"),
    ],
)
def test_a_body_that_is_not_signed_has_no_signer(
    signing: security.Signing, body: bytes | str, expected: str
) -> None:
    with pytest.raises(SecurityError, match=expected):
        security.signer_of(body)


def test_a_foreign_signer_is_not_named(signing: security.Signing, certs: dict[str, Issued]) -> None:
    with pytest.raises(SecurityError, match="outside the store"):
        security.signer_of(signed_by(certs["rogue"], [[], {}, {}]))


def test_without_signing_there_is_no_signer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(security, "_signing", None)
    with pytest.raises(SecurityError, match="not signed here"):
        security.signer_of(b"")
    assert security.describe_refusal("application/json", None) is None


def test_refusals_say_what_was_wrong(signing: security.Signing) -> None:
    assert security.describe_refusal("application/json", None) == (
        "unsigned (application/json): this worker takes only messages signed by a certificate "
        "in LEASEHOLD_SECURITY_CERT_STORE"
    )
    for signer in ("'r 7'", "b'r 7'"):  # Celery names the signer as it was sent: str or bytes
        unknown = SecurityError(
            f'Unable to deserialize: SecurityError("Unknown certificate: {signer}")'
        )
        assert security.describe_refusal("application/data", unknown) == (
            "signed by a certificate outside LEASEHOLD_SECURITY_CERT_STORE "
            "(issuer and serial 'r 7')"
        )
    bad = SecurityError("Bad signature: InvalidSignature()")
    assert security.describe_refusal("application/data", bad) == (
        "signature refused (Bad signature: InvalidSignature())"
    )
