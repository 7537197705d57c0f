"""Poison messages never stop a worker (issue 10, part 4).

Each message is pushed straight onto a leasehold queue the way a buggy producer in another app
might write it: a raw ``LPUSH`` on the Redis list, a raw file in the embedded broker's queue
folder, a raw ``basic.publish`` on RabbitMQ (where the broker frames every message, so bytes that
are no envelope arrive as a body and the consumer, not the transport, refuses them). Each time,
on every stack: the worker process stays up, the message is in the broker's
dead letters (intact, or for one over the size bound its head, size and SHA-256), the worker logs
one line without any lease token, nothing in leasehold's store changed, the message does not come
back to its queue, a sender that named a task id gets a FAILURE result saying why, and the same
worker still serves a normal apply afterwards.

One module-scoped worker serves every test here (its pid is checked at every step); no beat runs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import connection as kombu_connection

from leases import mint_token
from tasks import deadletter
from tasks.testing.processes import CeleryProcess
from tests import support
from tests.e2e import rabbitmq
from tests.e2e.helpers import (
    RESULT_TIMEOUT,
    Cluster,
    Stack,
    sleep_payload,
    submit_task,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.slow
# Stacks: poison is refused by the broker transport and the consumer, before any store write:
# the PostgreSQL store adds nothing here (tests/e2e/conftest.py).
STACKS = frozenset({"redis", "rabbitmq", "sqlite"})

Connection: Any = kombu_connection.Connection  # kombu is untyped

CONTROL = "leasehold"
APPLIES = "leasehold.applies"
REFUSED_LINE = "refused a message:"
SETTLE = 10.0  # for the broker to take what was published to it
MARKER = "poison-marker-7d1f"  # in some bodies: must never show in a log line or in doctor
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


# --- building messages the way another app (or a buggy one) would --------------------------------


def call_body(args: list[Any], kwargs: dict[str, Any]) -> bytes:
    return json.dumps([args, kwargs, _EMBED]).encode()


def envelope(
    task: str | None,
    body: bytes,
    *,
    queue: str = CONTROL,
    headers: dict[str, Any] | None = None,
    content_type: str = "application/json",
    content_encoding: str = "utf-8",
    body_encoding: str | None = "base64",
    raw_body: str | None = None,
) -> dict[str, Any]:
    """A kombu envelope as kombu's virtual transports write it (protocol 2)."""
    task_id = str(uuid.uuid4())
    head: dict[str, Any] = {
        "lang": "py",
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "poison@e2e",
        "ignore_result": None,
    }
    if task is not None:
        head["task"] = task
    head.update(headers or {})
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": str(uuid.uuid4()),
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "delivery_tag": str(uuid.uuid4()),
    }
    if body_encoding is not None:
        properties["body_encoding"] = body_encoding
    encoded = base64.b64encode(body).decode() if body_encoding == "base64" else body.decode()
    return {
        "body": raw_body if raw_body is not None else encoded,
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": head,
        "properties": properties,
    }


def dumped(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


@dataclass
class Poison:
    """One bad message: its bytes, where it goes, and what its dead letter must say."""

    name: str
    queue: str
    stage: str  # transport or consumer
    reason: str  # a fragment of the dead letter's reason
    raw: bytes
    sent: dict[str, Any] | None = None  # the envelope, for consumer-stage poison
    answer: str | None = None  # a fragment of the FAILURE its sender gets, if it named an id
    secret: str | None = None  # a lease token the log must not show

    @property
    def task_id(self) -> str | None:
        return None if self.sent is None else self.sent["headers"].get("id")


def _consumer(
    name: str, reason: str, sent: dict[str, Any], *, answer: str | None = None, **kw: Any
) -> Poison:
    queue = sent["properties"]["delivery_info"]["routing_key"]
    return Poison(name, queue, "consumer", reason, dumped(sent), sent, answer=answer, **kw)


def poisons() -> list[Poison]:
    good = envelope("leasehold.get_apply", call_body([], {"apply_id": 1}))
    token = mint_token()
    lease_is_a_string = {"apply_id": 1, "lease": token}
    return [
        # --- not a kombu envelope: refused by the transport's channel -------------------------
        Poison("not JSON", CONTROL, "transport", "not JSON", f"{MARKER} not json".encode()),
        Poison("not UTF-8", CONTROL, "transport", "not UTF-8", b"\xff\xfe\x00" + b"\x9c" * 64),
        Poison("truncated JSON", CONTROL, "transport", "not JSON", dumped(good)[:150]),
        Poison(
            "JSON that is not an envelope",
            CONTROL,
            "transport",
            "a JSON array, not an object",
            b'[1, 2, "' + MARKER.encode() + b'"]',
        ),
        Poison(
            "an envelope without properties",
            CONTROL,
            "transport",
            "no 'properties' object",
            dumped({k: v for k, v in good.items() if k != "properties"}),
        ),
        Poison(
            "a body that is not base64",
            CONTROL,
            "transport",
            "body is not base64",
            dumped(envelope("leasehold.get_apply", b"", raw_body=f"{MARKER} is not base64 !")),
        ),
        Poison(
            "an unknown body encoding",
            CONTROL,
            "transport",
            "unknown body_encoding 'rot13'",
            dumped(
                envelope("leasehold.get_apply", b"", body_encoding="rot13", raw_body="[[], {}, {}]")
            ),
        ),
        # --- an envelope, but not a task message leasehold can run: refused by the consumer ----
        _consumer(
            "a body [1, 2] (control queue)",
            "a JSON array of 2 items, not [args, kwargs, embed]",
            envelope("leasehold.get_apply", b"[1, 2]"),
            answer="not [args, kwargs, embed]",
        ),
        _consumer(
            "a body [1, 2] (apply queue)",
            "a JSON array of 2 items, not [args, kwargs, embed]",
            envelope("leasehold.run_apply", b"[1, 2]", queue=APPLIES),
            answer="not [args, kwargs, embed]",
        ),
        _consumer(
            "no task header",
            "no task header",
            envelope(None, call_body([], {"apply_id": 1})),
            answer="no task header",
        ),
        _consumer(
            "a pickle content type",
            "content type 'application/x-python-serialize' is not accepted",
            envelope(
                "leasehold.get_apply",
                b"\x80\x04K\x01.",
                content_type="application/x-python-serialize",
                content_encoding="binary",
            ),
            answer="not accepted",
        ),
        _consumer(
            "a body in another encoding than it says",
            "body does not decode as 'application/json'",
            envelope(
                "leasehold.get_apply", json.dumps([[], {"apply_id": 1}, _EMBED]).encode("utf-16")
            ),
            answer="does not decode",
        ),
        _consumer(
            "a compression header over a body that is not compressed",
            "undecodable",
            envelope(
                "leasehold.get_apply",
                call_body([], {"apply_id": 1}),
                headers={"compression": "application/x-gzip"},
            ),
        ),
        _consumer(
            "an eta that is not a date",
            "invalid ETA value",
            envelope(
                "leasehold.get_apply",
                call_body([], {"apply_id": 1}),
                headers={"eta": "tomorrow at noon"},
            ),
            answer="invalid ETA value",
        ),
        _consumer(
            "an unknown task name",
            "unknown task 'someone.elses_task'",
            envelope("someone.elses_task", call_body([], {})),
            answer="someone.elses_task",
        ),
        _consumer(
            "a run_apply whose lease is not an object",
            "lease must be a JSON object",
            envelope("leasehold.run_apply", call_body([], lease_is_a_string), queue=APPLIES),
            answer="lease must be a JSON object",
            secret=token,
        ),
        _consumer(
            "a get_apply with an argument it does not take",
            "arguments do not fit leasehold.get_apply",
            envelope("leasehold.get_apply", call_body([], {"apply_id": 1, "who": MARKER})),
            answer="arguments do not fit",
        ),
        _consumer(
            "a 5 MB submit",
            "the limit is 262144",
            envelope(
                "leasehold.submit_apply",
                call_body([], {**sleep_payload(0.1), "request_id": "x" * 5_000_000}),
            ),
            answer="the limit is 262144",
        ),
        # --- over the size bound: its head, size and digest are kept --------------------------
        Poison(
            "a huge body",
            CONTROL,
            "transport",
            "not JSON",
            MARKER.encode() + os.urandom(deadletter.MAX_INTACT // 2).hex().encode(),
        ),
    ]


POISONS = poisons()


# --- the broker, as the test sees it ------------------------------------------------------------


@dataclass
class Broker:
    """Raw access to a stack's broker: push bytes onto a queue, read the dead letters."""

    stack: Stack
    client: redis.Redis | None = None
    connection: Any = None  # AMQP: a kombu Connection
    store: deadletter.Store = field(init=False)

    def __post_init__(self) -> None:
        if self.stack.redis:
            self.client = redis.Redis.from_url(self.stack.env["LEASEHOLD_BROKER_URL"])
            self.store = deadletter.RedisStore(self.client)
        elif rabbitmq.is_amqp(self.stack):
            self.connection = Connection(rabbitmq.broker_url(self.stack))
            self.store = BrowsedQueueStore(self.connection)
        else:
            self.store = deadletter.FolderStore(self._var / "dead")

    @property
    def _var(self) -> Path:
        return self.stack.folder / "var" / "broker"

    def push(self, queue: str, raw: bytes) -> None:
        """Onto ``queue`` as its producer would: LPUSH (kombu pops from the right), a file
        named like kombu's, written under a name no consumer reads and renamed into place, or on
        AMQP, which frames every message itself, an envelope's parts as a message's or any
        other bytes as a message's body (see :func:`amqp_parts`)."""
        if self.client is not None:
            self.client.lpush(queue, raw)
            return
        if self.connection is not None:
            body, fields = amqp_parts(raw)
            channel = self.connection.default_channel
            channel.basic_publish(
                channel.prepare_message(body, **fields), exchange="", routing_key=queue
            )
            return
        folder = self._var / "queue"
        partial = folder / f".poison-{uuid.uuid4().hex}"
        partial.write_bytes(raw)
        partial.rename(folder / f"{int(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg")

    def waiting(self, queue: str) -> int:
        """Messages of ``queue`` in the broker, delivered but unacknowledged ones included."""
        if self.client is not None:
            return int(self.client.llen(queue)) + int(self.client.hlen("unacked"))
        if self.connection is not None:
            depth = rabbitmq.depth(rabbitmq.vhost_of(rabbitmq.broker_url(self.stack)), queue)
            return depth.ready + depth.unacked
        return len(list((self._var / "queue").glob(f"*.{queue}.msg")))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.connection is not None:
            self.connection.release()


def amqp_parts(raw: bytes) -> tuple[bytes, dict[str, Any]]:
    """The body and fields (kombu's ``prepare_message`` arguments) of what a producer on AMQP
    sends for ``raw``: a kombu envelope (what a virtual transport stores) becomes a message of
    its body, headers and properties, as kombu would have published it; any other bytes are the
    body of a message without properties. AMQP frames every message, so no message there is
    "not an envelope": such poison reaches the worker's consumer."""
    try:
        sent = json.loads(raw)
        properties = sent["properties"]
        encoded = sent["body"]
        body = (
            base64.b64decode(encoded, validate=True)
            if properties.get("body_encoding") == "base64"
            else encoded.encode()
        )
        fields: dict[str, Any] = {
            "headers": sent["headers"],
            "content_type": sent["content-type"],
            "content_encoding": sent["content-encoding"],
            "priority": properties.get("priority"),
            "properties": {
                key: properties[key]
                for key in ("correlation_id", "reply_to", "delivery_mode")
                if key in properties
            },
        }
    except (ValueError, TypeError, KeyError, AttributeError):
        return raw, {}
    return body, fields


def received_body(letter: deadletter.DeadLetter) -> bytes:
    """The body of the message an AMQP dead letter keeps (the worker stores the envelope that it
    rebuilt from the message, body base64: tasks/guard.py ``received``)."""
    return base64.b64decode(json.loads(letter.raw)["body"])


class BrowsedQueueStore(deadletter.QueueStore):
    """The AMQP dead letters, readable for the test: every entry taken unacknowledged on a
    channel of its own, which is then closed, so the broker gives them all back in order."""

    def __init__(self, connection: Any, *, name: str = deadletter.NAME) -> None:
        super().__init__(connection, name=name)
        self._name = name

    def newest(self, n: int) -> list[deadletter.DeadLetter]:
        channel = self._connection.channel()
        bodies: list[bytes] = []
        try:
            while (message := channel.basic_get(self._name, no_ack=False)) is not None:
                bodies.append(message.body)
        except self._connection.channel_errors:
            return []  # never declared: nothing was ever refused
        finally:
            with contextlib.suppress(*self._connection.channel_errors):
                channel.close()
        return [deadletter.DeadLetter.from_json(b) for b in reversed(bodies)][:n]

    def delete(self) -> None:
        channel = self._connection.channel()
        try:
            channel.queue_delete(self._name)
            channel.exchange_delete(self._name)
        finally:
            channel.close()


@pytest.fixture(scope="module")
def broker(stack: Stack) -> Iterator[Broker]:
    raw = Broker(stack)
    try:
        yield raw
    finally:
        raw.close()


@pytest.fixture(scope="module")
def first_pid() -> dict[str, int]:
    return {}


@pytest.fixture
def worker(cluster: Cluster, first_pid: dict[str, int]) -> CeleryProcess:
    """The module's one worker; the same process in every test (no poison killed it)."""
    (proc,) = cluster.shared_workers(1)
    assert first_pid.setdefault(cluster.stack.name, proc.pid) == proc.pid, (
        f"the worker was replaced: pid {first_pid[cluster.stack.name]} died\n{proc.log()[-3000:]}"
    )
    return proc


def alive(proc: CeleryProcess) -> bool:
    return proc.proc is not None and proc.proc.poll() is None


def serves_an_apply(stack: Stack, proc: CeleryProcess) -> None:
    apply_id = submit_task(stack, sleep_payload(0.05))
    wait_state(stack.db, apply_id, "completed", timeout=RESULT_TIMEOUT)
    assert alive(proc)


def newest_after(store: deadletter.Store, count: int) -> Callable[[], deadletter.DeadLetter | None]:
    def check() -> deadletter.DeadLetter | None:
        return store.newest(1)[0] if store.count() > count else None

    return check


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", POISONS, ids=[p.name for p in POISONS])
def test_a_poison_message_is_dead_lettered_and_the_worker_carries_on(
    cluster: Cluster, worker: CeleryProcess, broker: Broker, poison: Poison
) -> None:
    stack, db, store = cluster.stack, cluster.stack.db, broker.store
    before = support.snapshot(db)
    count = store.count()
    log_from = len(worker.log())

    broker.push(poison.queue, poison.raw)
    letter = wait_for(
        f"the dead letter of {poison.name}",
        newest_after(store, count),
        timeout=RESULT_TIMEOUT,
        diagnose=lambda: worker.log()[log_from:][-3000:],
    )

    assert alive(worker), worker.log()[-3000:]
    if broker.connection is not None:
        assert_amqp_letter(letter, poison)
    else:
        assert (letter.stage, letter.queue) == (poison.stage, poison.queue), letter
        assert poison.reason in letter.reason, letter.reason
        assert (letter.size, letter.sha256) == (
            len(poison.raw),
            hashlib.sha256(poison.raw).hexdigest(),
        )
        if letter.truncated:
            assert len(poison.raw) > deadletter.MAX_INTACT
            assert letter.raw == poison.raw[: deadletter.HEAD]
        elif poison.sent is None:
            assert letter.raw == poison.raw  # the bytes as popped
        else:
            assert json.loads(letter.raw) == poison.sent  # the envelope as received
            assert letter.task_id == poison.task_id
    assert support.snapshot(db) == before, "a refused message wrote to the store"
    wait_for(
        f"{poison.queue!r} to be empty (acknowledged, not given back)",
        lambda: broker.waiting(poison.queue) == 0,
        timeout=RESULT_TIMEOUT,
    )

    if poison.answer is not None:
        result = stack.client.AsyncResult(poison.task_id)
        error = result.get(timeout=RESULT_TIMEOUT, propagate=False)
        assert result.state == "FAILURE", (result.state, error)
        assert poison.answer in str(error), error

    serves_an_apply(stack, worker)
    assert store.count() == count + 1, "the refused message came back and was refused again"
    logged = worker.log()[log_from:]
    refusals = [line for line in logged.splitlines() if REFUSED_LINE in line]
    assert len(refusals) == 1, refusals
    assert MARKER not in logged
    if poison.secret is not None:
        assert poison.secret not in logged
    assert "Unrecoverable error" not in logged


def assert_amqp_letter(letter: deadletter.DeadLetter, poison: Poison) -> None:
    """On AMQP every poison is refused by the consumer, which keeps the message as an envelope
    rebuilt from its parts (tasks/guard.py ``received``): its body is the bytes sent."""
    assert (letter.stage, letter.queue) == ("consumer", poison.queue), letter
    if poison.stage == "consumer":  # the same checks refuse it as on the other brokers
        assert poison.reason in letter.reason, letter.reason
    body, fields = amqp_parts(poison.raw)
    if letter.truncated:
        assert letter.size > deadletter.MAX_INTACT
        assert len(letter.raw) == deadletter.HEAD
        return
    assert (letter.size, letter.sha256) == (
        len(letter.raw),
        hashlib.sha256(letter.raw).hexdigest(),
    )
    assert received_body(letter) == body
    if poison.sent is not None:
        envelope = json.loads(letter.raw)
        assert envelope["headers"] == fields["headers"]
        assert envelope["content-type"] == fields["content_type"]
        assert letter.task_id == poison.task_id


def test_a_flood_of_poison_is_refused_at_speed(
    cluster: Cluster,
    worker: CeleryProcess,
    broker: Broker,
    timing: list[str],
) -> None:
    """Many bad messages at once, both kinds mixed: every one is refused, none stops the worker,
    and the worker is still serving applies when the flood has passed."""
    stack, store = cluster.stack, broker.store
    count = store.count()
    flood = 200
    started = time.monotonic()
    for i in range(flood):
        raw = f"flood {i}".encode() if i % 2 else dumped(envelope("leasehold.get_apply", b"[1]"))
        broker.push(CONTROL, raw)
    wait_for(
        f"{flood} dead letters",
        lambda: store.count() >= count + flood,
        timeout=4 * RESULT_TIMEOUT,
    )
    took = time.monotonic() - started
    timing.append(f"{stack.name}: {flood} poison messages refused in {took:.2f}s")
    assert alive(worker)
    serves_an_apply(stack, worker)
    assert store.count() == count + flood


def test_a_full_store_keeps_the_newest_within_its_bounds(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The bound, on the broker's own store (a key or folder of its own for this test): past
    KEEP entries or MAX_BYTES, the oldest go, the newest always stays."""
    monkeypatch.setattr(deadletter, "KEEP", 5)
    monkeypatch.setattr(deadletter, "MAX_BYTES", 4000)
    key = f"leasehold.dead.test-{uuid.uuid4().hex[:8]}"
    if broker.client is not None:
        store: deadletter.Store = deadletter.RedisStore(broker.client, key=key)
    elif broker.connection is not None:
        store = BrowsedQueueStore(broker.connection, name=key)
    else:
        store = deadletter.FolderStore(tmp_path / "dead")

    def letter(i: int, size: int = 10) -> deadletter.DeadLetter:
        return deadletter.DeadLetter.of(b"x" * size, reason=f"r{i}", stage="transport")

    def reasons() -> list[str]:
        return [x.reason for x in store.newest(10)]

    def holds(expected: list[str]) -> None:
        # AMQP publishes are asynchronous: wait until the broker has taken them all.
        wait_for(f"the store to hold {expected}", lambda: reasons() == expected, timeout=SETTLE)

    try:
        for i in range(12):
            store.put(letter(i))
        holds(["r11", "r10", "r9", "r8", "r7"])
        assert store.count() == 5
        store.put(letter(12, size=1500))  # ~2 kB stored: the bytes bound drops older ones
        wait_for("r12 on top", lambda: reasons()[:1] == ["r12"], timeout=SETTLE)
        assert sum(len(x.to_json()) for x in store.newest(10)) <= 4000
        store.put(letter(13, size=5000))  # alone over the bound
        if isinstance(store, BrowsedQueueStore):
            # RabbitMQ's x-max-length-bytes drops even a lone message over it. No real dead
            # letter is over MAX_BYTES (one over MAX_INTACT keeps its first HEAD bytes).
            holds([])
        else:
            holds(["r13"])  # kept, alone
    finally:
        if broker.client is not None:
            broker.client.delete(key, key + deadletter.BYTES_SUFFIX)
        if isinstance(store, BrowsedQueueStore):
            store.delete()


def test_doctor_reports_the_dead_letters(cluster: Cluster, broker: Broker) -> None:
    """After the poison above: how many, and the newest few with why and when, never a body."""
    stack = cluster.stack
    count = broker.store.count()
    if count == 0:
        broker.push(CONTROL, f"{MARKER} alone".encode())
        cluster.shared_workers(1)
        wait_for("a dead letter", lambda: broker.store.count() > 0, timeout=RESULT_TIMEOUT)
        count = broker.store.count()
    done = stack.cli("doctor", "--timeout", "3", check=False)
    assert "Traceback" not in done.stderr, done.stderr
    dead = [line for line in done.stdout.splitlines() if line.split()[1:2] == ["dead"]]
    assert dead, done.stdout
    # AMQP tells a queue's length, not its bytes: no ", N bytes," there.
    held = " in " if broker.store.size() is None else ", "
    assert dead[0].split(None, 2)[2].startswith(f"{count} dead letters{held}"), dead
    assert f" in {broker.store.where} (" in dead[0], dead
    assert dead[0].startswith("warn"), dead
    assert 1 < len(dead) <= 1 + 3, dead
    assert MARKER not in done.stdout
