"""Dead letters: messages a leasehold worker refused, kept as received for an operator to read.

A worker that cannot decode or validate a message (``tasks/envelope.py`` says why) neither dies
nor gives it back to its queue, where it would come back forever: it stores a copy here, logs one
line, and acknowledges it. Each broker keeps its dead letters beside its queues:

- Redis: the list ``leasehold.dead`` in the broker's database, newest first (``LPUSH``), with
  the byte count of its entries in ``leasehold.dead.bytes``;
- the embedded ``filesystem://`` broker: one file per dead letter in ``dead_letter_folder``
  (``LEASEHOLD_VAR_DIR/broker/dead``), named so that they sort oldest first;
- any other transport (RabbitMQ): the queue ``leasehold.dead``, declared with the same bounds
  as queue arguments (``x-max-length``, ``x-max-length-bytes``), which no worker consumes.

Every entry is one JSON object: when (UTC), why, at which stage (``transport``: not even a kombu
envelope; ``consumer``: an envelope Celery or leasehold could not take), the queue, the task name
and id when known, and the message itself, base64 (``raw``: the bytes as popped for the transport
stage, the envelope as received for the consumer stage), with its size and SHA-256.

**The bound.** A flood of bad messages must not fill the broker's memory or disk: the store keeps
the newest :data:`KEEP` entries and at most :data:`MAX_BYTES` of them (whichever is reached first
drops the oldest), and a message over :data:`MAX_INTACT` bytes keeps only its first :data:`HEAD`
bytes (``truncated``; its size and SHA-256 still describe the whole message).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from kombu.entity import Exchange, Queue

from storage.errors import InvalidInput

log = logging.getLogger(__name__)

NAME: Final = "leasehold.dead"  # the Redis list and the AMQP queue
BYTES_SUFFIX: Final = ".bytes"  # Redis: the key counting the list's bytes
KEEP: Final = 1000  # newest dead letters kept
MAX_BYTES: Final = 64 * 1024 * 1024  # stored bytes kept, whatever their number
MAX_INTACT: Final = 8 * 1024 * 1024  # a message up to this size is kept byte for byte
HEAD: Final = 64 * 1024  # what is kept of a larger one
STAGES: Final = ("transport", "consumer")
_SHOWN: Final = 6  # characters of a long hex run (a lease token) that a log line may show
_HEX_RUN: Final = re.compile(rf"(?i)\b([0-9a-f]{{{_SHOWN}}})[0-9a-f]{{10,}}\b")
_REASON_CHARS: Final = 300


class CorruptDeadLetter(InvalidInput):
    """A stored dead letter that is not one of ours (edited or written by hand)."""


def redact(text: str, limit: int = _REASON_CHARS) -> str:
    """``text`` fit for a log line: one line, bounded, with every long hex run (a lease token, a
    digest, a secret) cut to its first characters, as ``Lease.__repr__`` shows a token."""
    line = " ".join(str(text).split())
    line = _HEX_RUN.sub(lambda m: f"{m.group(1)}…", line)
    return line if len(line) <= limit else f"{line[: limit - 1]}…"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    at: str  # ISO 8601, UTC, from the refusing worker's clock (for people, not for leases)
    reason: str
    stage: str
    queue: str | None
    task: str | None
    task_id: str | None
    size: int  # of the whole message
    sha256: str  # of the whole message
    raw: bytes  # the message, or its first HEAD bytes if truncated
    truncated: bool

    @classmethod
    def of(
        cls,
        raw: bytes,
        *,
        reason: str,
        stage: str,
        queue: str | None = None,
        task: str | None = None,
        task_id: str | None = None,
        now: datetime | None = None,
    ) -> DeadLetter:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
        truncated = len(raw) > MAX_INTACT
        return cls(
            at=(now or datetime.now(UTC)).isoformat(timespec="milliseconds"),
            reason=redact(reason),
            stage=stage,
            queue=_short(queue),
            task=_short(task),
            task_id=_short(task_id),
            size=len(raw),
            sha256=hashlib.sha256(raw).hexdigest(),
            raw=raw[:HEAD] if truncated else raw,
            truncated=truncated,
        )

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "at": self.at,
                "reason": self.reason,
                "stage": self.stage,
                "queue": self.queue,
                "task": self.task,
                "id": self.task_id,
                "size": self.size,
                "sha256": self.sha256,
                "truncated": self.truncated,
                "raw": base64.b64encode(self.raw).decode("ascii"),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> DeadLetter:
        try:
            d = json.loads(data)
            return cls(
                at=str(d["at"]),
                reason=str(d["reason"]),
                stage=str(d["stage"]),
                queue=d["queue"],
                task=d["task"],
                task_id=d["id"],
                size=int(d["size"]),
                sha256=str(d["sha256"]),
                raw=base64.b64decode(d["raw"], validate=True),
                truncated=bool(d["truncated"]),
            )
        except (ValueError, TypeError, KeyError, binascii.Error) as exc:
            raise CorruptDeadLetter(f"not a leasehold dead letter: {redact(str(exc))}") from None

    def summary(self, *, when: bool = True) -> str:
        """One line for people: (when,) why, what; never the message itself."""
        what = [f"queue {self.queue!r}" if self.queue else "queue ?"]
        if self.task:
            what.append(f"task {self.task!r}")
        if self.task_id:
            what.append(f"id {self.task_id}")
        what.append(f"{self.size} bytes" + (", truncated" if self.truncated else ""))
        text = f"{self.stage}: {self.reason} ({', '.join(what)})"
        return f"{self.at} {text}" if when else text


def _short(value: str | None, limit: int = 200) -> str | None:
    return None if value is None else redact(value, limit)


class Store(Protocol):
    """Where one broker's dead letters live."""

    @property
    def where(self) -> str:
        """For people: e.g. ``redis list 'leasehold.dead'``."""
        ...

    def put(self, letter: DeadLetter) -> None:
        """Keep ``letter``, dropping the oldest beyond the bound."""
        ...

    def count(self) -> int: ...

    def size(self) -> int | None:
        """The bytes the store holds (its entries as stored), or None where it cannot tell."""
        ...

    def newest(self, n: int) -> list[DeadLetter]:
        """Up to ``n`` dead letters, newest first (none where the store cannot be read without
        taking them)."""
        ...


def report(letter: DeadLetter, store: Store | None) -> None:
    """The one log line of a dead letter."""
    kept = f"kept in {store.where}" if store is not None else "NOT kept (see the error above)"
    log.error("refused a message: %s; %s", letter.summary(when=False), kept)


# --- Redis -----------------------------------------------------------------------------------

# LPUSH the entry, count its bytes, then drop the oldest (RPOP) while the list is over either
# bound; the newest entry always stays. An emptied list (an operator's DEL) restarts the count.
_PUT_SCRIPT: Final = """
local n = redis.call('LPUSH', KEYS[1], ARGV[1])
local total
if n == 1 then
  total = #ARGV[1]
  redis.call('SET', KEYS[2], total)
else
  total = redis.call('INCRBY', KEYS[2], #ARGV[1])
end
while n > 1 and (n > tonumber(ARGV[2]) or total > tonumber(ARGV[3])) do
  local old = redis.call('RPOP', KEYS[1])
  total = redis.call('DECRBY', KEYS[2], #old)
  n = n - 1
end
return n
"""
# Read with EVAL too: kombu's key-prefixing client prefixes some list commands and not others,
# and this store prefixes its keys itself.
_READ_SCRIPT: Final = """
local n = redis.call('LLEN', KEYS[1])
local total = 0
if n > 0 then total = tonumber(redis.call('GET', KEYS[2]) or '0') end
return {n, total, redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)}
"""


class RedisStore:
    """The Redis list ``leasehold.dead`` in the broker's database, newest first."""

    def __init__(self, client: Any, *, prefix: str = "", key: str = NAME) -> None:
        self._client = client
        self._key = f"{prefix}{key}"

    @property
    def where(self) -> str:
        return f"redis list {self._key!r}"

    def put(self, letter: DeadLetter) -> None:
        self._client.eval(
            _PUT_SCRIPT, 2, self._key, self._key + BYTES_SUFFIX, letter.to_json(), KEEP, MAX_BYTES
        )

    def count(self) -> int:
        return self._read(0)[0]

    def size(self) -> int:
        return self._read(0)[1]

    def newest(self, n: int) -> list[DeadLetter]:
        return [DeadLetter.from_json(raw) for raw in self._read(n)[2]] if n > 0 else []

    def _read(self, n: int) -> tuple[int, int, list[bytes]]:
        count, total, items = self._client.eval(
            _READ_SCRIPT, 2, self._key, self._key + BYTES_SUFFIX, n
        )
        return int(count), int(total), list(items)


# --- the embedded broker's folder ------------------------------------------------------------


class FolderStore:
    """One JSON file per dead letter, named ``<ns since epoch>-<random>.json``: sorted oldest
    first. Written under a temporary name and renamed, so a reader never sees half a file."""

    SUFFIX: Final = ".json"

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)

    @property
    def where(self) -> str:
        return f"folder {str(self.folder)!r}"

    def put(self, letter: DeadLetter) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        partial = self.folder / f".{name}.tmp"  # not *.json: never listed
        partial.write_bytes(letter.to_json())
        os.replace(partial, self.folder / f"{name}{self.SUFFIX}")
        self._trim()

    def count(self) -> int:
        return len(self._files())

    def size(self) -> int:
        total = 0
        for path in self._files():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue  # dropped meanwhile
        return total

    def newest(self, n: int) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        for path in reversed(self._files()):
            if len(out) >= n:
                break
            try:
                out.append(DeadLetter.from_json(path.read_bytes()))
            except OSError:
                continue  # dropped meanwhile
        return out

    def _files(self) -> list[Path]:
        try:
            return sorted(self.folder.glob(f"*{self.SUFFIX}"))
        except FileNotFoundError:
            return []

    def _trim(self) -> None:
        """Drop the oldest files beyond either bound (two workers trimming at once both drop
        the same oldest files; the newest always stays)."""
        kept = total = 0
        for path in reversed(self._files()):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            kept += 1
            total += size
            if kept > 1 and (kept > KEEP or total > MAX_BYTES):
                path.unlink(missing_ok=True)


# --- any other transport (RabbitMQ) ------------------------------------------------------------


class QueueStore:
    """The queue ``leasehold.dead`` on a broker with real queues (AMQP): each dead letter is one
    message of its own (JSON); the broker enforces the bound with queue arguments. Its entries
    cannot be read without taking them, so :meth:`newest` has none; read them with the broker's
    own tools (e.g. RabbitMQ's management UI "Get messages", which can requeue)."""

    def __init__(self, connection: Any, *, name: str = NAME) -> None:
        self._connection = connection
        self._exchange: Any = Exchange(name, type="direct", durable=True)  # type: ignore[no-untyped-call]
        self._queue: Any = Queue(  # type: ignore[no-untyped-call]
            name,
            self._exchange,
            routing_key=name,
            durable=True,
            max_length=KEEP,
            max_length_bytes=MAX_BYTES,
        )

    @property
    def where(self) -> str:
        return f"queue {self._queue.name!r}"

    def put(self, letter: DeadLetter) -> None:
        with self._connection.Producer() as producer:
            producer.publish(
                letter.to_json(),
                exchange=self._exchange,
                routing_key=self._queue.routing_key,
                declare=[self._queue],
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                retry=True,
                retry_policy={"max_retries": 3},
            )

    def count(self) -> int:
        channel = self._connection.default_channel
        try:
            _, count, _ = self._queue(channel).queue_declare(passive=True)
        except self._connection.channel_errors:
            return 0  # never declared: nothing was ever refused
        return int(count)

    def size(self) -> None:
        return None  # AMQP tells a queue's length, not its bytes

    def newest(self, n: int) -> list[DeadLetter]:
        return []


# --- which store -----------------------------------------------------------------------------


def folder_of(transport_options: dict[str, Any]) -> Path:
    """The embedded broker's dead-letter folder: ``dead_letter_folder``, else ``dead`` beside
    its queue folder."""
    given = transport_options.get("dead_letter_folder")
    if given:
        return Path(given)
    return Path(transport_options.get("data_folder_in") or "data_in").parent / "dead"


@contextmanager
def open_store(app: Any) -> Iterator[Store]:
    """The dead letters of ``app``'s broker, for reading (``leasehold doctor``)."""
    url = str(app.conf.broker_url)
    if url.startswith("filesystem://"):
        yield FolderStore(folder_of(dict(app.conf.broker_transport_options or {})))
        return
    with app.connection_for_read() as conn:
        if url.startswith(("redis://", "rediss://", "unix://")):
            channel = conn.default_channel
            yield RedisStore(channel.client, prefix=getattr(channel, "global_keyprefix", "") or "")
        else:
            yield QueueStore(conn)


def keep(
    letter: DeadLetter, store: Store | None, *, fatal: tuple[type[BaseException], ...] = ()
) -> bool:
    """Put ``letter`` in ``store`` and log its one line. Errors in ``fatal`` (the broker's
    connection errors) propagate, so that the message is not acknowledged and the broker gives
    it back after the reconnect; any other error is logged and the letter is lost: a message
    must never come back forever because its copy could not be made."""
    if store is None:
        log.error("no dead-letter store for this broker")
        report(letter, None)
        return False
    try:
        store.put(letter)
    except fatal:
        raise
    except Exception as exc:
        log.error("could not keep a dead letter in %s: %s", store.where, redact(repr(exc)))
        report(letter, None)
        return False
    report(letter, store)
    return True
