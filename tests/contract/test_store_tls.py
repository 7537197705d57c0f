"""The store over TLS (issue 14, part "TLS"): a private ``mariadbd`` with ``--ssl-ca``,
``--ssl-cert`` and ``--ssl-key`` (a CA of the test's own) and ``require_secure_transport=ON``, so
that a plain connection is refused. leasehold reaches it through ``LEASEHOLD_DATABASE_URL`` alone,
with mysqlclient's SSL options in the query, which SQLAlchemy's mysqldb dialect passes on:

    mysql+mysqldb://user@host:3306/leasehold?ssl_ca=/path/ca.pem&ssl_mode=VERIFY_IDENTITY
    (+ &ssl_cert=/path/client.pem&ssl_key=/path/client.key for a client certificate)

Proven here: ``storage.migrate.upgrade`` (what ``leasehold migrate`` runs) and a whole sleep apply
(create, dispatch, redeem, every checkpoint, the terminal write and the fence that refuses the
finished lease) on a session whose ``Ssl_cipher`` is set; that the plain URL is refused (and
only because of ``require_secure_transport``); that a server certificate from another CA, or one
for another host name under ``ssl_mode=VERIFY_IDENTITY``, is refused; and that a user created
``REQUIRE SUBJECT`` connects with its client certificate and is refused without it.

PostgreSQL likewise, on a private ``postgres`` (``tests.servers.PrivatePostgres``: ``ssl=on``, the
test's CA as ``ssl_ca_file``, and a ``pg_hba.conf`` of ``hostssl`` lines only, ``hostnossl ...
reject``), reached through libpq's parameters in the URL, which psycopg passes on:

    postgresql+psycopg://user@host:5432/leasehold?sslmode=verify-full&sslrootcert=/path/ca.pem
    (+ &sslcert=/path/client.pem&sslkey=/path/client.key for a client certificate)

Proven here: ``upgrade`` and the same sleep apply on a session that ``pg_stat_ssl`` shows
encrypted; that ``sslmode=disable`` is refused (by ``hostnossl ... reject``); that a client
trusting another CA is refused, and one asking for another host name is refused under
``verify-full`` and let in under ``verify-ca``; and that a user whose ``pg_hba.conf`` line is
``hostssl ... cert`` connects with its client certificate and is refused without it. One
``initdb`` for the module.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import text

from leases import fence
from storage import applies, open_database
from storage.database import Database
from storage.errors import LeaseLost, StorageError
from storage.migrate import require_head, upgrade
from storage.states import ApplyState
from tasks.engines.sleep import SleepEngine
from tasks.interrupts import Interrupts
from tasks.runner import ApplyRunner, Outcome
from tests.celery_fixtures import RecordingReporter, run_lease, sleep_apply
from tests.certs import Authority, Issued, make_authority
from tests.conftest import unavailable
from tests.servers import (
    PrivateMariaDB,
    PrivatePostgres,
    TLSFiles,
    private_mariadb,
    private_postgres,
)

DATABASE = "leasehold_tls"
CLIENT_CN = "leasehold-worker"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store-tls")


@pytest.fixture(scope="module")
def server(folder: Path, authority: Authority) -> Iterator[PrivateMariaDB]:
    if importlib.util.find_spec("MySQLdb") is None:
        unavailable("mysqlclient is not installed; run scripts/bootstrap.sh")
    issued = authority.issue("mariadb", hosts=["127.0.0.1", "localhost"])
    tls = TLSFiles(authority.cert_path, issued.cert_path, issued.key_path)
    with private_mariadb(folder / "mariadb", tls=tls, require_secure_transport=True) as server:
        server.execute(f"CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4")
        yield server


@pytest.fixture(scope="module")
def client_cert(authority: Authority, server: PrivateMariaDB) -> Issued:
    """A client certificate, and a user ``worker`` that may connect only with it."""
    issued = authority.issue(CLIENT_CN, client=True)
    subject = f"/CN={CLIENT_CN}"
    server.execute(f"CREATE USER 'worker'@'%' REQUIRE SUBJECT '{subject}'")
    server.execute(f"GRANT ALL ON `{DATABASE}`.* TO 'worker'@'%'")
    return issued


def _url(server: PrivateMariaDB, *, user: str = "root", **query: str | Path) -> str:
    params = "&".join(f"{name}={quote(str(value), safe='/')}" for name, value in query.items())
    return f"mysql+mysqldb://{user}@127.0.0.1:{server.port}/{DATABASE}?{params}"


def _verified(server: PrivateMariaDB, *, user: str = "root", **more: str | Path) -> str:
    """The URL leasehold's docs give: the server checked against our CA and its host name."""
    assert server.tls is not None
    return _url(server, user=user, ssl_ca=server.tls.ca, ssl_mode="VERIFY_IDENTITY", **more)


def _session_tls(db: Database) -> tuple[str, str]:
    with db.transaction() as conn:
        rows = conn.execute(text("SHOW SESSION STATUS LIKE 'Ssl_%'")).all()
    status = {str(name): str(value) for name, value in rows}
    return status["Ssl_version"], status["Ssl_cipher"]


def _refused(url: str, why: str) -> None:
    db = open_database(url, connect_args={"connect_timeout": 5})
    try:
        with pytest.raises(StorageError, match=why), db.transaction() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        db.dispose()


@pytest.mark.mysql
def _an_apply_runs(db: Database) -> None:
    """A whole sleep apply over ``db``: created, dispatched, redeemed, checkpointed, completed;
    then the finished apply's lease admits nothing any more."""
    apply_id = sleep_apply(db, (0.05, 0.05))
    lease = run_lease(db, apply_id)
    runner = ApplyRunner(
        db, lease, SleepEngine(), Interrupts(), RecordingReporter(), progress_interval=0.0
    )
    assert runner.run() == Outcome(ApplyState.COMPLETED)
    row = applies.get(db, apply_id)
    assert (row["state"], row["error"]) == (ApplyState.COMPLETED, None)
    assert [t["state"] for t in applies.tasks(db, apply_id)] == ["completed", "completed"]
    with pytest.raises(LeaseLost), fence(db, lease):
        pass


def test_migrate_and_an_apply_run_over_tls(server: PrivateMariaDB) -> None:
    db = open_database(_verified(server))
    try:
        upgrade(db)  # leasehold migrate
        require_head(db)  # what workers and beat check at start
        version, cipher = _session_tls(db)
        assert cipher, "the store's session is not encrypted"
        assert version.startswith("TLSv1."), version

        _an_apply_runs(db)
    finally:
        db.dispose()


@pytest.mark.mysql
def test_a_plain_connection_is_refused(server: PrivateMariaDB) -> None:
    # MariaDB 10.11 answers an insecure connection with "access denied" (1045).
    _refused(server.url(DATABASE), "Access denied")
    _refused(_url(server, ssl_mode="DISABLED"), "Access denied")
    # ... and only because of require_secure_transport: without it the same URL gets in.
    server.execute("SET GLOBAL require_secure_transport = OFF")
    try:
        db = open_database(server.url(DATABASE))
        try:
            assert _session_tls(db)[1] == ""  # in, and in clear
        finally:
            db.dispose()
    finally:
        server.execute("SET GLOBAL require_secure_transport = ON")


@pytest.mark.mysql
def test_a_server_the_client_cannot_verify_is_refused(
    server: PrivateMariaDB, folder: Path, authority: Authority
) -> None:
    stranger = make_authority(folder / "stranger", "some-other-ca")
    _refused(_url(server, ssl_ca=stranger.cert_path), "certificate")
    # Signed by our CA, but for another host: only VERIFY_IDENTITY checks the name.
    elsewhere = authority.issue("db-elsewhere", hosts=["db.elsewhere.example"])
    tls = TLSFiles(authority.cert_path, elsewhere.cert_path, elsewhere.key_path)
    with private_mariadb(folder / "mariadb-elsewhere", tls=tls) as other:
        other.execute(f"CREATE DATABASE `{DATABASE}`")
        _refused(_verified(other), "certificate failed|SSL")
        # Without VERIFY_IDENTITY the chain alone is checked, and the name is not.
        db = open_database(_url(other, ssl_ca=authority.cert_path))
        try:
            assert _session_tls(db)[1]
        finally:
            db.dispose()


@pytest.mark.mysql
def test_a_client_certificate_user_needs_its_certificate(
    server: PrivateMariaDB, client_cert: Issued
) -> None:
    _refused(_verified(server, user="worker"), "Access denied")
    db = open_database(
        _verified(
            server, user="worker", ssl_cert=client_cert.cert_path, ssl_key=client_cert.key_path
        )
    )
    try:
        with db.transaction() as conn:
            assert conn.execute(text("SELECT CURRENT_USER()")).scalar_one().startswith("worker@")
        assert _session_tls(db)[1]
    finally:
        db.dispose()


def test_postgresql_ssl_parameters_reach_psycopg() -> None:
    if importlib.util.find_spec("psycopg") is None:  # skipped locally, a failure in CI
        unavailable("psycopg is not installed (pip install '.[postgres]')")
    ssl = {
        "sslmode": "verify-full",
        "sslrootcert": "/etc/leasehold/ca.pem",
        "sslcert": "/etc/leasehold/client.pem",
        "sslkey": "/etc/leasehold/client.key",
    }
    query = "&".join(f"{name}={value}" for name, value in ssl.items())
    db = open_database(f"postgresql+psycopg://leasehold@db.example:5432/leasehold?{query}")
    try:
        _, kwargs = db.engine.dialect.create_connect_args(db.engine.url)
    finally:
        db.dispose()
    assert {name: kwargs.get(name) for name in ssl} == ssl


# --- PostgreSQL ----------------------------------------------------------------------------------

PG_CLIENT = "leasehold-pg-worker"  # a role that may connect only with a certificate of this CN


@pytest.fixture(scope="module")
def pg_server(authority: Authority) -> Iterator[PrivatePostgres]:
    if importlib.util.find_spec("psycopg") is None:
        unavailable("psycopg is not installed (pip install '.[postgres]')")
    issued = authority.issue("postgres", hosts=["127.0.0.1", "localhost"])
    tls = TLSFiles(authority.cert_path, issued.cert_path, issued.key_path)
    with private_postgres(tls=tls, cert_users=[PG_CLIENT]) as server:
        server.execute(f"CREATE DATABASE {DATABASE}")
        server.execute(f'CREATE ROLE "{PG_CLIENT}" LOGIN')
        yield server


@pytest.fixture(scope="module")
def pg_client_cert(authority: Authority) -> Issued:
    return authority.issue(PG_CLIENT, client=True)


def _pg_verified(server: PrivatePostgres, *, user: str = "postgres", **more: str | Path) -> str:
    """The URL leasehold's docs give: the server checked against our CA and its host name."""
    assert server.tls is not None
    return server.url(
        DATABASE, user=user, sslmode="verify-full", sslrootcert=str(server.tls.ca), **more
    )


def _pg_session_tls(db: Database) -> tuple[bool, str]:
    with db.transaction() as conn:
        ssl, version = conn.execute(
            text("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        ).one()
    return bool(ssl), str(version)


@pytest.mark.postgres
def test_postgres_migrate_and_an_apply_run_over_tls(pg_server: PrivatePostgres) -> None:
    db = open_database(_pg_verified(pg_server))
    try:
        upgrade(db)  # leasehold migrate
        require_head(db)
        encrypted, version = _pg_session_tls(db)
        assert encrypted, "the store's session is not encrypted"
        assert version.startswith("TLSv1."), version

        _an_apply_runs(db)
        assert _pg_session_tls(db)[0]  # every session of the pool, not only the first
    finally:
        db.dispose()


@pytest.mark.postgres
def test_postgres_a_plain_connection_is_refused(pg_server: PrivatePostgres) -> None:
    # pg_hba.conf's "hostnossl all all 127.0.0.1/32 reject".
    _refused(pg_server.url(DATABASE, sslmode="disable"), "no encryption")
    # sslmode=require: encrypted, nothing verified; in (the refusal above is about TLS only).
    db = open_database(pg_server.url(DATABASE, sslmode="require"))
    try:
        assert _pg_session_tls(db)[0]
    finally:
        db.dispose()


@pytest.mark.postgres
def test_postgres_a_server_the_client_cannot_verify_is_refused(
    pg_server: PrivatePostgres, folder: Path
) -> None:
    stranger = make_authority(folder / "pg-stranger", "some-other-ca")
    _refused(
        pg_server.url(DATABASE, sslmode="verify-full", sslrootcert=str(stranger.cert_path)),
        "certificate verify failed",
    )
    # The right CA, but the client asks for another host (libpq checks ``host`` and connects
    # to ``hostaddr``): verify-full refuses it, verify-ca checks the chain alone and lets it in.
    assert pg_server.tls is not None
    elsewhere = (
        f"postgresql+psycopg://postgres@db.elsewhere.example:{pg_server.port}/{DATABASE}"
        f"?hostaddr=127.0.0.1&sslrootcert={pg_server.tls.ca}&sslmode="
    )
    _refused(elsewhere + "verify-full", "does not match host name")
    db = open_database(elsewhere + "verify-ca")
    try:
        assert _pg_session_tls(db)[0]
    finally:
        db.dispose()


@pytest.mark.postgres
def test_postgres_a_client_certificate_user_needs_its_certificate(
    pg_server: PrivatePostgres, pg_client_cert: Issued, folder: Path
) -> None:
    _refused(_pg_verified(pg_server, user=PG_CLIENT), "requires a valid client certificate")
    # A certificate with the right CN from another CA is no better: the server refuses it in the
    # handshake.
    stranger = make_authority(folder / "pg-stranger-client", "client-stranger-ca")
    forged = stranger.issue(PG_CLIENT, client=True)
    _refused(
        _pg_verified(pg_server, user=PG_CLIENT, sslcert=forged.cert_path, sslkey=forged.key_path),
        "unknown ca",
    )
    db = open_database(
        _pg_verified(
            pg_server,
            user=PG_CLIENT,
            sslcert=pg_client_cert.cert_path,
            sslkey=pg_client_cert.key_path,
        )
    )
    try:
        with db.transaction() as conn:
            assert conn.execute(text("SELECT current_user")).scalar_one() == PG_CLIENT
        assert _pg_session_tls(db)[0]
    finally:
        db.dispose()
