"""The servers ``bench/scale.py`` runs on: a ``redis-server`` of its own (broker and results),
a ``mariadbd`` and a PostgreSQL cluster of its own with room for ``--max-connections`` sessions
(``--servers private``), each stopped by its pid; and the stack of one store: a scratch database
on a private or a shared server, with the ``LEASEHOLD_*`` settings of every process."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from bench import _common, _stores
from bench._scale_proc import children
from bench.failover import Stack
from tests import servers

T = TypeVar("T")

# --- private servers (tests/servers/, with the bench's settings) ---------------------------------

# A private server that cannot start: the suite's helpers skip (or fail, under CI) the test; the
# bench skips the store instead.
_NOT_STARTED = (pytest.skip.Exception, pytest.fail.Exception, RuntimeError, TimeoutError, OSError)


@contextmanager
def _started(what: str, server: AbstractContextManager[T]) -> Iterator[T]:
    with ExitStack() as stack:
        try:
            entered = stack.enter_context(server)
        except _NOT_STARTED as exc:
            raise _common.BackendUnavailable(f"cannot start {what}: {exc}") from exc
        yield entered


@contextmanager
def private_redis(port: int) -> Iterator[str]:
    """A ``redis-server`` of this bench's own on ``port`` (no persistence), stopped by its pid."""
    with (
        tempfile.TemporaryDirectory(prefix="leasehold-scale-redis-") as folder,
        _started("redis-server", servers.private_redis(Path(folder), port=port)) as server,
    ):
        yield server.url()


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.flushdb()
    finally:
        client.close()


@dataclass
class Server:
    """A store server of this bench's own: its server URL and the pid of its main process."""

    url: str
    pid: int
    kind: str

    def pids(self) -> list[int]:
        """MariaDB: one process; PostgreSQL: the postmaster and every backend it forked."""
        if self.kind == _stores.MARIADB:
            return [self.pid]
        return [self.pid, *children(self.pid)]


@contextmanager
def private_mariadb(folder: Path, max_connections: int) -> Iterator[Server]:
    """A ``mariadbd`` of this bench's own (``tests/servers/``, with the shared server's InnoDB
    settings and room for ``max_connections``), stopped by its pid."""
    options = [
        "--innodb-buffer-pool-size=128M",
        "--innodb-log-file-size=96M",
        "--innodb-flush-log-at-trx-commit=1",
        f"--max-connections={max_connections}",
    ]
    with _started("mariadbd", servers.private_mariadb(folder, options=options)) as server:
        yield Server(server.url(), server.pid, _stores.MARIADB)


@contextmanager
def private_postgres(max_connections: int) -> Iterator[Server]:
    """A PostgreSQL cluster of this bench's own (``tests/servers/``: ``initdb``, trust
    authentication, run as the ``postgres`` user), with the shared server's ``shared_buffers``
    and durability and room for ``max_connections``; stopped by the postmaster's pid."""
    settings = {
        "max_connections": str(max_connections),
        "shared_buffers": "128MB",
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
    }
    with _started("postgres", servers.private_postgres(settings=settings)) as server:
        yield Server(server.url(), server.pid, _stores.POSTGRES)


@contextmanager
def store_stack(
    store: str, args: argparse.Namespace, redis_url: str, intervals: Mapping[str, str]
) -> Iterator[tuple[Stack, Server | None]]:
    """Redis + a scratch database on ``store``; the database dropped and Redis emptied at the
    end, also on failure."""
    with tempfile.TemporaryDirectory(prefix="leasehold-scale-") as tmp, ExitStack() as servers:
        folder = Path(tmp)
        server: Server | None = None
        if args.servers == "private":
            if store == _stores.MARIADB:
                (folder / "mariadb").mkdir()
                server = servers.enter_context(
                    private_mariadb(folder / "mariadb", args.max_connections)
                )
                args = argparse.Namespace(**{**vars(args), "mysql_url": server.url})
            else:
                server = servers.enter_context(private_postgres(args.max_connections))
                args = argparse.Namespace(**{**vars(args), "postgres_url": server.url})
            print(
                f"   a private {store} server (pid {server.pid}, max_connections "
                f"{args.max_connections}) at {server.url}",
                flush=True,
            )
        _flush_redis(redis_url)
        try:
            with _stores.scratch(store, args) as url:
                yield stack_on(store, url, redis_url, folder, intervals), server
        finally:
            _flush_redis(redis_url)


def stack_on(
    store: str, database_url: str, redis_url: str, folder: Path, intervals: Mapping[str, str]
) -> Stack:
    """The stack of a migrated database and a Redis database that exist already (broker and
    results), the processes' files in ``folder``: what ``store_stack`` yields, and what the
    suite's smoke run (``tests/e2e/test_scale_smoke.py``) builds on the shared servers."""
    settings = dict(intervals)
    settings.update(
        LEASEHOLD_VAR_DIR=str(folder / "var"),
        LEASEHOLD_DATABASE_URL=database_url,
        LEASEHOLD_BROKER_URL=redis_url,
        LEASEHOLD_RESULT_BACKEND=redis_url,
    )
    return Stack(f"redis-{store}", database_url, redis_url, redis_url, folder, settings)
