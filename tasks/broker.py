"""kombu's ``filesystem://`` transport (the embedded default's broker), safe against reading a
message file that its producer is still writing.

kombu's producer creates the file, then locks it and writes the message; its consumer moves and
reads any file of the queue without looking at the lock, so it can read the file empty or half
written and fail with ``JSONDecodeError``, which a Celery worker treats as an unrecoverable error
and exits (kombu issue #1551). Here a consumer takes only a file it can lock shared and finds
non-empty (the producer holds its exclusive lock for the whole write), and claims it with an
atomic rename, so two consumers never both take it. A file that still does not parse (its
producer died mid-write, or another program wrote it) is moved to the dead letters: the broker is
a doorbell, and reclaim re-dispatches what a lost message would have started.

Its consumer can also be woken from another thread (:meth:`Transport.wake`): a worker on this
broker runs Celery's blocking consumer loop, which does work queued for the consumer thread (such
as taking applies again once an apply slot frees, ``tasks/slots.py``) only between waits of up
to two seconds.

Both transports here, this one and Redis's (:class:`RedisTransport`), refuse what a producer
wrote that is not a kombu envelope at all (bytes that are not JSON, JSON that is not an envelope,
an envelope kombu cannot turn into a message: ``tasks/envelope.py`` :func:`~tasks.envelope.screen`)
at the one place that still holds the bytes, the channel that popped them. kombu would raise out
of the consumer there and stop the worker, the message gone. Instead the bytes go to the broker's
dead letters (``tasks/deadletter.py``: a folder beside the queue folder here, the Redis list
``leasehold.dead`` there) with one log line, and the consumer carries on. What is an envelope but
not a task message leasehold can run is refused one step later, by the worker's consumer, alike
on every transport (``tasks/guard.py``).

Importing this module makes these the transports of every ``filesystem://``, ``redis://`` and
``rediss://`` URL in the process; ``tasks.app`` imports it, so workers, beat and the CLI use them.
(``sentinel://`` keeps kombu's transport.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem, redis

from tasks import deadletter
from tasks.envelope import Refused, screen

log = logging.getLogger(__name__)


def _text(value: bytes | str) -> str:
    """kombu's ``bytes_to_str``."""
    return value.decode() if isinstance(value, bytes) else value


class _Screening:
    """What both channels add: screening the bytes they popped before kombu reads them."""

    @property
    def dead_letters(self) -> deadletter.Store:
        raise NotImplementedError

    def _admit(self, raw: bytes, queue: str) -> dict[str, Any] | None:
        """The envelope in ``raw``, or None once it is in the dead letters."""
        channel: Any = self  # a kombu channel (untyped)
        try:
            return screen(raw, channel.decode_body)
        except Refused as exc:
            letter = deadletter.DeadLetter.of(raw, reason=str(exc), stage="transport", queue=queue)
            # A connection error propagates: the popped bytes are lost, as kombu would lose them.
            deadletter.keep(
                letter, self.dead_letters, fatal=tuple(channel.connection.connection_errors)
            )
            return None


def _complete(path: str) -> bytes | None:
    """The file's content if no producer is writing it now, else None."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError:
        return None  # claimed by another consumer meanwhile
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return None  # its producer holds the lock: still writing
        try:
            data = f.read()
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return data or None  # empty: created, not yet locked by its producer


class Channel(_Screening, filesystem.Channel):
    @property
    def dead_letters(self) -> deadletter.Store:
        return deadletter.FolderStore(deadletter.folder_of(self.transport_options))

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        wanted = f"{queue}.msg"
        for filename in sorted(os.listdir(self.data_folder_in)):
            if filename.partition(".")[2] != wanted:
                continue
            path = os.path.join(self.data_folder_in, filename)
            payload = _complete(path)
            if payload is None:
                continue
            claimed = f"{path}.{uuid.uuid4().hex}.claimed"  # no longer matches any queue
            try:
                os.rename(path, claimed)
            except OSError:
                continue  # another consumer took it
            if self.store_processed:
                shutil.move(claimed, os.path.join(self.processed_folder, filename))
            else:
                os.remove(claimed)
            envelope = self._admit(payload, str(queue))
            if envelope is not None:
                return envelope
        raise Empty()


class Transport(filesystem.Transport):
    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)  # type: ignore[no-untyped-call]
        self._woken = threading.Event()

    def wake(self) -> None:
        """End the consumer's current wait for a message now (callable from any thread)."""
        self._woken.set()

    def drain_events(self, connection: Any, timeout: Any = None) -> Any:  # type: ignore[override]
        # kombu's virtual.Transport.drain_events, plus the wake-up between polls.
        cycle = self.cycle
        assert cycle is not None, "drain_events before the transport made its cycle"
        started = time.monotonic()
        interval = self.polling_interval
        if timeout and interval and interval > timeout:
            interval = timeout
        while True:
            try:
                cycle.get(self._deliver, timeout=timeout)  # type: ignore[no-untyped-call]
            except Empty:
                if self._woken.is_set() or (
                    timeout is not None and time.monotonic() - started >= timeout
                ):
                    self._woken.clear()
                    raise TimeoutError() from None  # socket.timeout
                if interval is not None:
                    time.sleep(interval)
            else:
                return


class RedisChannel(_Screening, redis.Channel):
    """kombu's Redis channel, screening what it pops (``BRPOP``, and ``RPOP`` for a basic get)
    before kombu's ``loads``. The two readers are kombu 5.7's, with that one change
    (``tests/unit/test_deadletter.py`` notices when kombu's change)."""

    @property
    def dead_letters(self) -> deadletter.Store:
        client = self._create_client()  # type: ignore[no-untyped-call]
        return deadletter.RedisStore(client, prefix=self.global_keyprefix or "")

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next
                # iteration will reconnect automatically.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = _text(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            envelope = self._admit(item, dest)
            if envelope is not None:
                self.connection._deliver(envelope, dest)
            return True  # refused: the poller looks again, as after a delivery
        finally:
            self._in_poll = None  # type: ignore[assignment]
            # kombu 5.7: flush a streaming re-auth token now that the connection is idle.
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        channel: Any = self  # kombu's helpers are untyped
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while item := client.rpop(channel._q_for_pri(queue, pri)):
                    envelope = self._admit(item, str(queue))
                    if envelope is not None:
                        channel._maybe_update_queues_expire(client, queue)
                        return envelope
            channel._maybe_update_queues_expire(client, queue)
            raise Empty()


class RedisTransport(redis.Transport):
    Channel = RedisChannel


TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
TRANSPORT_ALIASES["redis"] = f"{__name__}:RedisTransport"
TRANSPORT_ALIASES["rediss"] = f"{__name__}:RedisTransport"
