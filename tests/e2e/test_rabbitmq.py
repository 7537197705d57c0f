"""RabbitMQ's ``consumer_timeout`` against leasehold's long applies (issue 12).

RabbitMQ closes a channel that keeps a delivery unacknowledged longer than ``consumer_timeout``
(30 minutes by default), and schema applies run for hours. leasehold acknowledges ``run_apply``
when the apply starts (``task_acks_late = False``, celeryconfig.py), and a worker whose apply
slots are all busy gives any further ``run_apply`` back to the queue at once and stops consuming
the apply queue (tasks/slots.py); so no channel of a worker ever holds a delivery for the length
of an apply. This module proves it on a real server with the timeout lowered to seconds.

How the timeout is lowered: RabbitMQ before 3.11.15 has no per-queue or per-consumer timeout
(this suite's server may be 3.10), only the node's ``rabbit.consumer_timeout``, which a channel
reads once, when it opens; the check runs on the channel's tick
(``rabbit.channel_tick_interval``, 60 s by default), re-read at every tick. So the test lowers
the tick (harmless to other channels: a more frequent check of their own timeout) for its
duration, lowers ``consumer_timeout`` only while the worker and a canary channel open (a few
seconds), and gives both back in ``finally``. A canary channel that keeps one delivery
unacknowledged shows that channels opened in that window really do time out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import connection as kombu_connection

from storage import open_database
from storage.migrate import upgrade
from tests.e2e import rabbitmq
from tests.e2e.conftest import stack_settings
from tests.e2e.faults import fault_cluster
from tests.e2e.helpers import (
    RESULT_TIMEOUT,
    SLACK,
    Cluster,
    Stack,
    assert_completed_once,
    client_app,
    close_client,
    logs,
    process_env,
    row,
    seconds_between,
    sleep_payload,
    submit_task,
    wait_for,
    wait_log,
    wait_state,
)

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]

Connection: Any = kombu_connection.Connection  # kombu is untyped

CONTROL = "leasehold"
APPLIES = "leasehold.applies"
TIMEOUT_MS = 3000  # the lowered consumer_timeout
TICK_MS = 500  # how often channels check it while lowered
LONG = 5 * TIMEOUT_MS / 1000  # an apply that outlives the timeout five times over
# Signs in a worker's log that its broker channel or connection broke.
BROKEN = (
    "PRECONDITION_FAILED",
    "PreconditionFailed",
    "delivery acknowledgement",
    "Connection to broker lost",
    "consumer: Cannot connect",
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The ``rabbitmq`` deployment of the e2e suite (a vhost of the module's own), alone: these
    tests mean nothing on another broker."""
    folder = tmp_path_factory.mktemp("e2e-rabbitmq-timeout")
    with stack_settings("rabbitmq", folder) as values:
        env = process_env(values)
        db = open_database(values["LEASEHOLD_DATABASE_URL"])
        upgrade(db)
        client = client_app(env)
        try:
            yield Stack(
                "rabbitmq", folder, values["LEASEHOLD_DATABASE_URL"], env, db, client, False
            )
        finally:
            close_client(client)
            db.dispose()


@pytest.fixture
def cluster(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with fault_cluster(stack, request) as cluster:
        yield cluster


class Canary:
    """A channel that takes one message and never acknowledges it: what a worker that acked
    late (or prefetched behind a long task) would do."""

    def __init__(self, url: str) -> None:
        self.connection: Any = Connection(url)
        self.connection.connect()
        self.channel = self.connection.channel()
        self.channel.queue_declare("canary", durable=False, auto_delete=False)
        message = self.channel.prepare_message(b"held")
        self.channel.basic_publish(message, exchange="", routing_key="canary")
        self.held: list[Any] = []
        self.channel.basic_consume("canary", callback=self.held.append, no_ack=False)
        self.connection.drain_events(timeout=RESULT_TIMEOUT)
        assert len(self.held) == 1
        self.since = time.monotonic()

    def wait_closed(self, timeout: float) -> float:
        """Seconds from the delivery until the server closed the channel for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.connection.drain_events(timeout=0.2)
            except TimeoutError:
                continue
            except self.connection.channel_errors as exc:
                closed = time.monotonic() - self.since
                reason = str(exc)
                break
        else:
            raise AssertionError(f"the canary channel was still open after {timeout:g}s")
        assert "PRECONDITION_FAILED" in reason, reason
        assert "acknowledgement" in reason, reason
        return closed

    def close(self) -> None:
        self.connection.collect()  # its channel is gone: drop the connection without a goodbye


def test_neither_a_long_apply_nor_an_apply_waiting_behind_it_meets_consumer_timeout(
    cluster: Cluster, timing: list[str]
) -> None:
    """One worker of one apply slot runs an apply five times longer than ``consumer_timeout``
    while a second apply, delivered to it meanwhile, waits. The worker's channel is never closed
    (the same channel consumes before and after), the waiting apply waits ready in the queue
    (never unacknowledged), and both complete once, neither reclaimed."""
    stack, db = cluster.stack, cluster.stack.db
    url = rabbitmq.broker_url(stack)
    vhost = rabbitmq.vhost_of(url)
    with rabbitmq.server_settings() as server:
        server.set("channel_tick_interval", TICK_MS)
        server.set("consumer_timeout", TIMEOUT_MS)
        (worker,) = cluster.workers(1, apply_slots=1)
        canary = Canary(url)  # opened after the worker's channels: no younger than they are
        server.restore("consumer_timeout")  # channels anyone opens from now get the default
        try:
            before = [c for c in rabbitmq.consumers(vhost) if c.queue in (CONTROL, APPLIES)]
            assert {c.queue for c in before} == {CONTROL, APPLIES}, before
            (channel,) = {c.channel for c in before}  # one channel consumes both lanes

            long_id = submit_task(stack, sleep_payload(LONG))
            wait_state(db, long_id, "running", timeout=RESULT_TIMEOUT)
            waiting_id = submit_task(stack, sleep_payload(0.2))
            assert row(db, waiting_id)["state"] == "dispatched"
            # Delivered to the busy worker, given back, and the apply queue no longer consumed.
            wait_log(worker, "all 1 apply slots busy", timeout=RESULT_TIMEOUT)
            wait_for(
                "the waiting run_apply to be ready in the queue, not unacknowledged",
                lambda: rabbitmq.depth(vhost, APPLIES) == rabbitmq.Depth(ready=1, unacked=0),
                timeout=RESULT_TIMEOUT,
                interval=0.5,
                diagnose=lambda: str(rabbitmq.depth(vhost, APPLIES)),
            )
            # Meanwhile a channel of the same age holding a delivery is closed for it.
            canary_closed = canary.wait_closed(TIMEOUT_MS / 1000 + 4 * TICK_MS / 1000 + SLACK)
            assert canary_closed >= TIMEOUT_MS / 1000

            done = wait_state(db, long_id, "completed", timeout=LONG + RESULT_TIMEOUT)
            wait_state(db, waiting_id, "completed", timeout=RESULT_TIMEOUT)
        finally:
            canary.close()

    ran = _seconds(stack, long_id, "redeemed", "completed")
    waited = _seconds(stack, waiting_id, "dispatched", "redeemed")
    assert ran >= 4 * TIMEOUT_MS / 1000, ran
    assert waited >= 3 * TIMEOUT_MS / 1000, waited
    for apply_id in (long_id, waiting_id):
        assert_completed_once(db, apply_id)
        assert row(db, apply_id)["reclaim_count"] == 0
    assert done["reclaim_count"] == 0
    after = [c for c in rabbitmq.consumers(vhost) if c.queue in (CONTROL, APPLIES)]
    assert {(c.queue, c.channel) for c in after} == {(CONTROL, channel), (APPLIES, channel)}, (
        "the worker's channel was replaced",
        before,
        after,
    )
    assert rabbitmq.depth(vhost, APPLIES) == rabbitmq.Depth(0, 0)
    logged = worker.log()
    assert not [s for s in BROKEN if s in logged], logged[-3000:]
    line = (
        f"[rabbitmq {rabbitmq.version()}] consumer_timeout {TIMEOUT_MS} ms: an apply ran "
        f"{ran:.1f}s and one waited {waited:.1f}s behind it, no channel closed (a held delivery's "
        f"channel closed after {canary_closed:.1f}s)"
    )
    print(line)
    timing.append(line)


def _seconds(stack: Stack, apply_id: int, first: str, then: str) -> float:
    entries = logs(stack.db, apply_id)
    start = next(e for e in entries if e.event == first)
    end = next(e for e in entries if e.event == then)
    return seconds_between(start.created_at, end.created_at)
