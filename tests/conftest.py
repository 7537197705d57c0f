"""Backends for the contract suite: every test taking ``db`` runs on real SQLite, real
MariaDB/MySQL and real PostgreSQL. A missing server is skipped locally with a loud reason, and
fails when CI is set (dramatiq's fixtures do the same)."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from storage import open_database
from storage.database import Database
from storage.migrate import upgrade
from tests import races, support
from tests.certs import Authority, Issued, make_authority

CI = bool(os.environ.get("CI"))
MYSQL_SERVER_URL = os.environ.get(
    "LEASEHOLD_TEST_MYSQL_URL", "mysql+mysqldb://root@127.0.0.1:3306/"
)
# A server URL whose database is the maintenance database the scratch databases are made from.
POSTGRES_SERVER_URL = os.environ.get(
    "LEASEHOLD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


# The parameters that choose the store a test item runs on, and the value that means MariaDB/MySQL
# (the e2e stacks named "redis" are MariaDB + Redis); and fixtures that are MariaDB themselves.
# Not marked: tests of the MySQL driver against a closed port, which need no server.
MYSQL_PARAMS: dict[str, frozenset[str]] = {
    "backend_url": frozenset({"mysql"}),  # the contract fixtures: db, open_db
    "worker_url": frozenset({"mysql"}),  # in-process workers (test_inprocess)
    "worker": frozenset({"mysql"}),  # in-process workers with apply slots (test_slots)
    "fresh": frozenset({"mysql"}),  # empty stores (test_migrations)
    "stack": frozenset({"redis", "rabbitmq"}),  # e2e deployments (MariaDB stores)
    "base": frozenset({"redis"}),  # e2e GitHub chaos
}
MYSQL_FIXTURES = frozenset({"mysql_server", "target_url"})
# Likewise for PostgreSQL: the parameter values that mean it, and fixtures that are it.
POSTGRES_VALUES = frozenset({"postgres"})
POSTGRES_FIXTURES = frozenset({"postgres_server"})


def runs_on_mysql(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    if any(params.get(name) in values for name, values in MYSQL_PARAMS.items()):
        return True
    return bool(MYSQL_FIXTURES & set(getattr(item, "fixturenames", ())))


def runs_on_postgres(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    if any(params.get(name) in POSTGRES_VALUES for name in MYSQL_PARAMS):
        return True
    return bool(POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every item that runs on MariaDB/MySQL ``mysql`` and every one on PostgreSQL
    ``postgres``, so that ``-m "not mysql and not postgres"`` runs the SQLite part alone."""
    for item in items:
        if runs_on_mysql(item) and item.get_closest_marker("mysql") is None:
            item.add_marker(pytest.mark.mysql)
        if runs_on_postgres(item) and item.get_closest_marker("postgres") is None:
            item.add_marker(pytest.mark.postgres)


def unavailable(reason: str) -> None:
    """Skip locally; in CI a missing service is a failure, never a silent skip."""
    if CI:
        pytest.fail(f"CI is set but {reason}", pytrace=False)
    pytest.skip(f"SKIPPED, NOT TESTED: {reason}")


@dataclass(frozen=True)
class _Server:
    """A database server the suite makes scratch databases on."""

    label: str  # for messages
    driver: str  # the module that must be importable
    admin_url: URL  # where CREATE and DROP DATABASE run
    url: URL  # a scratch database's URL is this with the database set
    create: tuple[str, ...]  # statements, ``{name}`` for the database
    drop: str
    admin_options: dict[str, str]


def _mysql() -> _Server:
    server = make_url(MYSQL_SERVER_URL)
    return _Server(
        "MySQL/MariaDB",
        "MySQLdb",
        server.set(database=None),
        server,
        ("CREATE DATABASE {name} CHARACTER SET utf8mb4",),
        "DROP DATABASE IF EXISTS {name}",
        {},
    )


def _postgres() -> _Server:
    server = make_url(POSTGRES_SERVER_URL)
    return _Server(
        "PostgreSQL",
        "psycopg",
        server,
        server,
        (
            "CREATE DATABASE {name}",
            # A test database needs no durability, and a flush per commit is most of a test's
            # time on a busy disk; a server crash is never survived by a test run anyway.
            "ALTER DATABASE {name} SET synchronous_commit = off",
        ),
        # WITH (FORCE): ends any session still connected to it, e.g. a killed worker's.
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)",
        # CREATE and DROP DATABASE cannot run inside a transaction block.
        {"isolation_level": "AUTOCOMMIT"},
    )


@contextmanager
def _scratch_database(server: _Server, prefix: str) -> Iterator[str]:
    """A database of our own (``prefix`` + random suffix) on ``server``; yields its URL and drops
    it afterwards. Never touches another database. An unreachable server is ``unavailable()``:
    a skip locally, a failure in CI."""
    if importlib.util.find_spec(server.driver) is None:
        unavailable(f"{server.driver} is not installed; run scripts/bootstrap.sh")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server.admin_url, pool_pre_ping=True, **server.admin_options)
    try:
        with admin.connect() as conn:
            for statement in server.create:
                conn.execute(text(statement.format(name=name)))
            conn.commit()
    except Exception as exc:
        admin.dispose()
        shown = server.admin_url.render_as_string()
        unavailable(f"{server.label} at {shown} is not reachable: {exc}")
    try:
        yield server.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(server.drop.format(name=name)))
            conn.commit()
        admin.dispose()


def scratch_mysql_database(prefix: str) -> AbstractContextManager[str]:
    """A scratch database on the MySQL/MariaDB server at ``LEASEHOLD_TEST_MYSQL_URL``."""
    return _scratch_database(_mysql(), prefix)


def scratch_postgres_database(prefix: str) -> AbstractContextManager[str]:
    """A scratch database on the PostgreSQL server at ``LEASEHOLD_TEST_POSTGRES_URL``."""
    return _scratch_database(_postgres(), prefix)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A scratch database on the PostgreSQL server, migrated; dropped at the end."""
    with scratch_postgres_database("leasehold_test") as url:
        db = open_database(url)
        upgrade(db)
        db.dispose()
        yield url


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[str]:
    """A scratch database on the MySQL/MariaDB server, migrated; dropped at the end."""
    with scratch_mysql_database("leasehold_test") as url:
        db = open_database(url)
        upgrade(db)
        db.dispose()
        yield url


@pytest.fixture(scope="session")
def sqlite_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'leasehold.sqlite3'}"
    db = open_database(url)
    upgrade(db)
    db.dispose()
    return url


# The session fixture that is each store, migrated: what a test parametrized by store asks for.
STORE_FIXTURES = {"sqlite": "sqlite_file", "mysql": "mysql_server", "postgres": "postgres_server"}


@pytest.fixture(params=list(STORE_FIXTURES))
def backend_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(STORE_FIXTURES[request.param]))


@pytest.fixture
def open_db(backend_url: str) -> Iterator[Callable[..., Database]]:
    """Open more databases (own engines, own pools) on the same backend, e.g. at another
    isolation level; all are disposed after the test."""
    opened: list[Database] = []

    def _open(**kwargs: object) -> Database:
        db = open_database(backend_url, **kwargs)  # type: ignore[arg-type]
        opened.append(db)
        return db

    yield _open
    for db in opened:
        db.dispose()


@pytest.fixture
def db(open_db: Callable[..., Database]) -> Database:
    """A database on the current backend, emptied before the test."""
    database = open_db()
    support.wipe(database)
    return database


@pytest.fixture
def spawn() -> Iterator[races.Spawn]:
    """Threads whose outcome a test inspects (``tests/races.py``); at teardown every one is
    joined with a timeout, so none outlives its test."""
    yield from races.spawner()


# --- certificates (tests/certs.py) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    """A CA of the module's own, for the TLS tests' servers and clients."""
    return make_authority(tmp_path_factory.mktemp("pki"), "leasehold-test-ca")


@pytest.fixture(scope="module")
def client_cert(authority: Authority) -> Issued:
    """A client certificate from ``authority`` (CN=leasehold-worker)."""
    return authority.issue("leasehold-worker", client=True)
