"""Stop latency with every apply slot busy, against the same with an idle worker, in one run.

The brake must not depend on how busy the fleet is (issue 7): ``control_apply`` is served by the
worker's control pool, never by its apply slots, and the running apply's owner acts on the stop
at its next heartbeat. One ``celery worker`` with ``--slots`` apply slots (default 4), no beat,
on Redis + MariaDB by default (a scratch database, dropped at the end; the Redis database of
``--redis-url``, default 15, is emptied before and after) or on the embedded default
(``--stack embedded``). Heartbeat every 0.5 s.

- idle: one long apply runs, every other slot is free; stop it.
- busy: every slot runs a long apply and more wait in the broker for a slot (the worker has
  stopped consuming its apply queue); stop one of the running ones. A waiting apply then takes
  the freed slot, and a new one is submitted, so the next sample is taken as busy again.

Before each stop the bench dwells a random 0.5-1.5 s (seeded, ``--seed``), so that the stop lands
at a random phase of the owner's heartbeat, which is when the owner looks for requests. A sample
is the time from ``send_task("leasehold.control_apply", stop)`` until this process sees the apply
``stopped`` in the database (polling every 2 ms). Blocks of idle and busy samples alternate, so
that drift hits both alike; the first block of each kind is a warm-up.

The last line is ``control_stop_latency_ratio=<x>``: median busy over median idle (the goal is
<= 1.5); ``unavailable`` when the services do not answer. Figures, not assertions.

Run: ``.venv/bin/python bench/control_latency.py [--samples 40] [--stack redis-mariadb|embedded]``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from storage.database import Database, open_database

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _common
from bench.failover import (
    INTERVALS,
    REDIS_ENV,
    STACKS,
    Cluster,
    Stack,
    apply_by_request,
    open_stack,
    sleep_apply,
    summary,
    wait_for,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
LONG = 3600.0  # a running apply outlives the run unless stopped
BLOCK = 5  # samples per block; blocks of idle and busy alternate
WORKER = "bench-c"


class Latency:
    def __init__(self, db: Database, cluster: Cluster, slots: int, rng: random.Random) -> None:
        from tasks.app import app

        self.app = app
        self.rng = rng
        self.db = db
        self.cluster = cluster
        self.slots = slots
        self.samples: dict[str, list[float]] = {"idle": [], "busy": []}
        self.live: list[int] = []  # every apply submitted and not yet stopped or cancelled

    def submit(self) -> int:
        request_id = f"bench-control-{uuid.uuid4().hex}"
        self.app.send_task("leasehold.submit_apply", kwargs=sleep_apply(request_id, LONG))
        row = wait_for(
            f"apply {request_id} to be submitted",
            lambda: apply_by_request(self.db, request_id),
            timeout=60,
            check=self.alive,
        )
        self.live.append(int(row["id"]))
        return int(row["id"])

    def state(self, apply_id: int) -> str:
        from storage import applies

        return str(applies.get(self.db, apply_id)["state"])

    def running(self) -> list[int]:
        return [a for a in self.live if self.state(a) == "running"]

    def wait_running(self, count: int) -> list[int]:
        return wait_for(
            f"{count} applies running",
            lambda: found if len(found := self.running()) >= count else None,
            timeout=60,
            check=self.alive,
        )

    def alive(self) -> None:
        self.cluster.check_alive(WORKER)

    def stop(self, apply_id: int, kind: str | None) -> None:
        time.sleep(self.rng.uniform(0.5, 1.5))  # a random phase of its heartbeat, not a sync
        started = time.perf_counter()
        self.app.send_task(
            "leasehold.control_apply", kwargs={"apply_id": apply_id, "action": "stop"}
        )
        wait_for(
            f"apply {apply_id} to stop",
            lambda: True if self.state(apply_id) == "stopped" else None,
            timeout=60,
            interval=0.002,
            check=self.alive,
        )
        if kind is not None:
            self.samples[kind].append(time.perf_counter() - started)
        self.live.remove(apply_id)

    def cancel_all(self) -> None:
        for apply_id in list(self.live):
            self.app.send_task(
                "leasehold.control_apply", kwargs={"apply_id": apply_id, "action": "cancel"}
            )
        for apply_id in list(self.live):
            wait_for(
                f"apply {apply_id} to be cancelled",
                lambda a=apply_id: True if self.state(a) == "cancelled" else None,  # type: ignore[misc]
                timeout=60,
                check=self.alive,
            )
        self.live.clear()

    def idle_block(self, record: bool) -> None:
        for _ in range(BLOCK):
            target = self.submit()
            self.wait_running(1)
            self.stop(target, "idle" if record else None)

    def busy_block(self, record: bool, backlog: int) -> None:
        for _ in range(self.slots + backlog):
            self.submit()
        for _ in range(BLOCK):
            running = self.wait_running(self.slots)
            assert len(running) == self.slots, running  # never more than the slots
            self.submit()  # keep applies waiting in the broker
            self.stop(running[0], "busy" if record else None)
        self.cancel_all()


def run(stack: Stack, samples: int, slots: int, backlog: int, seed: int) -> Latency:
    stack.activate()
    cluster = Cluster(stack)
    db = open_database(stack.database_url, pool_size=2)
    try:
        cluster.start_worker(WORKER, apply_slots=slots).wait_ready(timeout=60)
        bench = Latency(db, cluster, slots, random.Random(seed))
        bench.idle_block(record=False)
        bench.busy_block(record=False, backlog=backlog)
        for block in range(2 * (samples // BLOCK)):
            if block % 2 == 0:
                bench.busy_block(record=True, backlog=backlog)
            else:
                bench.idle_block(record=True)
        return bench
    except BaseException:
        print(f"--- the end of the worker's log:\n{cluster.log_tail(WORKER)}", file=sys.stderr)
        raise
    finally:
        cluster.stop_all()
        db.dispose()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=40, help="of each kind (>= 10)")
    parser.add_argument("--slots", type=int, default=4, help="apply slots of the worker")
    parser.add_argument("--backlog", type=int, default=2, help="applies waiting when busy")
    parser.add_argument("--seed", type=int, default=7, help="of the dwell before each stop")
    parser.add_argument("--stack", choices=STACKS, default="redis-mariadb")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_ENV) or DEFAULT_REDIS_URL,
        help="a Redis database it may empty",
    )
    parser.add_argument("--mysql-url", default=_common.mysql_server_url(), help="server URL")
    args = parser.parse_args(argv)
    if args.samples < 10:
        parser.error("--samples must be at least 10")
    if args.slots < 1 or args.backlog < 1:
        parser.error("--slots and --backlog must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        with open_stack(
            args.stack, redis=args.redis_url, mysql_server=args.mysql_url, intervals=INTERVALS
        ) as stack:
            print(
                f"stack {stack.describe()}; one worker, {args.slots} apply slots, heartbeat "
                f"{INTERVALS['LEASEHOLD_HEARTBEAT_INTERVAL']} s, no beat"
            )
            print(f"{args.samples} stops of each kind in alternating blocks of {BLOCK}")
            bench = run(stack, args.samples, args.slots, args.backlog, args.seed)
    except _common.BackendUnavailable as exc:
        print(f"== {args.stack}: SKIPPED, NOT MEASURED: {exc}")
        print("control_stop_latency_ratio=unavailable")
        return 0
    idle, busy = bench.samples["idle"], bench.samples["busy"]
    print(f"== {args.stack}, {time.monotonic() - started:.0f} s in all")
    print(f"stop, idle worker:          {summary(idle, unit='ms')}")
    print(f"stop, every apply slot busy: {summary(busy, unit='ms')}")
    ratio = _common.ratio(statistics.median(busy), statistics.median(idle))
    print(f"control_stop_latency_ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
