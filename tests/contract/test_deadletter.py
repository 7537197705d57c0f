"""Dead letters on real brokers, without a worker: the Redis store (a private ``redis-server``,
with and without kombu's key prefix), the two transports of ``tasks/broker.py`` refusing what is
not a kombu envelope while delivering what is (every read path: ``BRPOP`` and ``basic_get`` on
Redis, the folder on the embedded broker), and ``leasehold doctor`` reporting the dead letters
and the owed pull request publications, run as an operator runs it. (With a real worker and
every kind of poison: ``tests/e2e/test_poison.py``.)"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import connection as kombu_connection
from kombu import entity, messaging

from storage import open_database
from storage.database import Database
from storage.migrate import upgrade
from storage.tables import applies, publications
from tasks import deadletter
from tasks.broker import RedisTransport
from tasks.broker import Transport as FolderTransport
from tests import support
from tests.servers import PrivateRedis

# kombu is untyped: its classes, as this test uses them.
Connection: Any = kombu_connection.Connection
Consumer: Any = messaging.Consumer
Producer: Any = messaging.Producer
Queue: Any = entity.Queue

MARKER = "poison-marker-3e9a"  # in every planted body: never in doctor's output


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def client(private_redis: PrivateRedis) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(private_redis.url(0))
    conn.flushdb()
    try:
        yield conn
    finally:
        conn.close()


def letter(i: int, size: int = 10) -> deadletter.DeadLetter:
    return deadletter.DeadLetter.of(b"x" * size, reason=f"r{i}", stage="transport")


# --- the Redis store ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "app1:"])
def test_the_redis_store_keeps_the_newest_first_and_counts_its_bytes(
    client: redis.Redis, prefix: str
) -> None:
    store = deadletter.RedisStore(client, prefix=prefix)
    assert (store.count(), store.size(), store.newest(3)) == (0, 0, [])
    for i in range(4):
        store.put(letter(i))
    assert store.count() == 4
    assert [x.reason for x in store.newest(3)] == ["r3", "r2", "r1"]
    assert store.size() == sum(len(x.to_json()) for x in store.newest(10))
    assert client.llen(f"{prefix}leasehold.dead") == 4
    assert store.where == f"redis list '{prefix}leasehold.dead'"


def test_the_redis_store_keeps_within_its_bounds(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadletter, "KEEP", 3)
    store = deadletter.RedisStore(client)
    for i in range(6):
        store.put(letter(i))
    assert [x.reason for x in store.newest(10)] == ["r5", "r4", "r3"]
    one = len(letter(9).to_json())
    monkeypatch.setattr(deadletter, "MAX_BYTES", 2 * one)
    store.put(letter(9))
    assert [x.reason for x in store.newest(10)] == ["r9", "r5"]
    assert store.size() == 2 * one
    monkeypatch.setattr(deadletter, "MAX_BYTES", 1)
    store.put(letter(10))  # over the bound by itself: the newest always stays
    assert [x.reason for x in store.newest(10)] == ["r10"]
    assert store.size() == len(letter(10).to_json())


def test_an_operators_delete_restarts_the_byte_count(client: redis.Redis) -> None:
    store = deadletter.RedisStore(client)
    store.put(letter(1, size=500))
    client.delete(deadletter.NAME)  # an operator emptied the list, and left the count
    assert (store.count(), store.size()) == (0, 0)
    store.put(letter(2))
    assert store.size() == len(letter(2).to_json())


# --- the transports -------------------------------------------------------------------------------


def garbage() -> list[bytes]:
    return [
        f"{MARKER} not json".encode(),
        b"\xff\xfe not utf-8",
        b"[1, 2]",
        b'{"body": "' + MARKER.encode() + b'"}',
    ]


def redis_connection(private_redis: PrivateRedis, **options: Any) -> Any:
    return Connection(private_redis.url(0), transport=RedisTransport, transport_options=options)


def folder_connection(root: Path) -> Any:
    options = {
        "data_folder_in": str(root / "queue"),
        "data_folder_out": str(root / "queue"),
        "control_folder": str(root / "control"),
        "polling_interval": 0.05,
    }
    for name in ("queue", "control"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return Connection("filesystem://", transport=FolderTransport, transport_options=options)


def publish(conn: Any, queue: Any, body: dict[str, Any]) -> None:
    with Producer(conn) as producer:
        producer.publish(body, routing_key=queue.routing_key, declare=[queue], serializer="json")


def push_raw(conn: Any, root: Path | None, queue: str, raw: bytes) -> None:
    """Onto ``queue`` as a producer that writes no kombu envelope would."""
    if root is None:
        conn.default_channel.client.lpush(queue, raw)
        return
    partial = root / "queue" / f".raw-{uuid.uuid4().hex}"
    partial.write_bytes(raw)
    partial.rename(root / "queue" / f"0_{uuid.uuid4()}.{queue}.msg")


@pytest.fixture(params=["redis", "filesystem"])
def broker(
    request: pytest.FixtureRequest, tmp_path: Path, client: redis.Redis
) -> Iterator[tuple[Any, Path | None, deadletter.Store]]:
    if request.param == "redis":
        private: PrivateRedis = request.getfixturevalue("private_redis")
        conn = redis_connection(private)
        store: deadletter.Store = deadletter.RedisStore(client)
        root = None
    else:
        root = tmp_path / "broker"
        conn = folder_connection(root)
        store = deadletter.FolderStore(root / "dead")
    try:
        yield conn, root, store
    finally:
        conn.release()


def test_basic_get_refuses_what_is_not_an_envelope_and_delivers_what_is(
    broker: tuple[Any, Path | None, deadletter.Store],
) -> None:
    conn, root, store = broker
    name = f"q-{uuid.uuid4().hex[:6]}"
    queue = Queue(name, routing_key=name)
    bound = queue(conn.default_channel)
    bound.declare()
    for raw in garbage():
        push_raw(conn, root, queue.name, raw)
    publish(conn, queue, {"n": 1})

    got = bound.get(no_ack=True)

    assert got is not None
    assert got.decode() == {"n": 1}
    assert store.count() == len(garbage())
    kept = store.newest(10)
    assert sorted(x.raw for x in kept) == sorted(garbage())
    assert {(x.stage, x.queue) for x in kept} == {("transport", queue.name)}
    assert bound.get(no_ack=True) is None


def test_a_consumer_refuses_what_is_not_an_envelope_and_carries_on(
    broker: tuple[Any, Path | None, deadletter.Store],
) -> None:
    """The path a worker takes (``BRPOP`` on Redis, the folder poll on the embedded broker)."""
    conn, root, store = broker
    name = f"q-{uuid.uuid4().hex[:6]}"
    queue = Queue(name, routing_key=name)
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append(body)
        message.ack()

    with Consumer(conn, [queue], callbacks=[on_message], accept=["json"]):
        for raw in garbage():
            push_raw(conn, root, queue.name, raw)
        publish(conn, queue, {"n": 2})
        for _ in range(50):
            if got:
                break
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                continue

    assert got == [{"n": 2}]
    assert store.count() == len(garbage())
    assert {x.reason.split(":")[0] for x in store.newest(10)} >= {"not JSON at char 0"}


def test_the_redis_transport_keeps_dead_letters_under_kombus_key_prefix(
    private_redis: PrivateRedis, client: redis.Redis
) -> None:
    conn = redis_connection(private_redis, global_keyprefix="app1:")
    try:
        queue = Queue("prefixed", routing_key="prefixed")
        bound = queue(conn.default_channel)
        bound.declare()
        client.lpush("app1:prefixed", b"not json")
        assert bound.get(no_ack=True) is None
    finally:
        conn.release()
    assert deadletter.RedisStore(client, prefix="app1:").count() == 1
    assert deadletter.RedisStore(client).count() == 0


# --- leasehold doctor -----------------------------------------------------------------------------


def doctor(env: dict[str, str], cwd: Path) -> dict[str, list[str]]:
    done = subprocess.run(
        [*support.LEASEHOLD, "doctor", "--timeout", "0.5"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert MARKER not in done.stdout
    topics: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] in ("ok", "warn", "FAIL"):
            topics.setdefault(parts[1], []).append(f"{parts[0]} {parts[2]}")
    return topics


@pytest.fixture
def home(tmp_path: Path) -> tuple[dict[str, str], Database]:
    url = f"sqlite:///{tmp_path / 'leasehold.sqlite3'}"
    env = support.environment(tmp_path, LEASEHOLD_DATABASE_URL=url)
    db = open_database(url)
    upgrade(db)
    return env, db


def plant(store: deadletter.Store, n: int) -> None:
    for i in range(n):
        raw = f"{MARKER} {i}".encode()
        store.put(deadletter.DeadLetter.of(raw, reason=f"reason {i}", stage="transport", queue="q"))


def test_doctor_without_dead_letters_says_ok(
    home: tuple[dict[str, str], Database], tmp_path: Path
) -> None:
    env, _ = home
    topics = doctor(env, tmp_path)
    folder = tmp_path / "var" / "broker" / "dead"
    assert topics["dead"] == [f"ok no dead letters (folder '{folder}')"]
    assert topics["github"] == ["ok no pull request publication owed"]


def test_doctor_reports_the_embedded_brokers_dead_letters(
    home: tuple[dict[str, str], Database], tmp_path: Path
) -> None:
    env, _ = home
    folder = tmp_path / "var" / "broker" / "dead"
    store = deadletter.FolderStore(folder)
    plant(store, 5)
    topics = doctor(env, tmp_path)
    first, *newest = topics["dead"]
    assert 1024 < sum(p.stat().st_size for p in folder.iterdir()) < 1331  # shown as 1.2 KiB
    assert first.startswith(f"warn 5 dead letters, 1.2 KiB, in folder '{folder}' (")
    assert "the newest 1000 and at most 64 MiB are kept" in first
    assert [line.split(" transport: ")[1] for line in newest] == [
        f"reason {i} (queue 'q', {len(f'{MARKER} {i}')} bytes)" for i in (4, 3, 2)
    ]


def test_doctor_reports_redis_dead_letters(
    home: tuple[dict[str, str], Database],
    tmp_path: Path,
    private_redis: PrivateRedis,
    client: redis.Redis,
) -> None:
    env, _ = home
    env["LEASEHOLD_BROKER_URL"] = private_redis.url(0)
    env["LEASEHOLD_RESULT_BACKEND"] = private_redis.url(1)
    store = deadletter.RedisStore(client)
    plant(store, 2)
    topics = doctor(env, tmp_path)
    first, *newest = topics["dead"]
    assert first.startswith(
        f"warn 2 dead letters, {store.size()} bytes, in redis list 'leasehold.dead' ("
    )
    assert len(newest) == 2
    assert "reason 1 (queue 'q'" in newest[0]


def test_doctor_reports_owed_publications(
    home: tuple[dict[str, str], Database], tmp_path: Path
) -> None:
    env, db = home
    first, second = support.new_apply(db), support.new_apply(db)
    with db.transaction() as conn:
        # owed by ended applies (a running one's holder publishes: not in the backlog)
        conn.execute(
            applies.update().where(applies.c.id.in_([first, second])).values(state="completed")
        )
        conn.execute(
            publications.insert(),
            [
                {"apply_id": first, "due_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)},
                {"apply_id": second, "due_at": datetime(2026, 1, 3, 3, 4, 5, tzinfo=UTC)},
            ],
        )
    (line,) = doctor(env, tmp_path)["github"]
    assert line.startswith(
        "warn 2 pull request publications owed (the final or stopped state of an apply), "
        "the oldest due at 2026-01-02 03:04:05 UTC"
    )
