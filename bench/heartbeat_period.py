"""Does a worker's heartbeat keep its period while engines in the same process burn CPU?

One ``tasks.heartbeat.Heartbeats`` (the worker's single heartbeat thread, with its watchdog)
holds ``--leases`` running leases on a scratch store and beats every ``--interval`` seconds for
``--seconds``, in three phases run in this one process, interleaved so that drift hits all alike:

- ``idle``: nothing else runs;
- ``cpu``: ``--burners`` threads run a CPU-bound engine's inner loop (pure Python arithmetic,
  holding the GIL between CPython's switch intervals), as a checksum or a data-copy engine would;
- ``cpu+gil``: the same, plus ``sys.setswitchinterval`` at 50 ms instead of 5 ms, the worst a
  C extension that rarely releases the GIL could look like.

Per phase it reports the period between consecutive beats (p50/p99/max), how late each beat
started against its schedule, the beats that failed, and the leases presumed lost (must be 0).

The last line is ``heartbeat_period_p99_ratio_cpu=<p99 period with burners / p99 idle>
heartbeat_late_p99_ms_cpu=<ms>``. Figures, not assertions.

Run: ``.venv/bin/python bench/heartbeat_period.py [--store mariadb|postgres|sqlite]
[--leases 500] [--burners 2] [--interval 1.0] [--seconds 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _common, _stores
from leases import Lease
from storage.database import Database, open_database
from tasks.heartbeat import Heartbeats
from tasks.interrupts import Interrupts

PHASES = ("idle", "cpu", "cpu+gil")


@dataclass
class Phase:
    name: str
    periods: list[float]
    lates: list[float]
    beats: int
    failures: int
    presumed: int

    def line(self) -> str:
        p = sorted(self.periods) or [0.0]
        late = sorted(self.lates) or [0.0]
        return (
            f"{self.name:8s} beats={self.beats:4d} failed={self.failures} presumed_lost="
            f"{self.presumed} period p50={statistics.median(p):.3f}s p99={_p(p, 0.99):.3f}s "
            f"max={p[-1]:.3f}s late p50={1000 * statistics.median(late):.1f}ms "
            f"p99={1000 * _p(late, 0.99):.1f}ms max={1000 * late[-1]:.1f}ms"
        )


def _p(ordered: Sequence[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@contextmanager
def burning(threads: int, switch_interval: float | None) -> Iterator[None]:
    stop = threading.Event()

    def burn() -> None:
        x = 0
        while not stop.is_set():
            for i in range(10_000):
                x = (x * 31 + i) % 1_000_003

    previous = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    burners = [threading.Thread(target=burn, daemon=True) for _ in range(threads)]
    for t in burners:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in burners:
            t.join()
        sys.setswitchinterval(previous)


class Timed(Heartbeats):
    """The worker's heartbeat, recording when each beat started."""

    def __init__(self, db: Database, *, interval: float, stale_after: float) -> None:
        super().__init__(db, interval=interval, stale_after=stale_after)
        self.started: list[float] = []

    def beat_once(self) -> bool:
        self.started.append(time.monotonic())
        return super().beat_once()


def run_phase(name: str, url: str, args: argparse.Namespace, leases: list[Lease]) -> Phase:
    db = open_database(url, pool_size=2)
    beats = Timed(db, interval=args.interval, stale_after=args.interval * 5)
    held = [(lease, Interrupts()) for lease in leases]
    for lease, interrupts in held:
        beats.hold(lease, interrupts)
    burners = 0 if name == "idle" else args.burners
    switch = 0.05 if name == "cpu+gil" else None
    try:
        with burning(burners, switch):
            beats.start()
            time.sleep(args.seconds)
            beats.stop()
            beats.join(30)
    finally:
        db.dispose()
    periods = [b - a for a, b in zip(beats.started, beats.started[1:], strict=False)]
    presumed = sum(1 for _, i in held if i.lost is not None)
    return Phase(name, periods, list(beats.lates), beats.beats, beats.failures, presumed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--store", default=_stores.MARIADB, choices=list(_stores.STORES))
    parser.add_argument("--leases", type=int, default=500)
    parser.add_argument("--burners", type=int, default=2)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2, help="each phase this many times")
    _stores.add_server_arguments(parser)
    args = parser.parse_args(argv)
    try:
        scratch = _stores.scratch(args.store, args)
        with scratch as url:
            setup = open_database(url)
            try:
                leases = [_common.running_lease(setup)[0] for _ in range(args.leases)]
            finally:
                setup.dispose()
            print(
                f"{args.store}: {args.leases} leases, heartbeat every {args.interval:g}s, "
                f"{args.burners} CPU-bound threads, {args.seconds:g}s per phase"
            )
            results: dict[str, list[Phase]] = {name: [] for name in PHASES}
            for round_ in range(args.rounds):
                order = PHASES if round_ % 2 == 0 else tuple(reversed(PHASES))
                for name in order:
                    phase = run_phase(name, url, args, leases)
                    print(phase.line(), flush=True)
                    results[name].append(phase)
    except _common.BackendUnavailable as exc:
        print(f"SKIPPED, NOT MEASURED: {exc}")
        print("heartbeat_period_p99_ratio_cpu=unavailable heartbeat_late_p99_ms_cpu=unavailable")
        return 0

    def merged(name: str) -> tuple[list[float], list[float]]:
        periods = sorted(p for ph in results[name] for p in ph.periods)
        lates = sorted(x for ph in results[name] for x in ph.lates)
        return periods, lates

    idle, _ = merged("idle")
    cpu, cpu_late = merged("cpu")
    presumed = sum(ph.presumed for phases in results.values() for ph in phases)
    print(f"presumed_lost_total={presumed}")
    ratio = _common.ratio(_p(cpu, 0.99), _p(idle, 0.99))
    print(
        f"heartbeat_period_p99_ratio_cpu={ratio:.2f} "
        f"heartbeat_late_p99_ms_cpu={1000 * _p(cpu_late, 0.99):.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
