"""Fixtures of the end-to-end suite: every test runs on Redis + MariaDB and on the embedded
default, and on PostgreSQL + Redis or RabbitMQ + MariaDB where the module is about the store or
the broker (a module's ``STACKS``). The stacks:

- ``redis``: Redis broker (database 11) + Redis result backend (database 12) + a MariaDB/MySQL
  database created for the module and dropped after it. Skipped locally (failed in CI) when
  Redis or MariaDB does not answer.
- ``postgres``: the same Redis databases + a PostgreSQL database of the module's own.
- ``rabbitmq``: RabbitMQ (``amqp://``) in a vhost of the module's own, made with
  ``rabbitmqctl add_vhost`` and deleted after it, + the Redis result backend (database 12) + a
  MariaDB/MySQL database.
- ``sqlite``: the embedded default: a SQLite file, kombu's ``filesystem://`` broker and the
  SQLite result backend under ``LEASEHOLD_VAR_DIR`` in a temporary folder.

Processes are real ``celery worker`` / ``celery beat`` processes configured only through
``LEASEHOLD_*`` variables. Every process is stopped in teardown, failing test or not (and is
killed by the kernel if pytest itself dies), and the logs of the failing test's processes are
attached to its report. Measured failover times are printed under "leasehold e2e timings".

``LEASEHOLD_TEST_REDIS_URL`` names another Redis server (default ``redis://127.0.0.1:6379``;
databases 11 and 12 on it). One run at a time uses them (a lock file in the temp folder), and a
run refuses to start next to workers still consuming from database 11. ``-m "not slow"``
leaves the whole suite out.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Generator, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from storage import open_database
from storage.migrate import upgrade
from tests import support
from tests.conftest import scratch_mysql_database, scratch_postgres_database, unavailable
from tests.e2e.helpers import (
    Cluster,
    Stack,
    all_apply_ids,
    assert_epochs_non_decreasing,
    assert_requests_ended,
    client_app,
    close_client,
    process_env,
)

REDIS_URL = os.environ.get("LEASEHOLD_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
# The RabbitMQ server (no vhost): each module's vhost is made under it.
AMQP_URL = os.environ.get("LEASEHOLD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672").rstrip(
    "/"
)
AMQP_USER = urlsplit(AMQP_URL).username or "guest"
# The only Redis databases this suite touches (and flushes).
BROKER_DB, RESULTS_DB = 11, 12
LOCK_WAIT = 60.0  # seconds another run may hold those databases before this one gives up

_CLUSTER = pytest.StashKey[Cluster]()
_TIMINGS = pytest.StashKey[list[str]]()
_PASSED = pytest.StashKey[bool]()
_ALL: list[Cluster] = []


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if pytest dies between setup and teardown: no celery process outlives it."""
    for cluster in _ALL:
        for proc in [*cluster.shared, *cluster.own]:
            if proc.proc is not None and proc.proc.poll() is None:
                with suppress(OSError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def _exclusive_redis_databases() -> Iterator[None]:
    """One e2e run at a time on Redis databases 11 and 12 on this machine: two runs would
    consume each other's messages and flush each other's results."""
    path = Path(tempfile.gettempdir()) / f"leasehold-e2e-redis-{BROKER_DB}-{RESULTS_DB}.lock"
    with open(path, "a") as lock:
        if not support.flock_within(lock, LOCK_WAIT):
            unavailable(
                f"another test run kept Redis databases {BROKER_DB}/{RESULTS_DB} "
                f"busy for {LOCK_WAIT:g}s ({path})"
            )
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _foreign_consumers(probe: redis.Redis) -> list[str]:
    """Connections consuming from our broker database (kombu consumers block in BRPOP): workers
    left behind by an earlier run would steal this run's messages. The test process itself
    never consumes from it."""
    return [
        str(c.get("addr"))
        for c in probe.client_list()
        if int(c.get("db", -1)) == BROKER_DB and c.get("cmd") == "brpop"
    ]


@contextmanager
def _redis_stack(
    folder: Path, store: str = "mysql", broker: str = "redis"
) -> Iterator[dict[str, str]]:
    """Redis for results (and the broker unless ``broker`` is ``rabbitmq``) + a scratch database
    on the ``store`` server (``mysql`` or ``postgres``)."""
    if store == "mysql" and importlib.util.find_spec("MySQLdb") is None:
        unavailable("mysqlclient is not installed; run scripts/bootstrap.sh")
    clients = [redis.Redis.from_url(f"{REDIS_URL}/{n}") for n in (BROKER_DB, RESULTS_DB)]
    try:
        for client in clients:
            client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {REDIS_URL} is not reachable: {exc}")
    with _exclusive_redis_databases():
        others: list[str] = []
        deadline = time.monotonic() + 15
        while (others := _foreign_consumers(clients[0])) and time.monotonic() < deadline:
            time.sleep(0.5)  # e.g. the processes of a run that just ended, still stopping
        if others:
            unavailable(
                f"{len(others)} connections consume from Redis database {BROKER_DB} (celery "
                "workers left behind by a killed run?) and would steal this run's messages: "
                f"{', '.join(others[:4])}"
            )
        database = (
            scratch_postgres_database("leasehold_e2e")
            if store == "postgres"
            else _mariadb_database()
        )
        with database as url, _broker(broker) as broker_url:
            try:
                for client in clients:
                    client.flushdb()
                yield {
                    "LEASEHOLD_DATABASE_URL": url,
                    "LEASEHOLD_BROKER_URL": broker_url,
                    "LEASEHOLD_RESULT_BACKEND": f"{REDIS_URL}/{RESULTS_DB}",
                    "LEASEHOLD_VAR_DIR": str(folder / "var"),
                }
            finally:
                for client in clients:
                    with suppress(redis.RedisError):
                        client.flushdb()
                    client.close()


def _broker(kind: str) -> AbstractContextManager[str]:
    if kind == "rabbitmq":
        return rabbitmq_vhost("leasehold_e2e")
    return nullcontext(f"{REDIS_URL}/{BROKER_DB}")


@contextmanager
def rabbitmq_vhost(prefix: str) -> Iterator[str]:
    """A RabbitMQ vhost of our own (``prefix`` + random suffix) on the server at
    ``LEASEHOLD_TEST_AMQP_URL``, made with ``rabbitmqctl`` (guest may use it) and deleted after;
    yields the broker URL. Never touches another vhost."""
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl is not installed (Debian: rabbitmq-server)")
    vhost = f"{prefix}_{uuid.uuid4().hex[:10]}"
    made = _rabbitmqctl("add_vhost", vhost)
    if made.returncode != 0:
        unavailable(f"RabbitMQ does not answer rabbitmqctl add_vhost: {made.stderr.strip()}")
    try:
        granted = _rabbitmqctl("set_permissions", "-p", vhost, AMQP_USER, ".*", ".*", ".*")
        assert granted.returncode == 0, granted.stderr
        yield f"{AMQP_URL}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _mariadb_database() -> AbstractContextManager[str]:
    """A database of our own on the MariaDB/MySQL server, dropped afterwards."""
    return scratch_mysql_database("leasehold_e2e")


@contextmanager
def _sqlite_stack(folder: Path) -> Iterator[dict[str, str]]:
    # The embedded default: only the database file and the var folder are named; the broker
    # (filesystem://) and the result backend (SQLite) are celeryconfig's defaults.
    yield {
        "LEASEHOLD_DATABASE_URL": f"sqlite:///{folder / 'leasehold.sqlite3'}",
        "LEASEHOLD_VAR_DIR": str(folder / "var"),
    }


ALL_STACKS = frozenset({"redis", "postgres", "rabbitmq", "sqlite"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A module that names ``STACKS`` runs on those stacks only: a module about the broker
    (poison, Flower's events) gains nothing from another store, so the suite stays inside its
    time budget. Every module runs on Redis + MariaDB and on the embedded default."""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        kind = callspec.params.get("stack") if callspec is not None else None
        wanted = getattr(getattr(item, "module", None), "STACKS", ALL_STACKS)
        (kept if kind is None or kind in wanted else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def stack_settings(kind: str, folder: Path) -> AbstractContextManager[dict[str, str]]:
    """The ``LEASEHOLD_*`` values of a deployment of ``kind`` (redis, postgres, rabbitmq,
    sqlite) whose files live in ``folder``."""
    if kind == "redis":
        return _redis_stack(folder)
    if kind == "postgres":
        return _redis_stack(folder, store="postgres")
    if kind == "rabbitmq":
        return _redis_stack(folder, broker="rabbitmq")
    return _sqlite_stack(folder)


@pytest.fixture(
    scope="module",
    params=["redis", "postgres", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq), "sqlite"],
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A fresh deployment per module and stack: its own database, broker and results."""
    kind = str(request.param)
    folder = tmp_path_factory.mktemp(f"e2e-{kind}")
    settings = stack_settings(kind, folder)
    with settings as values:
        env = process_env(values)
        db = open_database(values["LEASEHOLD_DATABASE_URL"])
        upgrade(db)
        client = client_app(env)
        try:
            url = values["LEASEHOLD_DATABASE_URL"]
            yield Stack(kind, folder, url, env, db, client, redis=kind in ("redis", "postgres"))
        finally:
            close_client(client)
            db.dispose()


@pytest.fixture(scope="module")
def module_cluster(stack: Stack) -> Iterator[Cluster]:
    cluster = Cluster(stack)
    _ALL.append(cluster)
    try:
        yield cluster
    finally:
        cluster.close()
        _ALL.remove(cluster)


@pytest.fixture
def cluster(module_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The stack's processes for one test, with empty leasehold tables. Processes the test
    starts are stopped after it (SIGCONT, SIGTERM, then SIGKILL). After a passing test, every
    apply's log must have non-decreasing epochs (invariant 5), and no control request may be
    pending on a finished apply, whatever the test looked at."""
    db = module_cluster.stack.db
    support.wipe(db)
    module_cluster.begin_test()
    request.node.stash[_CLUSTER] = module_cluster
    try:
        yield module_cluster
    finally:
        module_cluster.end_test()
    if request.node.stash.get(_PASSED, False):
        for apply_id in all_apply_ids(db):
            assert_epochs_non_decreasing(db, apply_id)
            assert_requests_ended(db, apply_id)


def attach_cluster(request: pytest.FixtureRequest, cluster: Cluster) -> None:
    """Attach ``cluster``'s process logs to the report of the requesting test if it fails, as
    the ``cluster`` fixture does (for tests that build their own deployment: e2e/faults.py)."""
    request.node.stash[_CLUSTER] = cluster


@pytest.fixture
def timing(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Lines for the 'leasehold e2e timings' summary at the end of the run."""
    lines: list[str] = []
    yield lines
    summary = request.config.stash.setdefault(_TIMINGS, [])
    summary.extend(f"{request.node.nodeid}: {line}" for line in lines)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_PASSED] = report.passed
    cluster = item.stash.get(_CLUSTER, None)
    if report.failed and cluster is not None:
        for title, body in cluster.log_sections():
            report.sections.append((f"{title} [{report.when}]", body))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_TIMINGS, [])
    if lines:
        terminalreporter.section("leasehold e2e timings")
        for line in lines:
            terminalreporter.write_line(line)
