"""The faults of the chaos campaign (``bench/chaos.py``): what each one does to the rig, and how it
is healed. Every choice a fault makes (which worker, how long, which poison) comes from the
arguments its plan drew from the seed, never from the clock, so a seed replays the same faults.

One fault per resource at a time, so that every heal is the inverse of one injection: the loop
defers a fault due on a resource that is still faulted (a worker still frozen, the store still
down) until its heal (``Injector.busy_until``), and an injection heals its resource first anyway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import redis

from tasks.testing.processes import CeleryProcess
from tasks.testing.standin import GitHubStandIn
from tests.e2e.faults import Link
from tests.servers import Namespace, PrivateMariaDB, PrivateRedis

KINDS = (
    "worker_kill",
    "worker_stop",
    "beat_kill",
    "db_conn_kill",
    "redis_restart",
    "partition",
    "store_restart",
    "target_failover",
    "clock_jump",
    "poison",
    "github_5xx",
    "github_hang",
    "github_refuse",
    "github_latency",
)
# How often each kind is drawn after every kind had its turn: the cheap faults more often.
WEIGHTS = {
    "worker_kill": 3,
    "worker_stop": 3,
    "beat_kill": 1,
    "db_conn_kill": 2,
    "redis_restart": 1,
    "partition": 1,
    "store_restart": 1,
    "target_failover": 1,
    "clock_jump": 1,
    "poison": 2,
    "github_5xx": 2,
    "github_hang": 1,
    "github_refuse": 1,
    "github_latency": 1,
}
# What each kind of fault (but the workers', which name their process) acts on.
RESOURCES = {
    "beat_kill": "beat",
    "db_conn_kill": "store",
    "clock_jump": "store",
    "store_restart": "store",
    "redis_restart": "redis",
    "poison": "redis",
    "partition": "partition",
    "target_failover": "target",
    "github_5xx": "github",
    "github_hang": "github",
    "github_refuse": "github",
    "github_latency": "github",
}
ZONES = ("+00:00", "+01:00", "-05:00", "+09:30", "-11:00", "+13:00", "SYSTEM")
STORE_DATABASE = "leasehold"
# Kept small: the 5 MB submit of test_poison pushed every few seconds only measures Redis.
MAX_POISON_BYTES = 200_000


@dataclass
class Rig:
    """Everything the faults act on: the servers, the celery processes and the links."""

    store: PrivateMariaDB
    redis: PrivateRedis
    github: GitHubStandIn
    workers: list[CeleryProcess]
    beat: CeleryProcess
    poisons: list[tuple[str, str, bytes]]  # (name, queue, raw message)
    target: PrivateMariaDB | None = None
    ns: Namespace | None = None
    ns_redis: Link | None = None
    ns_worker: CeleryProcess | None = None


@dataclass
class Heal:
    due: float  # time.monotonic()
    what: str
    action: Callable[[], object]


def _signal(proc: CeleryProcess, sig: int) -> None:
    """``sig`` to the process group of ``proc``, if it still runs."""
    if proc.proc is not None and proc.proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def _alive(proc: CeleryProcess) -> bool:
    return proc.proc is not None and proc.proc.poll() is None


def _reap(proc: CeleryProcess) -> None:
    """SIGKILL ``proc`` (if it runs) and wait for it: a child never waited for is a zombie, and
    its ``Popen`` warns when collected."""
    _signal(proc, signal.SIGCONT)
    _signal(proc, signal.SIGKILL)
    if proc.proc is not None:
        with suppress(subprocess.TimeoutExpired):
            proc.proc.wait(10)


def _restart(proc: CeleryProcess) -> None:
    _reap(proc)
    proc.start()


@dataclass
class Injector:
    """Injects planned faults into ``rig`` and heals them when due; ``log`` gets one line each."""

    rig: Rig
    log: Callable[[str], None]
    heals: dict[str, Heal] = field(default_factory=dict)  # resource -> its pending heal
    injected: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # kind -> why it cannot run here
    exits: list[str] = field(default_factory=list)  # processes that exited on their own

    def available(self, kind: str) -> bool:
        if kind == "partition" and self.rig.ns is None:
            self.skipped[kind] = "no network namespace (needs root, ip and socat)"
        elif kind == "target_failover" and self.rig.target is None:
            self.skipped[kind] = "no mysql target"
        else:
            return True
        return False

    # --- the loop's two entry points ------------------------------------------------------------

    def inject(self, kind: str, args: dict[str, Any]) -> bool:
        """Inject one fault of ``kind``; False if it cannot run on this rig."""
        if not self.available(kind):
            return False
        getattr(self, f"_{kind}")(**args)
        self.injected[kind] = self.injected.get(kind, 0) + 1
        return True

    def busy_until(self, kind: str, args: dict[str, Any]) -> float | None:
        """When the resource a fault of ``kind`` would hit is healed, if it is faulted now. The
        loop defers such a fault until then: faults never cut each other's outages short."""
        if kind.startswith("worker_"):
            resource = self.rig.workers[args["index"] % len(self.rig.workers)].name
        else:
            resource = RESOURCES[kind]
        heal = self.heals.get(resource)
        return None if heal is None else heal.due

    def heal_due(self, now: float) -> None:
        for resource in [r for r, h in self.heals.items() if h.due <= now]:
            self._heal(resource)
        self._revive()

    def _revive(self) -> None:
        """Restart a process that exited when no fault of ours holds it down: a worker restarted
        while the store was down may end its start-up checks with an error. Each exit is logged
        (with its code) and counted, for the report."""
        for proc in [*self.rig.workers, self.rig.beat]:
            resource = "beat" if proc is self.rig.beat else proc.name
            if resource not in self.heals and not _alive(proc):
                code = None if proc.proc is None else proc.proc.returncode
                self.exits.append(f"{proc.name} exited with {code}")
                self.log(f"{proc.name} exited on its own with {code}: restarting it")
                _restart(proc)

    def heal_all(self) -> None:
        for resource in list(self.heals):
            self._heal(resource)
        self.rig.github.clear_faults()
        for proc in [*self.rig.workers, self.rig.beat]:
            _signal(proc, signal.SIGCONT)
        self._revive()

    def ready(self, timeout: float) -> None:
        """Wait until every worker is ready, restarting one that exits while starting."""
        for proc in self.rig.workers:
            for attempt in (1, 2, 3):
                try:
                    proc.wait_ready(timeout)
                    break
                except (RuntimeError, TimeoutError) as exc:
                    why = str(exc).splitlines()[0]
                    self.log(f"{proc.name} not ready ({why}), attempt {attempt}")
                    _restart(proc)

    def _heal(self, resource: str) -> None:
        heal = self.heals.pop(resource, None)
        if heal is not None:
            self.log(f"heal {resource}: {heal.what}")
            try:
                heal.action()
            except Exception as exc:  # e.g. a server that did not come back: try once more
                self.log(f"heal {resource} failed ({exc!r}); trying again")
                heal.action()

    def _hold(self, resource: str, seconds: float, what: str, action: Callable[[], object]) -> None:
        self._heal(resource)  # one fault per resource: the earlier one ends first
        self.heals[resource] = Heal(time.monotonic() + seconds, what, action)

    # --- processes ------------------------------------------------------------------------------

    def _worker(self, index: int) -> tuple[str, CeleryProcess]:
        proc = self.rig.workers[index % len(self.rig.workers)]
        self._heal(proc.name)
        return proc.name, proc

    def _worker_kill(self, index: int, down: float) -> None:
        resource, proc = self._worker(index)
        _reap(proc)
        self.log(f"fault worker_kill: SIGKILL {proc.name} pid {proc.pid}, restart in {down:.1f}s")
        self.heals[resource] = Heal(
            time.monotonic() + down, f"restart {proc.name}", lambda: _restart(proc)
        )

    def _worker_stop(self, index: int, down: float) -> None:
        resource, proc = self._worker(index)
        if not _alive(proc):
            _restart(proc)  # a worker that exited: freeze a new one
        _signal(proc, signal.SIGSTOP)
        self.log(f"fault worker_stop: SIGSTOP {proc.name} pid {proc.pid} for {down:.1f}s")
        self.heals[resource] = Heal(
            time.monotonic() + down, f"SIGCONT {proc.name}", lambda: _signal(proc, signal.SIGCONT)
        )

    def _beat_kill(self, down: float) -> None:
        beat = self.rig.beat
        self._heal("beat")
        _reap(beat)
        self.log(f"fault beat_kill: SIGKILL {beat.name}, restart in {down:.1f}s")
        self._hold("beat", down, f"restart {beat.name}", lambda: _restart(beat))

    # --- the store ------------------------------------------------------------------------------

    def _store_up(self) -> None:
        self._heal("store")

    def _sessions(self) -> list[int]:
        rows = self.rig.store.execute(
            "SELECT ID FROM information_schema.PROCESSLIST "
            f"WHERE ID <> CONNECTION_ID() AND DB = '{STORE_DATABASE}'"
        )
        return sorted(int(r[0]) for r in rows)

    def _kill_sessions(self, share: float, pick: int) -> int:
        sessions = self._sessions()
        count = max(1, round(len(sessions) * share)) if sessions else 0
        start = pick % len(sessions) if sessions else 0
        chosen = (sessions[start:] + sessions[:start])[:count]
        for session in chosen:
            with suppress(Exception):  # it may have ended meanwhile
                self.rig.store.execute(f"KILL CONNECTION {session:d}")
        return len(chosen)

    def _db_conn_kill(self, share: float, pick: int) -> None:
        self._store_up()
        killed = self._kill_sessions(share, pick)
        self.log(f"fault db_conn_kill: KILL CONNECTION of {killed} leasehold sessions")

    def _clock_jump(self, zone: str) -> None:
        self._store_up()
        self.rig.store.execute(f"SET GLOBAL time_zone = '{zone}'")
        # New sessions take the new zone: cut the old ones, as a DST change on a pooled server
        # shows up once connections are recycled.
        killed = self._kill_sessions(1.0, 0)
        self.log(f"fault clock_jump: store time_zone -> {zone}, {killed} sessions cut")

    def _store_restart(self, down: float) -> None:
        self._store_up()
        self.rig.store.kill()
        self.log(f"fault store_restart: SIGKILL mariadbd, start in {down:.1f}s")
        self._hold("store", down, "start mariadbd", self.rig.store.start)

    def _target_failover(self, down: float) -> None:
        target = self.rig.target
        assert target is not None
        self._heal("target")
        target.kill()
        self.log(f"fault target_failover: SIGKILL the target mariadbd, start in {down:.1f}s")
        self._hold("target", down, "start the target mariadbd", target.start)

    # --- the broker -----------------------------------------------------------------------------

    def _redis_restart(self, down: float) -> None:
        self._heal("redis")
        self.rig.redis.kill()
        self.log(f"fault redis_restart: SIGKILL redis-server (queued messages lost), {down:.1f}s")
        self._hold("redis", down, "start redis-server", self.rig.redis.start)

    def _poison(self, pick: int) -> None:
        self._heal("redis")
        name, queue, raw = self.rig.poisons[pick % len(self.rig.poisons)]
        client = redis.Redis.from_url(self.rig.redis.url(0))
        try:
            client.lpush(queue, raw)
        finally:
            client.close()
        self.log(f"fault poison: LPUSH {name!r} ({len(raw)} bytes) onto {queue}")

    # --- the network ----------------------------------------------------------------------------

    def _partition(self, down: float) -> None:
        ns, link = self.rig.ns, self.rig.ns_redis
        assert ns is not None
        assert link is not None
        self._heal("partition")

        def heal() -> None:
            ns.heal()
            link.heal()

        ns.cut()
        link.cut()
        self.log(f"fault partition: {ns.name} cut from store, redis, github for {down:.1f}s")
        self._hold("partition", down, f"heal {ns.name}", heal)

    # --- GitHub ---------------------------------------------------------------------------------

    def _github_5xx(self, count: int, status: int) -> None:
        self._heal("github")
        self.rig.github.fail_next(count, status=status)
        self.log(f"fault github_5xx: the next {count} GitHub requests answer {status}")

    def _github_hang(self, down: float) -> None:
        github = self.rig.github
        self._heal("github")
        gate = github.hold("*", ".*")
        self.log(f"fault github_hang: GitHub accepts and never answers for {down:.1f}s")
        self._hold("github", down, "release GitHub", gate.release)

    def _github_refuse(self, down: float) -> None:
        github = self.rig.github
        self._heal("github")
        github.stop()
        self.log(f"fault github_refuse: GitHub refuses connections for {down:.1f}s")
        self._hold("github", down, "start GitHub", lambda: _start_quietly(github))

    def _github_latency(self, seconds: float, down: float) -> None:
        github = self.rig.github
        self._heal("github")
        github.add_latency(seconds)
        self.log(f"fault github_latency: +{seconds:.1f}s per GitHub request for {down:.1f}s")
        self._hold("github", down, "clear GitHub latency", github.clear_faults)


def _start_quietly(github: GitHubStandIn) -> None:
    # The same port (fixed at construction); a socket in TIME_WAIT may delay the bind briefly.
    for _ in range(50):
        try:
            github.start()
            return
        except OSError:
            time.sleep(0.1)
    github.start()


def draw(kind: str, rng: Any) -> dict[str, Any]:
    """The arguments of one fault of ``kind``, drawn from ``rng`` (a seeded ``random.Random``).
    Some freezes and outages outlast ``stale_after`` (3 s), some do not: both paths run."""
    if kind == "worker_kill":
        return {"index": rng.randrange(64), "down": rng.uniform(0.5, 3.0)}
    if kind == "worker_stop":
        return {"index": rng.randrange(64), "down": rng.uniform(1.0, 7.0)}
    if kind == "beat_kill":
        return {"down": rng.uniform(0.5, 3.0)}
    if kind == "db_conn_kill":
        return {"share": rng.choice((0.25, 0.5, 1.0)), "pick": rng.randrange(1000)}
    if kind == "redis_restart":
        return {"down": rng.uniform(0.5, 4.0)}
    if kind == "partition":
        return {"down": rng.uniform(2.0, 8.0)}
    if kind == "store_restart":
        return {"down": rng.uniform(1.0, 8.0)}
    if kind == "target_failover":
        return {"down": rng.uniform(1.0, 6.0)}
    if kind == "clock_jump":
        return {"zone": rng.choice(ZONES)}
    if kind == "poison":
        return {"pick": rng.randrange(1000)}
    if kind == "github_5xx":
        return {"count": rng.randint(1, 10), "status": rng.choice((500, 502, 503))}
    if kind in ("github_hang", "github_refuse"):
        return {"down": rng.uniform(2.0, 15.0)}
    if kind == "github_latency":
        return {"seconds": rng.uniform(0.3, 3.0), "down": rng.uniform(3.0, 15.0)}
    raise ValueError(f"unknown fault kind {kind!r}")


def targets_json(host: str, port: int, names: list[str]) -> str:
    """``LEASEHOLD_TARGETS`` naming each of ``names`` as a database on one server."""
    return json.dumps({name: f"mysql+mysqldb://root@{host}:{port}/{name}" for name in names})
