"""Dead letters without a broker (``tasks/deadletter.py``): what one keeps and says, the folder
store of the embedded broker, keeping one whatever the store does, and a guard on the two kombu
readers ``tasks/broker.py`` copies. The Redis store and both transports on real brokers:
``tests/contract/test_deadletter.py``."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kombu.transport import redis as kombu_redis

from leases import mint_token
from tasks import deadletter
from tasks.deadletter import CorruptDeadLetter, DeadLetter, FolderStore

NOW = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


def letter(raw: bytes = b"\xff not json", **changes: str) -> DeadLetter:
    fields = {"reason": "not JSON", "stage": "transport", "queue": "leasehold", **changes}
    return DeadLetter.of(raw, now=NOW, **fields)


def test_a_dead_letter_keeps_the_message_byte_for_byte() -> None:
    kept = letter(b"\x00\xff" * 10, task="leasehold.run_apply", task_id="t-1")
    again = DeadLetter.from_json(kept.to_json())
    assert again == kept
    assert again.raw == b"\x00\xff" * 10
    assert (again.size, again.truncated) == (20, False)
    assert again.sha256 == hashlib.sha256(b"\x00\xff" * 10).hexdigest()
    assert again.at == "2026-03-29T01:30:00.000+00:00"


def test_a_message_over_the_bound_keeps_its_head_size_and_digest() -> None:
    big = b"x" * (deadletter.MAX_INTACT + 1)
    kept = letter(big)
    assert kept.truncated
    assert kept.raw == big[: deadletter.HEAD]
    assert (kept.size, kept.sha256) == (len(big), hashlib.sha256(big).hexdigest())
    assert len(kept.to_json()) < 2 * deadletter.HEAD


def test_a_message_at_the_bound_is_kept_whole() -> None:
    assert not letter(b"x" * deadletter.MAX_INTACT).truncated


def test_only_the_two_stages_exist() -> None:
    with pytest.raises(ValueError, match="stage must be one of"):
        letter(stage="elsewhere")


def test_reasons_are_one_bounded_line_without_tokens() -> None:
    token = mint_token()
    kept = letter(reason=f"lease token {token}\nsecond line " + "y" * 1000)
    assert token not in kept.reason
    assert f"lease token {token[:6]}… second line" in kept.reason
    assert "\n" not in kept.reason
    assert len(kept.reason) <= 300


def test_the_summary_says_why_and_what_never_the_message() -> None:
    kept = letter(b"secret body", task="leasehold.get_apply", task_id="t-9")
    assert kept.summary() == (
        "2026-03-29T01:30:00.000+00:00 transport: not JSON "
        "(queue 'leasehold', task 'leasehold.get_apply', id t-9, 11 bytes)"
    )
    assert "secret" not in kept.summary()
    unknown = DeadLetter.of(b"x" * (deadletter.MAX_INTACT + 1), reason="r", stage="consumer")
    assert (
        unknown.summary(when=False)
        == f"consumer: r (queue ?, {deadletter.MAX_INTACT + 1} bytes, truncated)"
    )


@pytest.mark.parametrize(
    "stored",
    [b"not json", b"[]", b'{"at": "x"}', letter().to_json().replace(b'"raw":"', b'"raw":"%')],
)
def test_a_stored_entry_that_is_not_ours_is_said_so(stored: bytes) -> None:
    with pytest.raises(CorruptDeadLetter, match="not a leasehold dead letter"):
        DeadLetter.from_json(stored)


# --- keeping one ----------------------------------------------------------------------------------


class Store:
    where = "a test store"

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.kept: list[DeadLetter] = []

    def put(self, letter: DeadLetter) -> None:
        if self.error is not None:
            raise self.error
        self.kept.append(letter)

    def count(self) -> int:
        return len(self.kept)

    def size(self) -> int:
        return sum(len(x.to_json()) for x in self.kept)

    def newest(self, n: int) -> list[DeadLetter]:
        return self.kept[::-1][:n]


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused a message" in r.getMessage()]


def test_a_kept_letter_is_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    with caplog.at_level(logging.INFO):
        assert deadletter.keep(letter(), store)
    assert store.kept == [letter()]
    assert [r.getMessage() for r in caplog.records] == [
        "refused a message: transport: not JSON (queue 'leasehold', 10 bytes); kept in a test store"
    ]


def test_a_store_that_fails_loses_the_letter_not_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO):
        assert not deadletter.keep(letter(), Store(OSError("disk full")))
    assert "could not keep a dead letter in a test store: OSError('disk full')" in caplog.text
    assert refusals(caplog) == [
        "refused a message: transport: not JSON (queue 'leasehold', 10 bytes); "
        "NOT kept (see the error above)"
    ]


def test_a_broken_connection_propagates_so_the_broker_redelivers() -> None:
    with pytest.raises(ConnectionError):
        deadletter.keep(letter(), Store(ConnectionError("gone")), fatal=(ConnectionError,))


def test_no_store_still_logs_the_refusal(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert not deadletter.keep(letter(), None)
    assert len(refusals(caplog)) == 1


# --- the embedded broker's folder -----------------------------------------------------------------


def test_the_folder_keeps_the_newest_first(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "dead")
    assert (store.count(), store.size(), store.newest(3)) == (0, 0, [])
    for i in range(5):
        store.put(letter(reason=f"r{i}"))
    assert store.count() == 5
    assert [x.reason for x in store.newest(3)] == ["r4", "r3", "r2"]
    assert store.size() == sum(p.stat().st_size for p in (tmp_path / "dead").iterdir())
    assert not list((tmp_path / "dead").glob(".*"))  # no partial file left behind


def test_the_folder_keeps_within_its_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadletter, "KEEP", 3)
    store = FolderStore(tmp_path)
    for i in range(6):
        store.put(letter(reason=f"r{i}"))
    assert [x.reason for x in store.newest(10)] == ["r5", "r4", "r3"]
    one = len(letter(reason="r9").to_json())
    monkeypatch.setattr(deadletter, "MAX_BYTES", 2 * one)
    store.put(letter(reason="r9"))
    assert [x.reason for x in store.newest(10)] == ["r9", "r5"]
    monkeypatch.setattr(deadletter, "MAX_BYTES", 1)
    store.put(letter(reason="alone"))  # over the bound by itself: the newest always stays
    assert [x.reason for x in store.newest(10)] == ["alone"]


def test_the_folder_is_beside_the_queue_folder_unless_named(tmp_path: Path) -> None:
    assert deadletter.folder_of({"data_folder_in": str(tmp_path / "broker" / "queue")}) == (
        tmp_path / "broker" / "dead"
    )
    named = {"data_folder_in": "x", "dead_letter_folder": str(tmp_path / "elsewhere")}
    assert deadletter.folder_of(named) == tmp_path / "elsewhere"


def test_a_dead_letter_file_is_plain_json(tmp_path: Path) -> None:
    """An operator reads one with any tool."""
    FolderStore(tmp_path).put(letter(b"abc"))
    (path,) = tmp_path.glob("*.json")
    entry = json.loads(path.read_text())
    assert (entry["reason"], entry["raw"], entry["size"]) == ("not JSON", "YWJj", 3)


# --- the kombu readers tasks/broker.py copies -----------------------------------------------------

# SHA-256 of the source of kombu's own Redis readers that ``tasks.broker.RedisChannel`` replaces
# with copies that screen what they pop (kombu 5.7.0). If kombu changes them, bring the change
# into the copies, then update these.
KOMBU_READERS = {
    "_brpop_read": "c42518699709f2df90f55a048fe6346612ae5527e5c4a6819f2c0920dc62088f",
    "_get": "be26a9f1eb4cf8da2aa65f4815a1709bf80b4434b064d3d7146872d318ad506c",
}


@pytest.mark.parametrize("name", sorted(KOMBU_READERS))
def test_kombus_redis_readers_are_the_ones_copied(name: str) -> None:
    source = inspect.getsource(getattr(kombu_redis.Channel, name))
    assert hashlib.sha256(source.encode()).hexdigest() == KOMBU_READERS[name], (
        f"kombu's Redis Channel.{name} changed: bring the change into tasks/broker.py's "
        "RedisChannel, then update KOMBU_READERS"
    )
