"""What the benchmarks share: scratch databases (created and dropped here), a running lease to
write under, and the arithmetic of medians. Benchmarks print figures; they never assert on time."""

from __future__ import annotations

import importlib.util
import itertools
import os
import statistics
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from leases import Lease, dispatch, redeem
from storage import applies as applies_repo
from storage.database import Database, open_database
from storage.migrate import upgrade

# The server, not a database: each run creates (and drops) a database of its own there.
MYSQL_SERVER_ENV = "LEASEHOLD_BENCH_MYSQL_URL"
DEFAULT_MYSQL_SERVER = "mysql+mysqldb://root@127.0.0.1:3306/"


def mysql_server_url() -> str:
    return os.environ.get(MYSQL_SERVER_ENV) or DEFAULT_MYSQL_SERVER


class BackendUnavailable(Exception):
    """The benchmark cannot run on this backend here (no driver, no server)."""


@contextmanager
def scratch_mysql(server_url: str) -> Iterator[str]:
    """A fresh, migrated ``leasehold_bench_<hex>`` database on the server; dropped at the end,
    also when the benchmark fails or is interrupted. Yields its URL."""
    if importlib.util.find_spec("MySQLdb") is None:
        raise BackendUnavailable("mysqlclient is not installed (pip install '.[mysql]')")
    server = make_url(server_url).set(database=None)
    name = f"leasehold_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, pool_pre_ping=True)
    try:
        try:
            with admin.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
        except Exception as exc:
            raise BackendUnavailable(
                f"MariaDB/MySQL at {server.render_as_string()} is unreachable: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from exc
        try:
            url = server.set(database=name).render_as_string(hide_password=False)
            _migrate(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
    finally:
        admin.dispose()


@contextmanager
def scratch_sqlite() -> Iterator[str]:
    """A fresh, migrated SQLite file (WAL) in a temporary directory. Yields its URL."""
    with tempfile.TemporaryDirectory(prefix="leasehold-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.sqlite3'}"
        _migrate(url)
        yield url


def _migrate(url: str) -> None:
    db = open_database(url)
    try:
        upgrade(db)
    finally:
        db.dispose()


_DATABASES = itertools.count(1)


def running_lease(db: Database, *, tasks: int = 1) -> tuple[Lease, list[int]]:
    """A new apply, dispatched and redeemed: the lease of a running worker, and its task ids."""
    created = applies_repo.create(
        db,
        applies_repo.NewApply(
            database_name=f"shop{next(_DATABASES)}",  # a line of its own: runs at once
            environment="bench",
            engine="sleep",
            tasks=[
                applies_repo.NewTask(f"t{i}", f"ALTER TABLE t{i} ADD c INT") for i in range(tasks)
            ],
        ),
    )
    lease = dispatch(db, created.apply_id)
    redeem(db, lease, "bench-worker")
    task_ids = [int(row["id"]) for row in applies_repo.tasks(db, created.apply_id)]
    return lease, task_ids


def median_us(samples_ns: Sequence[int]) -> float:
    """Median of nanosecond samples, in microseconds."""
    return statistics.median(samples_ns) / 1000.0


def percentile_us(samples_ns: Sequence[int], fraction: float) -> float:
    ordered = sorted(samples_ns)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index] / 1000.0


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")
