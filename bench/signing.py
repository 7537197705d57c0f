"""What signing costs a short job: ``bench/overhead.py``'s apply and plain round trip, each
measured with unsigned messages and with signed ones (``LEASEHOLD_SECURITY_*``, Celery's ``auth``
serializer: tasks/security.py, docs/security.md "Signed messages") on the same stack.

- unsigned: a ``celery worker`` without ``LEASEHOLD_SECURITY_*``; the client sends JSON.
- signed: a ``celery worker`` with them (its own key and certificate, a store holding its own and
  the client's certificate), so it takes only signed messages and signs what it sends (the
  ``run_apply`` dispatch); the client signs as another app would (``register_auth`` with its own
  key, ``serializer="auth"``). Results stay JSON in both. RSA 2048 keys, self-signed
  (``tests/certs.py``), made at the start. After each phase the newest apply's requester is
  checked: ``CN=deploy-bot`` (the verified signer) in the signed phases only.

The kinds and their timing are ``Overhead``'s (apply end to end by the client's clock and by the
database clock, plain ``celery.accumulate`` round trip, reclaim round trip for context). The two
modes run in phases, each with a fresh worker (2 apply slots, no beat) and ``WARMUP`` uncounted
iterations: ``--rounds`` rounds of two phases, in the order A B, B A, A B, ... so that drift,
linear drift in particular, hits both modes alike. The stack is overhead.py's (``--redis-url``
default database 12, emptied before and after; ``--stack embedded``).

The last two lines are ``signed_round_trip_ratio=<x>`` (median signed plain round trip over median
unsigned one) and ``signed_apply_overhead_ratio=<y>`` (the same for the apply, client clock);
``unavailable`` when the services do not answer. Figures, not assertions.

Run: ``.venv/bin/python bench/signing.py [--iterations 100] [--rounds 3] [--stack ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import select

from storage.database import Database, open_database
from storage.tables import applies

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _common
from bench.failover import INTERVALS, REDIS_ENV, STACKS, Cluster, Stack, open_stack, summary
from bench.overhead import KINDS, WARMUP, Overhead
from tests.certs import self_signed, signing_as

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
MODES = ("unsigned", "signed")
SIGNER = "deploy-bot"  # the client's common name
SECURITY_VARS = tuple(f"LEASEHOLD_SECURITY_{v}" for v in ("KEY", "CERTIFICATE", "CERT_STORE"))


def client_bench(db: Database, serializer: str) -> Overhead:
    """``Overhead``'s timings, sent by a client app of their own that sends ``serializer``."""
    from tasks.app import LeaseholdApp

    bench = Overhead(db)
    bench.app = LeaseholdApp(f"leasehold-bench-{serializer}", set_as_current=False)
    bench.app.config_from_object("celeryconfig")
    bench.app.conf.task_serializer = serializer
    return bench


def phase(cluster: Cluster, name: str, bench: Overhead, first: int, count: int) -> str:
    """A fresh worker, warm-up rounds, ``count`` counted iterations; the worker stopped after."""
    cluster.start_worker(name).wait_ready(timeout=60)
    try:
        for i in range(WARMUP):
            bench.iteration(first + i, record=False)
        for i in range(count):
            bench.iteration(first + i, record=True)
            cluster.check_alive(name)
    finally:
        cluster.procs[name].stop(timeout=15)
    with bench.db.transaction() as conn:  # who the worker says sent the newest apply
        newest = select(applies.c.requested_by).order_by(applies.c.id.desc()).limit(1)
        signer = conn.execute(newest).scalar_one()
    if (signer == f"CN={SIGNER}") != name.endswith("-signed"):
        raise RuntimeError(f"{name}: the newest apply was requested by {signer!r}")
    apply, plain = (statistics.median(bench.samples[k][-count:]) * 1000 for k in KINDS[:2])
    return f"apply {apply:.1f} ms, plain {plain:.1f} ms (n={count})"


def run(stack: Stack, iterations: int, rounds: int) -> dict[str, Overhead]:
    stack.activate()
    keys = stack.folder / "keys"
    worker, client = self_signed(keys, "leasehold-worker"), self_signed(keys, SIGNER)
    paths = (worker.key_path, worker.cert_path, keys / "*.pem")  # store: both certificates
    signed_env = {name: str(path) for name, path in zip(SECURITY_VARS, paths, strict=True)}
    signed = dataclasses.replace(stack, settings=stack.settings | signed_env)
    clusters = {"unsigned": Cluster(stack), "signed": Cluster(signed)}
    db = open_database(stack.database_url, pool_size=2)
    benches = {"unsigned": client_bench(db, "json"), "signed": client_bench(db, "auth")}
    counts = [iterations // rounds + (r < iterations % rounds) for r in range(rounds)]
    try:
        with signing_as(client):
            first = 0
            for r, count in enumerate(counts):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    figures = phase(clusters[mode], f"bench-{mode}", benches[mode], first, count)
                    print(f"   round {r + 1} {mode:>8}: {figures}", flush=True)
                first += WARMUP + count
        return benches
    except BaseException:
        for mode, cluster in clusters.items():
            if cluster.procs:
                tail = cluster.log_tail(f"bench-{mode}")
                print(f"--- the end of the {mode} worker's log:\n{tail}", file=sys.stderr)
        raise
    finally:
        for cluster in clusters.values():
            cluster.stop_all()
        for bench in benches.values():
            bench.app.close()
        db.dispose()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=100, help="of each kind and mode (>= 30)")
    parser.add_argument("--rounds", type=int, default=3, help="of a phase per mode each (>= 1)")
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
    if not 1 <= args.rounds <= args.iterations:
        parser.error("--rounds must be between 1 and --iterations")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for name in SECURITY_VARS:  # the bench decides which worker signs, not the shell
        os.environ.pop(name, None)
    started = time.monotonic()
    try:
        with open_stack(
            args.stack, redis=args.redis_url, mysql_server=args.mysql_url, intervals=INTERVALS
        ) as stack:
            print(f"stack {stack.describe()}; one worker (2 apply slots) per phase, no beat")
            print(
                f"{args.iterations} iterations of each kind per mode in {args.rounds} rounds "
                f"(A B, B A, ...), {WARMUP} warm-up per phase; RSA 2048 keys, sha256"
            )
            benches = run(stack, args.iterations, args.rounds)
    except _common.BackendUnavailable as exc:
        print(f"== {args.stack}: SKIPPED, NOT MEASURED: {exc}")
        print("signed_round_trip_ratio=unavailable")
        print("signed_apply_overhead_ratio=unavailable")
        return 0
    print(f"== {args.stack}, {time.monotonic() - started:.0f} s in all")
    rows: dict[str, Callable[[Overhead], list[float]]] = {
        "apply end to end (client clock)": lambda b: b.samples["apply"],
        "apply end to end (DB clock)": lambda b: b.apply_db,
        "plain round trip (no-op task)": lambda b: b.samples["plain"],
        "reclaim round trip (nothing)": lambda b: b.samples["reclaim"],
    }
    for label, samples in rows.items():
        for mode in MODES:
            print(f"{label}, {mode:>8}: {summary(samples(benches[mode]), unit='ms')}")
    medians = {
        (mode, kind): statistics.median(benches[mode].samples[kind])
        for mode in MODES
        for kind in KINDS
    }
    for kind in KINDS:
        added = (medians["signed", kind] - medians["unsigned", kind]) * 1000
        print(f"signed - unsigned median, {kind}: {added:+.1f} ms")
    round_trip = _common.ratio(medians["signed", "plain"], medians["unsigned", "plain"])
    apply = _common.ratio(medians["signed", "apply"], medians["unsigned", "apply"])
    print(f"signed_round_trip_ratio={round_trip:.2f}")
    print(f"signed_apply_overhead_ratio={apply:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
