"""kombu's ``filesystem://`` transport (the embedded default's broker), safe against reading a
message file that its producer is still writing.

kombu's producer creates the file, then locks it and writes the message; its consumer moves and
reads any file of the queue without looking at the lock, so it can read the file empty or half
written and fail with ``JSONDecodeError``, which a Celery worker treats as an unrecoverable error
and exits (kombu issue #1551). Here a consumer takes only a file it can lock shared and finds
non-empty (the producer holds its exclusive lock for the whole write), and claims it with an
atomic rename, so two consumers never both take it. A file that still does not parse (its
producer died mid-write) is dropped with a warning: the broker is a doorbell, and reclaim
re-dispatches what a lost message would have started.

Its consumer can also be woken from another thread (:meth:`Transport.wake`): a worker on this
broker runs Celery's blocking consumer loop, which does work queued for the consumer thread (such
as taking applies again once an apply slot frees, ``tasks/slots.py``) only between waits of up
to two seconds.

Importing this module makes it the transport of every ``filesystem://`` URL in the process;
``tasks.app`` imports it, so workers, beat and the CLI use it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils import json as kombu_json

log = logging.getLogger(__name__)
_loads: Callable[[str], Any] = kombu_json.loads  # kombu's, for its own type markers


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


class Channel(filesystem.Channel):
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
            try:
                return _loads(payload.decode())
            except ValueError:  # includes UnicodeDecodeError
                log.warning("dropped a corrupt message file %s (its producer died?)", filename)
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


TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
