"""How fast an apply moves to a new worker: after its worker is SIGKILLed (beat reclaims it once
the heartbeat is ``stale_after`` old), and after a warm shutdown (SIGTERM: the worker hands it back
at a safe point).

Real processes throughout (``tasks.testing.processes``): one ``celery beat`` and two ``celery
worker`` processes, ``bench-a`` and ``bench-b``, on Redis + MariaDB by default (a scratch database,
migrated and dropped at the end; the Redis database of ``--redis-url``, default 13, is emptied
before and after) or on the embedded default (``--stack embedded``: SQLite + the ``filesystem://``
broker in a temporary folder). One run:

1. submit a ``sleep``-engine apply (``send_task("leasehold.submit_apply")``, as another app would),
   one task of 600 s, and wait until a worker redeemed it and its apply task is running; the worker
   holding it is the victim, the other one the survivor (which is already running);
2. dwell a random 0.25-1.25 s, so that the signal lands at a random phase of the heartbeat and
   reclaim cycles (a chosen phase, not synchronization);
3. signal the victim's process group (SIGKILL, or SIGTERM for the handover runs) and read the
   database's ``NOW()`` right after: the kill time, by the database clock;
4. poll the database (with a deadline) until the apply's ``redeemed`` log row at a newer epoch
   exists; its ``created_at`` (database clock too) minus the kill time is the figure. The
   ``reclaimed`` / ``handed_back`` row in between splits it into "rotated" and "redeemed";
5. cancel the apply (``leasehold.control_apply``), restart the victim, wait until both workers are
   ready again. Roles follow whoever redeems the next apply.

Intervals are short, through the same ``LEASEHOLD_*`` variables as production (printed at the
start): heartbeat 0.5 s, stale_after 3 s, reclaim every 0.5 s, effect timeout 1 s, grace 1.5 s.
The expected SIGKILL bound is ``stale_after + reclaim_interval`` (plus dispatch and redeem): the
last heartbeat is at most ``heartbeat_interval`` before the kill, the apply is stale
``stale_after`` after it, and the next reclaim pass comes within ``reclaim_interval``.

The last line is ``failover_kill_to_resume_ratio=<x> handover_vs_kill_ratio=<y>``: the median
SIGKILL-to-resume over ``stale_after + reclaim_interval``, and the median handover over the median
SIGKILL-to-resume; ``unavailable`` when the services do not answer. Figures, not assertions.

Run: ``.venv/bin/python bench/failover.py [--runs 20] [--stack redis-mariadb|embedded]``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select

from storage import clock
from storage.database import Database, open_database, redact
from storage.migrate import upgrade
from storage.tables import applies, apply_logs, apply_tasks
from tasks.testing.processes import CeleryProcess, beat, worker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _common

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")
REDIS_ENV = "LEASEHOLD_BENCH_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
STACKS = ("redis-mariadb", "embedded")
# Short, but in the proportions of the defaults (5 / 30 / 5 s); all validated by celeryconfig.
INTERVALS = {
    "LEASEHOLD_HEARTBEAT_INTERVAL": "0.5",
    "LEASEHOLD_STALE_AFTER": "3",
    "LEASEHOLD_RECLAIM_INTERVAL": "0.5",
    "LEASEHOLD_EFFECT_TIMEOUT": "1",
    "LEASEHOLD_EFFECT_GRACE": "1.5",
}
APPLY_SECONDS = 600.0  # far longer than a run: every apply is cancelled once measured


def add_interval_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, str]) -> None:
    """``--heartbeat``, ``--stale-after`` and ``--reclaim-interval``, as every cluster bench
    takes them, defaulting to ``defaults``."""
    parser.add_argument("--heartbeat", default=defaults["LEASEHOLD_HEARTBEAT_INTERVAL"])
    parser.add_argument("--stale-after", default=defaults["LEASEHOLD_STALE_AFTER"])
    parser.add_argument("--reclaim-interval", default=defaults["LEASEHOLD_RECLAIM_INTERVAL"])


def intervals_of(args: argparse.Namespace, defaults: Mapping[str, str]) -> dict[str, str]:
    """``defaults`` with the three interval arguments applied: every process's environment."""
    intervals = dict(defaults)
    intervals.update(
        LEASEHOLD_HEARTBEAT_INTERVAL=str(args.heartbeat),
        LEASEHOLD_STALE_AFTER=str(args.stale_after),
        LEASEHOLD_RECLAIM_INTERVAL=str(args.reclaim_interval),
    )
    return intervals


# --- the stack: database, broker, result backend -------------------------------------------------


@dataclass
class Stack:
    """Where the processes run: URLs, a scratch folder, and the environment they all share."""

    kind: str
    database_url: str
    broker_url: str
    result_backend: str
    folder: Path
    settings: dict[str, str]

    @property
    def env(self) -> dict[str, str]:
        """The environment of every celery process (and of this one, see ``activate``)."""
        env = dict(os.environ)
        env.update(self.settings)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def activate(self) -> None:
        """Point this process's Celery app (``tasks.app``, configured lazily from
        ``celeryconfig``) at the stack. Call before anything reads ``app.conf``."""
        os.environ.update(self.settings)

    def describe(self) -> str:
        redis_part = "" if self.kind == "embedded" else f", broker/results {self.broker_url}"
        return f"{self.kind}: database {redact(self.database_url)}{redis_part}"


def migrate(url: str) -> None:
    db = open_database(url)
    try:
        upgrade(db)
    finally:
        db.dispose()


def redis_url() -> str:
    return os.environ.get(REDIS_ENV) or DEFAULT_REDIS_URL


def _flush_redis(url: str) -> None:
    """Empty the (bench-owned) Redis database of ``url``: stale messages of an aborted run would
    otherwise reach the new workers."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        raise _common.BackendUnavailable(f"Redis at {url} is unreachable: {exc}") from exc
    finally:
        client.close()


@contextmanager
def open_stack(
    kind: str,
    *,
    redis: str,
    mysql_server: str,
    intervals: Mapping[str, str],
) -> Iterator[Stack]:
    """A fresh stack, torn down at the end (also on failure): the scratch database dropped, the
    Redis database emptied, the temporary folder removed."""
    with tempfile.TemporaryDirectory(prefix="leasehold-bench-") as tmp:
        folder = Path(tmp)
        settings = dict(intervals)
        settings["LEASEHOLD_VAR_DIR"] = str(folder / "var")
        if kind == "embedded":
            database_url = f"sqlite:///{folder / 'leasehold.sqlite3'}"
            migrate(database_url)
            settings.update(
                LEASEHOLD_DATABASE_URL=database_url,
                LEASEHOLD_BROKER_URL="filesystem://",
                LEASEHOLD_RESULT_BACKEND=f"db+sqlite:///{folder / 'results.sqlite3'}",
            )
            yield Stack(kind, database_url, "filesystem://", "db+sqlite", folder, settings)
            return
        _flush_redis(redis)
        try:
            with _common.scratch_mysql(mysql_server) as database_url:
                settings.update(
                    LEASEHOLD_DATABASE_URL=database_url,
                    LEASEHOLD_BROKER_URL=redis,
                    LEASEHOLD_RESULT_BACKEND=redis,
                )
                yield Stack(kind, database_url, redis, redis, folder, settings)
        finally:
            _flush_redis(redis)


# --- processes -----------------------------------------------------------------------------------


@dataclass
class Cluster:
    """The celery processes of a bench, by name; every one is stopped at the end."""

    stack: Stack
    procs: dict[str, CeleryProcess] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    def start_worker(self, name: str, *, apply_slots: int = 2) -> CeleryProcess:
        # A log file per incarnation: wait_ready looks for "ready." in the whole file.
        self.starts[name] = self.starts.get(name, 0) + 1
        proc = worker(
            name,
            env=self.stack.env,
            cwd=self.stack.folder,
            logfile=self.stack.folder / f"{name}.{self.starts[name]}.log",
            apply_slots=apply_slots,
        )
        self.procs[name] = proc.start()
        return proc

    def start_beat(self) -> CeleryProcess:
        proc = beat(
            env=self.stack.env,
            cwd=self.stack.folder,
            logfile=self.stack.folder / "beat.log",
            schedule=self.stack.folder / "beat-schedule",
        )
        self.procs["beat"] = proc.start()
        return proc

    def check_alive(self, *names: str) -> None:
        for name in names:
            proc = self.procs[name]
            if proc.proc is None or proc.proc.poll() is not None:
                raise RuntimeError(f"{name} died unexpectedly:\n{proc.log()[-4000:]}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop(timeout=15)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        return self.procs[name].log()[-chars:]


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.02,
    check: Callable[[], None] | None = None,
) -> T:
    """Poll ``probe`` until it returns something other than None; TimeoutError at the deadline.
    ``check`` runs between polls, to fail fast (e.g. when a process that must live died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:g}s")
        time.sleep(interval)


# --- database reads ------------------------------------------------------------------------------


def db_now(db: Database) -> datetime:
    with db.transaction() as conn:
        value = conn.execute(select(clock.now())).scalar_one()
    assert isinstance(value, datetime), value
    return value


def apply_by_request(db: Database, request_id: str) -> dict[str, Any] | None:
    with db.transaction() as conn:
        row = (
            conn.execute(
                select(
                    applies.c.id,
                    applies.c.state,
                    applies.c.lease_epoch,
                    applies.c.lease_owner,
                    applies.c.created_at,
                    applies.c.finished_at,
                ).where(applies.c.request_id == request_id)
            )
            .mappings()
            .one_or_none()
        )
    return None if row is None else dict(row)


def apply_state(db: Database, apply_id: int) -> dict[str, Any]:
    with db.transaction() as conn:
        row = (
            conn.execute(
                select(applies.c.state, applies.c.lease_epoch, applies.c.lease_owner).where(
                    applies.c.id == apply_id
                )
            )
            .mappings()
            .one()
        )
        running_tasks = conn.execute(
            select(apply_tasks.c.id).where(
                apply_tasks.c.apply_id == apply_id, apply_tasks.c.state == "running"
            )
        ).all()
    return {**dict(row), "running_tasks": len(running_tasks)}


def log_after(db: Database, apply_id: int, event: str, epoch: int) -> dict[str, Any] | None:
    """The first ``event`` log row of the apply at an epoch newer than ``epoch``."""
    with db.transaction() as conn:
        row = (
            conn.execute(
                select(apply_logs.c.created_at, apply_logs.c.lease_epoch, apply_logs.c.message)
                .where(
                    apply_logs.c.apply_id == apply_id,
                    apply_logs.c.event == event,
                    apply_logs.c.lease_epoch > epoch,
                )
                .order_by(apply_logs.c.id)
                .limit(1)
            )
            .mappings()
            .one_or_none()
        )
    return None if row is None else dict(row)


def sleep_apply(request_id: str, seconds: float, *, database: str | None = None) -> dict[str, Any]:
    """The submit payload of a one-task ``sleep``-engine apply, on a database (so a line) of its
    own unless ``database`` is given: applies of one database run one at a time."""
    return {
        "database": database or f"db-{request_id}"[:128],
        "environment": "bench",
        "engine": "sleep",
        "request_id": request_id,
        "tasks": [
            {"table": "t0", "ddl": "ALTER TABLE t0 ADD c INT", "options": {"seconds": seconds}}
        ],
    }


# --- statistics ----------------------------------------------------------------------------------


def p95(samples: Sequence[float]) -> float:
    """The 95th percentile, interpolated between the order statistics (``inclusive``)."""
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=20, method="inclusive")[18]


def summary(samples: Sequence[float], *, unit: str = "s") -> str:
    """Median, p95, min and max of samples in seconds, shown in ``unit`` (s or ms)."""
    scale, digits = (1000.0, 1) if unit == "ms" else (1.0, 3)
    figures = {
        "median": statistics.median(samples),
        "p95": p95(samples),
        "min": min(samples),
        "max": max(samples),
    }
    shown = ", ".join(f"{k} {v * scale:.{digits}f} {unit}" for k, v in figures.items())
    return f"{shown} (n={len(samples)})"


# --- the failover runs ---------------------------------------------------------------------------

WORKERS = ("bench-a", "bench-b")


@dataclass(frozen=True)
class Sample:
    signal_name: str
    apply_id: int
    victim: str
    survivor: str
    epoch_before: int
    epoch_after: int
    rotated_s: float  # signal -> the reclaimed / handed_back row (the new lease minted)
    resumed_s: float  # signal -> the redeemed row at the new epoch (the survivor runs it)
    passed_on: int  # run_apply messages the victim took during its warm shutdown and passed on


class Failover:
    def __init__(self, stack: Stack, cluster: Cluster, db: Database, rng: random.Random) -> None:
        from tasks.app import app

        self.stack = stack
        self.cluster = cluster
        self.db = db
        self.rng = rng
        self.app = app
        self.stale_after = float(stack.settings["LEASEHOLD_STALE_AFTER"])
        self.reclaim_interval = float(stack.settings["LEASEHOLD_RECLAIM_INTERVAL"])

    def _alive(self) -> None:
        self.cluster.check_alive("beat")

    def run_once(self, sig: signal.Signals) -> Sample:
        request_id = f"bench-failover-{uuid.uuid4().hex}"
        self.app.send_task("leasehold.submit_apply", kwargs=sleep_apply(request_id, APPLY_SECONDS))

        def running() -> dict[str, Any] | None:
            row = apply_by_request(self.db, request_id)
            if row is None or row["state"] != "running":
                return None
            state = apply_state(self.db, int(row["id"]))
            return state | {"id": int(row["id"])} if state["running_tasks"] else None

        row = wait_for("the apply to run", running, timeout=60, check=self._alive)
        apply_id, epoch, owner = int(row["id"]), int(row["lease_epoch"]), str(row["lease_owner"])
        victim = owner.split("@", 1)[0]
        if victim not in WORKERS:
            raise RuntimeError(f"apply {apply_id} is held by an unknown worker: {owner}")
        survivor = next(name for name in WORKERS if name != victim)

        time.sleep(self.rng.uniform(0.25, 1.25))  # the phase of the kill, not synchronization
        self.cluster.check_alive(victim, survivor, "beat")
        killed_at = db_now(self.db)  # the DB clock right at the kill (one round trip before)
        self.cluster.procs[victim].send_signal(sig)

        redeemed = wait_for(
            "the apply to be redeemed at a new epoch",
            lambda: log_after(self.db, apply_id, "redeemed", epoch),
            timeout=self.stale_after + self.reclaim_interval + 60,
            check=lambda: self.cluster.check_alive(survivor, "beat"),
        )
        rotation = "reclaimed" if sig == signal.SIGKILL else "handed_back"
        rotated = log_after(self.db, apply_id, rotation, epoch)
        if rotated is None:
            raise RuntimeError(f"apply {apply_id}: redeemed without a {rotation!r} rotation")
        if f"by {survivor}@" not in str(redeemed["message"]):
            raise RuntimeError(f"apply {apply_id}: {redeemed['message']!r}, expected {survivor}")
        sample = Sample(
            signal_name=sig.name,
            apply_id=apply_id,
            victim=victim,
            survivor=survivor,
            epoch_before=epoch,
            epoch_after=int(redeemed["lease_epoch"]),
            rotated_s=(rotated["created_at"] - killed_at).total_seconds(),
            resumed_s=(redeemed["created_at"] - killed_at).total_seconds(),
            passed_on=self._reset(apply_id, victim),
        )
        return sample

    def _reset(self, apply_id: int, victim: str) -> int:
        """Cancel the apply (now the survivor's) and bring the victim back. Returns how many
        run_apply messages the victim passed on unredeemed while it shut down."""
        old = self.cluster.procs[victim]
        assert old.proc is not None
        old.proc.wait(60)  # SIGKILL: at once; SIGTERM: once the handover committed
        passed_on = old.log().count("'outcome': 'passed_on'")
        restarted = self.cluster.start_worker(victim)
        self.app.send_task(
            "leasehold.control_apply",
            kwargs={"apply_id": apply_id, "action": "cancel", "requested_by": "bench/failover"},
        )
        wait_for(
            f"apply {apply_id} to be cancelled",
            lambda: apply_state(self.db, apply_id)["state"] == "cancelled" or None,
            timeout=60,
        )
        restarted.wait_ready(timeout=60)
        return passed_on


def run(stack: Stack, runs: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    stack.activate()
    cluster = Cluster(stack)
    db = open_database(stack.database_url, pool_size=2)
    try:
        for name in WORKERS:
            cluster.start_worker(name)
        cluster.start_beat()
        for name in WORKERS:
            cluster.procs[name].wait_ready(timeout=60)
        bench = Failover(stack, cluster, db, random.Random(seed))
        results: dict[signal.Signals, list[Sample]] = {signal.SIGKILL: [], signal.SIGTERM: []}
        for sig in (signal.SIGKILL, signal.SIGTERM):
            label = "SIGKILL -> resume" if sig == signal.SIGKILL else "SIGTERM (warm) -> resume"
            print(f"-- {label}: {runs} runs", flush=True)
            for i in range(runs):
                sample = bench.run_once(sig)
                results[sig].append(sample)
                print(
                    f"   run {i + 1:>2}: apply {sample.apply_id} {sample.victim} -> "
                    f"{sample.survivor}, epoch {sample.epoch_before} -> {sample.epoch_after}: "
                    f"rotated {sample.rotated_s:.3f} s, resumed {sample.resumed_s:.3f} s"
                    + (
                        f" (passed on by {sample.victim}: {sample.passed_on})"
                        * bool(sample.passed_on)
                    ),
                    flush=True,
                )
        return results[signal.SIGKILL], results[signal.SIGTERM]
    except BaseException:
        for name in cluster.procs:
            print(f"--- the end of {name}'s log:\n{cluster.log_tail(name)}", file=sys.stderr)
        raise
    finally:
        cluster.stop_all()
        db.dispose()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20, help="runs per scenario (>= 10)")
    parser.add_argument("--stack", choices=STACKS, default="redis-mariadb")
    parser.add_argument("--redis-url", default=redis_url(), help="a Redis database it may empty")
    parser.add_argument("--mysql-url", default=_common.mysql_server_url(), help="server URL")
    add_interval_arguments(parser, INTERVALS)
    parser.add_argument("--seed", type=int, default=20240611, help="seeds the dwell times")
    args = parser.parse_args(argv)
    if args.runs < 10:
        parser.error("--runs must be at least 10 (medians and p95 of fewer mean little)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    intervals = intervals_of(args, INTERVALS)
    stale_after = float(intervals["LEASEHOLD_STALE_AFTER"])
    reclaim_interval = float(intervals["LEASEHOLD_RECLAIM_INTERVAL"])
    bound = stale_after + reclaim_interval
    print(
        "intervals (environment of every process): "
        + ", ".join(f"{k}={v}" for k, v in intervals.items())
    )
    started = time.monotonic()
    try:
        with open_stack(
            args.stack, redis=args.redis_url, mysql_server=args.mysql_url, intervals=intervals
        ) as stack:
            print(f"stack {stack.describe()}; workers {', '.join(WORKERS)} + beat", flush=True)
            killed, handed = run(stack, args.runs, args.seed)
    except _common.BackendUnavailable as exc:
        print(f"== {args.stack}: SKIPPED, NOT MEASURED: {exc}")
        print("failover_kill_to_resume_ratio=unavailable handover_vs_kill_ratio=unavailable")
        return 0
    kill = [s.resumed_s for s in killed]
    kill_rotated = [s.rotated_s for s in killed]
    hand = [s.resumed_s for s in handed]
    hand_rotated = [s.rotated_s for s in handed]
    print(f"== {args.stack}, {args.runs} runs each, {time.monotonic() - started:.0f} s in all")
    print(f"SIGKILL -> reclaimed:         {summary(kill_rotated)}")
    print(f"SIGKILL -> resumed (redeemed): {summary(kill)}")
    print(
        f"expected bound stale_after + reclaim_interval = {stale_after:g} + "
        f"{reclaim_interval:g} = {bound:g} s (lower end: stale_after - heartbeat_interval)"
    )
    print(f"SIGTERM -> handed back:       {summary(hand_rotated)}")
    print(f"SIGTERM -> resumed (redeemed): {summary(hand)}")
    passed = sum(s.passed_on for s in handed)
    print(f"handed-back messages the shutting-down worker took and passed on: {passed}")
    kill_ratio = _common.ratio(statistics.median(kill), bound)
    hand_ratio = _common.ratio(statistics.median(hand), statistics.median(kill))
    print(f"median kill-to-resume / (stale_after + reclaim_interval) = {kill_ratio:.3f}")
    print(f"median handover / median kill-to-resume = {hand_ratio:.4f}")
    print(f"failover_kill_to_resume_ratio={kill_ratio:.3f} handover_vs_kill_ratio={hand_ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
