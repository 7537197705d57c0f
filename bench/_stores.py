"""The stores a benchmark can measure side by side in one run (MariaDB/MySQL, PostgreSQL, SQLite):
a scratch database per store, created, migrated and dropped here, and the engine each store is
opened with. A store that does not answer raises ``_common.BackendUnavailable``: the benchmark
prints a loud ``SKIPPED, NOT MEASURED`` line for it and goes on with the others."""

from __future__ import annotations

import argparse
import importlib.util
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench import _common
from storage.database import Database, open_database

MARIADB, POSTGRES, SQLITE = "mariadb", "postgres", "sqlite"
STORES = (MARIADB, POSTGRES, SQLITE)
SERVERS = (MARIADB, POSTGRES)

# A server URL whose database is the maintenance database the scratch databases are made from.
POSTGRES_SERVER_ENV = "LEASEHOLD_BENCH_POSTGRES_URL"
DEFAULT_POSTGRES_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def postgres_server_url() -> str:
    return os.environ.get(POSTGRES_SERVER_ENV) or DEFAULT_POSTGRES_SERVER


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--isolation``, ``--mysql-url`` and ``--postgres-url``, as every store bench takes them."""
    parser.add_argument(
        "--isolation",
        default="READ COMMITTED",
        choices=["READ COMMITTED", "REPEATABLE READ"],
        help="MariaDB and PostgreSQL isolation level (default READ COMMITTED, leasehold's default)",
    )
    parser.add_argument(
        "--mysql-url",
        default=_common.mysql_server_url(),
        help=f"MariaDB/MySQL server URL; scratch databases are created there and dropped "
        f"(default ${_common.MYSQL_SERVER_ENV} or {_common.DEFAULT_MYSQL_SERVER})",
    )
    parser.add_argument(
        "--postgres-url",
        default=postgres_server_url(),
        help=f"PostgreSQL server URL (its database is the maintenance database); scratch "
        f"databases are created there and dropped "
        f"(default ${POSTGRES_SERVER_ENV} or {DEFAULT_POSTGRES_SERVER})",
    )


def parse_stores(parser: argparse.ArgumentParser, flag: str, value: str) -> list[str]:
    stores = [s.strip() for s in value.split(",") if s.strip()]
    unknown = sorted(set(stores) - set(STORES))
    if unknown or not stores:
        parser.error(
            f"{flag}: unknown {unknown}; use a comma-separated subset of {','.join(STORES)}"
        )
    return stores


@contextmanager
def scratch_postgres(server_url: str) -> Iterator[str]:
    """A fresh, migrated ``leasehold_bench_<hex>`` database on the PostgreSQL server; dropped at
    the end (ending any session still connected to it), also when the benchmark fails or is
    interrupted. Yields its URL."""
    if importlib.util.find_spec("psycopg") is None:
        raise _common.BackendUnavailable("psycopg is not installed (pip install '.[postgres]')")
    server = make_url(server_url)
    name = f"leasehold_bench_{uuid.uuid4().hex[:12]}"
    # CREATE/DROP DATABASE cannot run inside a transaction block.
    admin = create_engine(server, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        try:
            with admin.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name}"))
        except Exception as exc:
            raise _common.BackendUnavailable(
                f"PostgreSQL at {server.render_as_string()} is unreachable: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from exc
        try:
            url = server.set(database=name).render_as_string(hide_password=False)
            _common._migrate(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    finally:
        admin.dispose()


def scratch(store: str, args: argparse.Namespace) -> AbstractContextManager[str]:
    """A scratch database on ``store``, migrated; its URL."""
    if store == MARIADB:
        return _common.scratch_mysql(args.mysql_url)
    if store == POSTGRES:
        return scratch_postgres(args.postgres_url)
    return _common.scratch_sqlite()


def open_store(store: str, url: str, args: argparse.Namespace) -> Database:
    """One engine with one pooled connection on a server store (pre-ping on, as in production,
    at ``--isolation``); SQLite as leasehold opens it."""
    if store in SERVERS:
        return open_database(url, isolation_level=args.isolation, pool_size=1, max_overflow=0)
    return open_database(url)


def is_postgres(db: Database) -> bool:
    return db.dialect == "postgresql"


def key_line(figures: Sequence[tuple[str, str]]) -> str:
    return " ".join(f"{key}={value}" for key, value in figures)
