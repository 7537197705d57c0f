"""RabbitMQ as the end-to-end tests see it: ``rabbitmqctl`` (run as root on the broker's machine)
for what AMQP itself does not tell a client (unacknowledged counts, which channel consumes),
and the server's application settings that a test may lower for a while and must give back.
"""

from __future__ import annotations

import fcntl
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests import support
from tests.e2e.helpers import Stack


def broker_url(stack: Stack) -> str:
    """The stack's broker URL; the embedded default names none (celeryconfig's filesystem://)."""
    return stack.env.get("LEASEHOLD_BROKER_URL") or "filesystem://"


def is_amqp(stack: Stack) -> bool:
    return broker_url(stack).startswith(("amqp://", "amqps://", "pyamqp://"))


def vhost_of(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def ctl(*args: str) -> str:
    """``rabbitmqctl ARGS`` (silent: no banner, no table headers); its stdout, or AssertionError."""
    done = subprocess.run(
        ["rabbitmqctl", "-s", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _rows(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Depth:
    ready: int  # waiting in the queue
    unacked: int  # delivered to a consumer, not yet acknowledged


def depth(vhost: str, queue: str) -> Depth:
    """Where ``queue``'s messages are; a queue not (yet) declared holds none."""
    for name, ready, unacked in _rows(
        ctl("list_queues", "-p", vhost, "name", "messages_ready", "messages_unacknowledged")
    ):
        if name == queue:
            return Depth(int(ready), int(unacked))
    return Depth(0, 0)


@dataclass(frozen=True)
class Consumption:
    queue: str
    channel: str  # the channel's Erlang pid: a reconnect or a closed channel makes a new one
    tag: str


def consumers(vhost: str) -> list[Consumption]:
    return [
        Consumption(queue, channel, tag)
        for queue, channel, tag, *_ in _rows(
            ctl("list_consumers", "-p", vhost, "queue_name", "channel_pid", "consumer_tag")
        )
    ]


def version() -> str:
    found = re.search(r"RabbitMQ version: (\S+)", ctl("status"))
    return found.group(1) if found else "unknown"


def _get_env(key: str) -> str:
    """The server's ``rabbit`` application setting as an Erlang term (``{ok,V}``/``undefined``)."""
    return ctl("eval", f"application:get_env(rabbit, {key}).").strip()


def _put_env(key: str, term: str) -> None:
    found = re.fullmatch(r"\{ok,(.*)\}", term, re.DOTALL)
    if found:
        ctl("eval", f"application:set_env(rabbit, {key}, {found.group(1)}).")
    else:
        ctl("eval", f"application:unset_env(rabbit, {key}).")


class ServerSettings:
    """Settings of the whole RabbitMQ node, changed for a while: every change is given back by
    :meth:`restore` (idempotent), which the context manager :func:`server_settings` calls on
    the way out whatever happened."""

    def __init__(self) -> None:
        self._originals: dict[str, str] = {}

    def set(self, key: str, value: int) -> None:
        if not re.fullmatch(r"[a-z_]+", key):
            raise ValueError(f"not a setting name: {key!r}")
        self._originals.setdefault(key, _get_env(key))
        ctl("eval", f"application:set_env(rabbit, {key}, {int(value)}).")

    def restore(self, *keys: str) -> None:
        for key in keys or list(self._originals):
            original = self._originals.pop(key, None)
            if original is not None:
                _put_env(key, original)


# Machine-wide, not under TMPDIR: rabbitmqctl reaches this machine's node whatever the TMPDIR of
# the run. Two runs changing the node at once would each take the other's value for the original.
SETTINGS_LOCK = Path("/tmp/leasehold-rabbitmq-node-settings.lock")
LOCK_WAIT = 300.0


@contextmanager
def server_settings() -> Iterator[ServerSettings]:
    with open(SETTINGS_LOCK, "a") as lock:
        if not support.flock_within(lock, LOCK_WAIT):
            raise TimeoutError(f"another run held {SETTINGS_LOCK} for {LOCK_WAIT:g}s")
        settings = ServerSettings()
        try:
            yield settings
        finally:
            try:
                settings.restore()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
