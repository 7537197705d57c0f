"""Shared machinery of the fault tests (issue 10: broker blip, network partition, store outage).

Each of those tests breaks a server or a link, so none of them runs on the shared servers of the
``stack`` fixture: a test builds its own deployment (``private_deployment``) on a private
``redis-server`` (``tests/servers/``: broker on database 0, results on 1) and on a store of its
own (a private ``mariadbd``, or a scratch database on the shared MariaDB), and its own
``Cluster`` of real celery processes (``fault_cluster``), whose logs are attached to the report of
a failing test like the ``cluster`` fixture's.

``namespaced_worker`` starts a worker inside a network namespace (``ip netns exec``), reaching
the store and Redis only through ``socat`` forwarders on the host side of veth pairs; the Redis
forwarder lives on a second pair (``Link``), so that Redis alone can be cut.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from sqlalchemy import select

from storage import applies, open_database
from storage.migrate import upgrade
from storage.tables import metadata
from tasks.testing.processes import CeleryProcess, worker
from tests.e2e.conftest import attach_cluster
from tests.e2e.helpers import (
    PROCESS_START_TIMEOUT,
    Cluster,
    Stack,
    assert_completed_once,
    assert_epochs_non_decreasing,
    assert_requests_ended,
    client_app,
    close_client,
    describe,
    die_with_parent,
    logs,
    process_env,
)
from tests.servers import START_TIMEOUT, Namespace, PrivateRedis, _kill, _wait_port


@contextmanager
def private_deployment(folder: Path, *, database_url: str, redis: PrivateRedis) -> Iterator[Stack]:
    """A deployment on servers of the test's own: ``database_url`` migrated, Redis broker and
    result backend on ``redis``."""
    values = {
        "LEASEHOLD_DATABASE_URL": database_url,
        "LEASEHOLD_BROKER_URL": redis.url(0),
        "LEASEHOLD_RESULT_BACKEND": redis.url(1),
        "LEASEHOLD_VAR_DIR": str(folder / "var"),
    }
    env = process_env(values)
    db = open_database(database_url)
    upgrade(db)
    client = client_app(env)
    try:
        yield Stack("redis", folder, database_url, env, db, client, redis=True)
    finally:
        # kombu keeps broker connections in process-wide pools keyed by URL; this Redis goes
        # away with the test, so its pooled connections must not be left for the collector.
        client.amqp.producer_pool.force_close_all()
        client.pool.force_close_all()
        close_client(client)
        db.dispose()


@contextmanager
def fault_cluster(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The processes of one test on ``stack``; all stopped afterwards, logs attached on failure."""
    cluster = Cluster(stack)
    attach_cluster(request, cluster)
    cluster.begin_test()
    try:
        yield cluster
    finally:
        cluster.close()


def assert_history_sound(stack: Stack) -> None:
    """What the ``cluster`` fixture checks after every passing test, for every apply: epochs
    never go down in its log, and no control request outlived it."""
    for apply_id in all_ids(stack):
        assert_epochs_non_decreasing(stack.db, apply_id)
        assert_requests_ended(stack.db, apply_id)


def all_ids(stack: Stack) -> list[int]:
    table = metadata.tables["applies"]
    with stack.db.transaction() as conn:
        return [int(i) for i in conn.execute(select(table.c.id).order_by(table.c.id)).scalars()]


def assert_each_task_done_once(stack: Stack, apply_id: int) -> None:
    """Completed exactly once (one terminal event), and every apply task completed by exactly
    one ``task_completed`` line: nothing was written twice."""
    db = stack.db
    assert_completed_once(db, apply_id)
    entries = logs(db, apply_id)
    terminal = [e for e in entries if e.event in ("completed", "failed", "cancelled")]
    assert len(terminal) == 1, describe(db, apply_id)
    tasks = applies.tasks(db, apply_id)
    for task in tasks:
        label = f"{task['position'] + 1}/{len(tasks)}: {task['table_name']}"
        done = [e for e in entries if e.event == "task_completed" and e.message.endswith(label)]
        assert len(done) == 1, f"{label} completed {len(done)} times\n{describe(db, apply_id)}"


# --- partitions ----------------------------------------------------------------------------------


class Link:
    """A second veth pair from this host into ``ns`` (its own /28, in 10.214.0.0/16 beside the
    namespace's 10.213.0.0/16), with forwarders of its own: cutting it cuts only what it
    forwards."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.host_if = "lhr" + ns.host_if[3:]
        self.ns_if = "lhs" + ns.ns_if[3:]
        self.host_ip = ns.host_ip.replace("10.213.", "10.214.", 1)
        self.ns_ip = ns.ns_ip.replace("10.213.", "10.214.", 1)
        self.forwarders: list[subprocess.Popen[bytes]] = []
        self._created = False

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def create(self) -> Link:
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._created = True
        self._ip("link", "set", self.ns_if, "netns", self.ns.name)
        self._ip("addr", "add", f"{self.host_ip}/28", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self._ip("-n", self.ns.name, "addr", "add", f"{self.ns_ip}/28", "dev", self.ns_if)
        self._ip("-n", self.ns.name, "link", "set", self.ns_if, "up")
        return self

    def forward(self, port: int) -> tuple[str, int]:
        proc = subprocess.Popen(
            [
                "socat",
                f"TCP-LISTEN:{port},bind={self.host_ip},fork,reuseaddr",
                f"TCP:127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.forwarders.append(proc)
        _wait_port(self.host_ip, port, START_TIMEOUT, proc)
        return self.host_ip, port

    def cut(self) -> None:
        self._ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        self._ip("link", "set", self.host_if, "up")

    def close(self) -> None:
        for proc in self.forwarders:
            _kill(proc)
        if self._created:
            with suppress(subprocess.CalledProcessError):
                self._ip("link", "del", self.host_if)


@contextmanager
def link(ns: Namespace) -> Iterator[Link]:
    extra = Link(ns)
    try:
        yield extra.create()
    finally:
        extra.close()


_SERIAL = itertools.count(1)


def namespaced_worker(
    cluster: Cluster,
    ns: Namespace,
    *,
    env: Mapping[str, str],
    apply_slots: int = 2,
    name: str = "nsw",
) -> CeleryProcess:
    """A worker of ``cluster`` run inside ``ns`` (``ip netns exec``), with ``env`` (the store and
    Redis URLs through the forwarders) over the stack's settings; started and ready."""
    name = f"{name}{next(_SERIAL)}"  # unique in the run: its log file is its own
    proc = die_with_parent(
        worker(
            name,
            env={**cluster.stack.env, **env},
            cwd=cluster.stack.folder,
            logfile=cluster.stack.folder / "logs" / f"{name}.log",
            apply_slots=apply_slots,
        )
    )
    (cluster.stack.folder / "logs").mkdir(exist_ok=True)
    # ``ip netns exec`` enters the namespace and execs the command in place: same pid, same
    # process group, and the parent-death signal set by die_with_parent still applies.
    proc.argv = ns.command(list(proc.argv))
    cluster.own.append(proc)
    proc.start()
    proc.wait_ready(PROCESS_START_TIMEOUT)
    return proc


def pid_in(owner: str | None, proc: CeleryProcess) -> bool:
    """True if the lease owner string (``hostname/pid/task_id``) names ``proc``."""
    return owner is not None and owner.split("/")[1] == str(proc.pid)


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
