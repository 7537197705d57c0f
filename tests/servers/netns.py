"""Network namespaces joined to this host by veth pairs: partitions by setting a link down."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

from tests.conftest import unavailable
from tests.servers._process import START_TIMEOUT, _kill, _wait_port

_SUBNETS = itertools.count(1)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def namespaces_available() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("socat") is None:
        return "ip (iproute2) and socat are needed"
    return None


class Namespace:
    """A network namespace whose only way out is a veth pair to this host, where ``socat``
    forwarders relay chosen ports to the host's loopback servers."""

    def __init__(self) -> None:
        reason = namespaces_available()
        if reason is not None:
            unavailable(reason)
        serial = next(_SUBNETS)
        tag = f"{os.getpid() % 100000}x{serial}"
        self.name = f"lh{tag}"
        self.host_if = f"lhh{tag}"[:15]
        self.ns_if = f"lhn{tag}"[:15]
        # A /28 of 10.213.0.0/16 per namespace (pid and serial keep concurrent runs apart).
        block = (os.getpid() * 7 + serial) % 4096
        prefix = f"10.213.{block // 16}"
        first = (block % 16) * 16
        self.host_ip = f"{prefix}.{first + 1}"
        self.ns_ip = f"{prefix}.{first + 2}"
        self.forwarders: list[subprocess.Popen[bytes]] = []
        self._created = False

    def create(self) -> Namespace:
        _ip("netns", "add", self.name)
        self._created = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/28", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.ns_ip}/28", "dev", self.ns_if)
        _ip("-n", self.name, "link", "set", self.ns_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def forward(self, port: int) -> tuple[str, int]:
        """Relay ``host_ip:port`` (reachable from the namespace) to ``127.0.0.1:port``; returns
        the address processes in the namespace use."""
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

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        """Drop every packet between the namespace and the host, without a reset."""
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def close(self) -> None:
        for proc in self.forwarders:
            _kill(proc)
        if self._created:
            # Deleting the namespace deletes its end of the pair, and with it the host's end.
            with suppress(subprocess.CalledProcessError):
                _ip("netns", "del", self.name)
            with suppress(subprocess.CalledProcessError):
                _ip("link", "del", self.host_if)


@contextmanager
def namespace() -> Iterator[Namespace]:
    ns = Namespace()
    try:
        yield ns.create()
    finally:
        ns.close()


# --- PostgreSQL ----------------------------------------------------------------------------------
