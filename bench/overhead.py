"""What leasehold adds to a short job: a minimal apply end to end against a plain Celery task round
trip on the same broker, the same worker and the same result backend.

- apply: ``send_task("leasehold.submit_apply", ...)`` of a ``sleep``-engine apply with one task of
  0 seconds, as another app would submit it, until the apply is ``completed`` in the database.
  That is two Celery tasks (``submit_apply``, which validates, inserts and dispatches in one
  transaction; then ``run_apply``, which redeems, reads the apply, its tasks and pending requests
  in one transaction, joins the worker's heartbeat, starts the task in the fence that confirms
  the lease before it runs, and completes it in the transaction that ends the lease and passes
  the line's turn on) and six database transactions, the last (the completion notification)
  after the apply is done. Timed two ways: by this process's clock
  until it sees the ``completed`` row (polling every 2 ms), and by the database clock from
  ``NOW()`` just before the send to the apply's ``finished_at`` (no polling in it).
- plain: ``send_task("celery.accumulate", args=[i]).get()``: Celery's built-in no-op task,
  registered in every worker, with its result through the result backend.
- reclaim, for context: ``send_task("leasehold.reclaim_stale_applies").get()`` with nothing stale
  (one Celery task and a reclaim pass that finds nothing).
- two hops, the floor's Celery part: ``celery.accumulate`` linked to a second ``celery.accumulate``
  (the worker sends the second when the first is done, as ``submit_apply`` sends ``run_apply``),
  until the second's result is in.
- store, the floor's other part: the same apply's store work in this process, with no broker
  between its two halves: ``service.submit`` then ``run_apply`` called in-process (``.apply()``),
  on the same database and result backend (its progress reports included).

``apply_floor_ratio`` is the median apply over the sum of the medians of two hops and the store
work: what is left once the two hops and the fenced transactions are paid (the floor the issue
names); 1.0 would mean leasehold adds nothing else.

One ``celery worker`` (2 apply slots) and no beat, on Redis + MariaDB by default (a
scratch database, dropped at the end; the Redis database of ``--redis-url``, default 14, is
emptied before and after) or on the embedded default (``--stack embedded``). The kinds are
interleaved, their order alternating per iteration so that drift hits all alike, after a few
warm-up rounds that are not counted.

The last line is ``apply_overhead_ratio=<x>``: median apply (seen by the client) over median plain
round trip; ``unavailable`` when the services do not answer. Figures, not assertions.

Run: ``.venv/bin/python bench/overhead.py [--iterations 100] [--stack redis-mariadb|embedded]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from leases import Lease
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
    db_now,
    open_stack,
    sleep_apply,
    summary,
    wait_for,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
WARMUP = 3
KINDS = ("apply", "plain", "reclaim", "two_hops", "store")


class Overhead:
    def __init__(self, db: Database) -> None:
        from tasks.app import app

        self.app = app
        self.db = db
        self.samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
        self.apply_db: list[float] = []

    def apply(self, record: bool) -> None:
        request_id = f"bench-overhead-{uuid.uuid4().hex}"
        payload = sleep_apply(request_id, 0, database="shop")  # one after another: one line
        sent_at = db_now(self.db)
        started = time.perf_counter()
        self.app.send_task("leasehold.submit_apply", kwargs=payload)

        def finished() -> dict[str, Any] | None:
            row = apply_by_request(self.db, request_id)
            if row is None or row["finished_at"] is None:
                return None
            return row

        row = wait_for("the apply to finish", finished, timeout=60, interval=0.002)
        elapsed = time.perf_counter() - started
        if row["state"] != "completed":
            raise RuntimeError(f"apply {row['id']} ended {row['state']}, not completed")
        if record:
            self.samples["apply"].append(elapsed)
            self.apply_db.append((row["finished_at"] - sent_at).total_seconds())

    def _round_trip(
        self, kind: str, name: str, args: list[Any], expected: object
    ) -> Callable[[bool], None]:
        def once(record: bool) -> None:
            started = time.perf_counter()
            result = self.app.send_task(name, args=args).get(timeout=60, interval=0.005)
            elapsed = time.perf_counter() - started
            if result != expected:
                raise RuntimeError(f"{name} returned {result!r}, expected {expected!r}")
            if record:
                self.samples[kind].append(elapsed)

        return once

    def two_hops(self, record: bool) -> None:
        second = self.app.signature("celery.accumulate")
        second_id = second.freeze().id
        started = time.perf_counter()
        self.app.send_task("celery.accumulate", args=[1], link=second)
        result = self.app.AsyncResult(second_id).get(timeout=60, interval=0.005)
        elapsed = time.perf_counter() - started
        if result != [[1]]:
            raise RuntimeError(f"the second hop returned {result!r}, expected [[1]]")
        if record:
            self.samples["two_hops"].append(elapsed)

    def store(self, record: bool) -> None:
        """One apply's store work with no broker between submit and run (see the docstring)."""
        from tasks import entrypoints, runtime, service

        sent: list[Lease] = []
        request_id = f"bench-overhead-store-{uuid.uuid4().hex}"
        payload = sleep_apply(request_id, 0, database="shop-in-process")
        started = time.perf_counter()
        apply_id = service.submit(runtime.database(), runtime.settings(), payload, sent.append)
        (lease,) = sent
        outcome = entrypoints.run_apply.apply(
            kwargs={"apply_id": apply_id, "lease": lease.to_json()}
        ).get(disable_sync_subtasks=False)
        elapsed = time.perf_counter() - started
        if outcome["outcome"] != "completed":
            raise RuntimeError(f"apply {apply_id} in-process ended {outcome!r}")
        if record:
            self.samples["store"].append(elapsed)

    def iteration(self, i: int, *, record: bool) -> None:
        steps: list[Callable[[bool], None]] = [
            self.apply,
            self._round_trip("plain", "celery.accumulate", [i], [i]),
            self._round_trip("reclaim", "leasehold.reclaim_stale_applies", [], 0),
            self.two_hops,
            self.store,
        ]
        if i % 2:
            steps.reverse()
        for step in steps:
            step(record)


def run(stack: Stack, iterations: int) -> Overhead:
    stack.activate()
    cluster = Cluster(stack)
    db = open_database(stack.database_url, pool_size=2)
    try:
        cluster.start_worker("bench-o").wait_ready(timeout=60)
        bench = Overhead(db)
        for i in range(WARMUP):
            bench.iteration(i, record=False)
        for i in range(iterations):
            bench.iteration(i, record=True)
            cluster.check_alive("bench-o")
        return bench
    except BaseException:
        print(f"--- the end of the worker's log:\n{cluster.log_tail('bench-o')}", file=sys.stderr)
        raise
    finally:
        cluster.stop_all()
        db.dispose()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=100, help="of each kind (>= 30)")
    parser.add_argument("--stack", choices=STACKS, default="redis-mariadb")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_ENV) or DEFAULT_REDIS_URL,
        help="a Redis database it may empty",
    )
    parser.add_argument("--mysql-url", default=_common.mysql_server_url(), help="server URL")
    args = parser.parse_args(argv)
    if args.iterations < 30:
        parser.error("--iterations must be at least 30")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        with open_stack(
            args.stack, redis=args.redis_url, mysql_server=args.mysql_url, intervals=INTERVALS
        ) as stack:
            print(f"stack {stack.describe()}; one worker (2 apply slots), no beat")
            print(f"{args.iterations} iterations of each kind, interleaved, {WARMUP} warm-up")
            bench = run(stack, args.iterations)
    except _common.BackendUnavailable as exc:
        print(f"== {args.stack}: SKIPPED, NOT MEASURED: {exc}")
        print("apply_overhead_ratio=unavailable")
        return 0
    apply, plain, reclaim, two_hops, store = (bench.samples[kind] for kind in KINDS)
    print(f"== {args.stack}, {time.monotonic() - started:.0f} s in all")
    print(f"apply end to end (client clock): {summary(apply, unit='ms')}")
    print(f"apply end to end (DB clock):     {summary(bench.apply_db, unit='ms')}")
    print(f"plain round trip (no-op task):   {summary(plain, unit='ms')}")
    print(f"reclaim round trip (nothing):    {summary(reclaim, unit='ms')}")
    print(f"two hops (linked no-op tasks):   {summary(two_hops, unit='ms')}")
    print(f"store work, in-process:          {summary(store, unit='ms')}")
    ratio = _common.ratio(statistics.median(apply), statistics.median(plain))
    db_ratio = _common.ratio(statistics.median(bench.apply_db), statistics.median(plain))
    reclaim_ratio = _common.ratio(statistics.median(apply), statistics.median(reclaim))
    print(f"median apply / median plain: {ratio:.2f} (DB clock: {db_ratio:.2f})")
    print(f"median apply / median reclaim round trip: {reclaim_ratio:.2f}")
    floor = statistics.median(two_hops) + statistics.median(store)
    floor_ratio = _common.ratio(statistics.median(apply), floor)
    print(
        f"floor (two hops + store work): {floor * 1000:.1f} ms, "
        f"{_common.ratio(floor, statistics.median(plain)):.2f} x plain; "
        f"median apply / floor: {floor_ratio:.2f}"
    )
    print(f"apply_overhead_ratio={ratio:.2f} apply_floor_ratio={floor_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
