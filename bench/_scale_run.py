"""One N of ``bench/scale.py``: a fresh cluster (beat and ``--workers`` worker processes with
room for every apply at once), N ``sleep`` applies submitted as another app would, the ramp-up,
the steady-state window's samples and counters, every apply cancelled, the processes' logs read;
its figures in a ``Result``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shutil
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import _stores
from bench._scale_proc import CLK_TCK, group_pids, load1, named_pids, proc_sample
from bench._scale_sampler import Sampler
from bench._scale_servers import Server
from bench.failover import Cluster, Stack, sleep_apply, wait_for

SPARE_SLOTS = 4
UNFINISHED = ("queued", "dispatched", "running")
STORE_PROCESSES = {_stores.MARIADB: ("mariadbd", "mysqld"), _stores.POSTGRES: ("postgres",)}
LOG_MARKS = re.compile(r"Traceback|ERROR|WARNING")


@dataclass
class Result:
    store: str
    n: int
    workers: int
    slots: int
    ramp_s: float | None = None
    all_running: bool = False
    window_s: float = 0.0
    samples: int = 0
    min_running: int = 0
    p50: float = math.nan
    p99: float = math.nan
    max_age: float = math.nan
    reclaims: int = 0
    presumed_lost: int = 0  # "lease presumed lost" lines in the workers' logs
    statements_per_apply_s: float | None = None
    transactions_per_apply_s: float = math.nan
    other_sessions: int = 0
    cpu_one_core: float = math.nan  # workers' CPU, % of one core
    beat_cpu: float = math.nan
    store_cpu: float = math.nan
    rss_mib: float = math.nan
    threads: int = 0
    peak_sessions: int = 0
    load_before: float = math.nan
    load_after: float = math.nan
    cancel_s: float = math.nan
    log_findings: dict[str, int] = field(default_factory=dict)
    log_examples: list[str] = field(default_factory=list)
    error: str | None = None

    def ok(self, interval: float) -> bool:
        return (
            self.error is None
            and self.all_running
            and self.samples > 0
            and self.min_running == self.n
            and self.reclaims == 0
            and self.presumed_lost == 0
            and self.p99 < 2 * interval
        )


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the order statistics."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = fraction * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class ScaleRun:
    def __init__(
        self,
        store: str,
        stack: Stack,
        sampler: Sampler,
        args: argparse.Namespace,
        server: Server | None,
        app: Any = None,
    ) -> None:
        """``app``: the Celery app that sends the submits and cancels; ``tasks.app`` (pointed at
        the stack by ``Stack.activate``) by default."""
        if app is None:
            from tasks.app import app as default_app

            app = default_app
        self.app = app
        self.store = store
        self.stack = stack
        self.sampler = sampler
        self.args = args
        self.interval = float(stack.settings["LEASEHOLD_HEARTBEAT_INTERVAL"])
        self.server = server

    def run(self, n: int) -> Result:
        workers = max(1, min(self.args.workers, n))
        slots = math.ceil(n / workers) + SPARE_SLOTS
        result = Result(self.store, n, workers, slots)
        folder = self.stack.folder / f"n{n}"
        folder.mkdir()
        stack = dataclasses.replace(self.stack, folder=folder)
        cluster = Cluster(stack)
        names = [f"scale-{chr(ord('a') + i)}" for i in range(workers)]
        base_id = self.sampler.max_apply_id()
        base_log_id = self.sampler.max_log_id()
        try:
            for name in names:
                cluster.start_worker(name, apply_slots=slots)
            cluster.start_beat()
            for name in names:
                cluster.procs[name].wait_ready(timeout=120)
            self._measure(n, cluster, names, base_id, base_log_id, result)
        except (TimeoutError, RuntimeError) as exc:
            result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            result.reclaims = self.sampler.reclaims(base_log_id)
            result.min_running = self.sampler.count(["running"], base_id)
            print(
                f"   FAILED: {result.error} ({result.min_running} running at that point, "
                f"{result.reclaims} reclaims so far)",
                flush=True,
            )
        finally:
            started = time.monotonic()
            try:
                self._cancel_all(base_id, cluster)
                result.cancel_s = time.monotonic() - started
            except TimeoutError as exc:
                result.error = result.error or f"cancel: {exc}"
                print(f"   FAILED: {exc}", flush=True)
            cluster.stop_all()
            self._read_logs(cluster, result)
        return result

    def _measure(
        self,
        n: int,
        cluster: Cluster,
        names: Sequence[str],
        base_id: int,
        base_log_id: int,
        result: Result,
    ) -> None:
        sampler = self.sampler
        pgids = [cluster.procs[name].pid for name in names]

        def alive() -> None:
            cluster.check_alive(*names, "beat")

        tag = uuid.uuid4().hex[:8]
        start_db = sampler.now()
        started = time.monotonic()
        for i in range(n):
            request_id = f"scale-{tag}-{n}-{i}"
            self.app.send_task(
                "leasehold.submit_apply",
                kwargs=sleep_apply(request_id, self.args.seconds, database=f"scale-{tag}-{i}"),
            )
        sent_s = time.monotonic() - started
        # The applies begin to end `seconds` after the first could have started, at the earliest.
        end_by = started + self.args.seconds - 3.0
        peak = 0

        def everyone_runs() -> bool | None:
            nonlocal peak
            peak = max(peak, sampler.sessions())
            return sampler.count(["running"], base_id) >= n or None

        ramp_timeout = max(10.0, end_by - time.monotonic() - 5.0)
        wait_for(
            f"{n} applies to run", everyone_runs, timeout=ramp_timeout, interval=0.25, check=alive
        )
        last = sampler.last_redeemed(base_id)
        assert last is not None
        result.all_running = True
        result.ramp_s = (last - start_db).total_seconds()
        print(
            f"   {n} submitted in {sent_s:.2f} s; all running {result.ramp_s:.2f} s after the "
            f"first submit (database clock)",
            flush=True,
        )
        time.sleep(2 * self.interval)  # settle: every lease renewed at least once in its batch
        window = min(self.args.window, end_by - time.monotonic())
        if window < 5.0:
            raise RuntimeError(
                f"no steady state left to measure ({window:.1f} s): --seconds is too short "
                f"for a ramp-up of {result.ramp_s:.1f} s"
            )
        ages: list[float] = []
        running_counts: list[int] = []
        rss_max = threads_max = 0
        statements0, transactions0, own0 = sampler.counters()
        procs0 = proc_sample(group_pids(pgids))
        beat0 = proc_sample(group_pids([cluster.procs["beat"].pid]))
        store_pids = self._store_pids()
        store0 = proc_sample(store_pids)
        t0 = time.monotonic()
        deadline = t0 + window
        next_at = t0
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if now < next_at:
                time.sleep(min(next_at - now, deadline - now))
                continue
            next_at += self.args.sample_every
            sample = sampler.ages()
            ages.extend(sample)
            running_counts.append(len(sample))
            peak = max(peak, sampler.sessions())
            mem = proc_sample(group_pids(pgids))
            rss_max = max(rss_max, mem.rss_kib)
            threads_max = max(threads_max, mem.threads)
            alive()
        elapsed = time.monotonic() - t0
        statements1, transactions1, own1 = sampler.counters()
        procs1 = proc_sample(group_pids(pgids))
        beat1 = proc_sample(group_pids([cluster.procs["beat"].pid]))
        store1 = proc_sample(store_pids)
        result.other_sessions = sampler.other_sessions() if self.server is None else 0
        result.reclaims = sampler.reclaims(base_log_id)
        result.load_after = load1()

        result.window_s = elapsed
        result.samples = len(running_counts)
        result.min_running = min(running_counts) if running_counts else 0
        result.p50, result.p99 = percentile(ages, 0.50), percentile(ages, 0.99)
        result.max_age = max(ages) if ages else math.nan
        # Per running apply: the mean number running over the samples (N when all of them ran).
        apply_seconds = statistics.fmean(running_counts or [n]) * elapsed
        own = own1 - own0
        if statements0 is not None and statements1 is not None:
            # The sampler's own statements: its session's Questions (MariaDB counts every one).
            result.statements_per_apply_s = (statements1 - statements0 - own) / apply_seconds
            result.transactions_per_apply_s = (transactions1 - transactions0) / apply_seconds
        else:
            # PostgreSQL: each of the sampler's autocommit statements is a transaction.
            result.transactions_per_apply_s = (transactions1 - transactions0 - own) / apply_seconds
        cpu_s = (procs1.ticks - procs0.ticks) / CLK_TCK
        result.cpu_one_core = 100.0 * cpu_s / elapsed
        result.beat_cpu = 100.0 * (beat1.ticks - beat0.ticks) / CLK_TCK / elapsed
        result.store_cpu = 100.0 * (store1.ticks - store0.ticks) / CLK_TCK / elapsed
        result.rss_mib = rss_max / 1024.0
        result.threads = threads_max
        result.peak_sessions = peak

    def _store_pids(self) -> list[int]:
        """The store server's processes: ours when private; else by name (shared with others)."""
        if self.server is not None:
            return self.server.pids()
        return named_pids(STORE_PROCESSES.get(self.store, ()))

    def _cancel_all(self, base_id: int, cluster: Cluster) -> None:
        """Cancel every apply of this N and wait until none is unfinished."""
        for apply_id in self.sampler.apply_ids(base_id):
            self.app.send_task(
                "leasehold.control_apply",
                kwargs={"apply_id": apply_id, "action": "cancel", "requested_by": "bench/scale"},
            )

        def settled() -> bool | None:
            return self.sampler.count(UNFINISHED, base_id) == 0 or None

        wait_for("every apply to be cancelled", settled, timeout=240, interval=0.25)

    def _read_logs(self, cluster: Cluster, result: Result) -> None:
        """Count the Traceback / ERROR / WARNING lines; the most frequent distinct messages (numbers
        and hex ids blurred), each with a count and a first example. ``--logs``: keep the logs."""
        kinds: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for name, proc in cluster.procs.items():
            for line in proc.log().splitlines():
                mark = LOG_MARKS.search(line)
                if mark is None:
                    continue
                kinds[f"{name}:{mark.group(0)}"] += 1
                result.presumed_lost += "lease presumed lost" in line
                key = re.sub(r"[0-9a-f]{6,}…?|\d+(\.\d+)?", "#", line.split("] ", 1)[-1])[:120]
                messages[key] += 1
                examples.setdefault(key, f"{name}: {line.strip()[:220]}")
            if self.args.logs is not None and proc.logfile is not None:
                target = self.args.logs / f"{self.store}-n{result.n}"
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(proc.logfile, target / proc.logfile.name)
        result.log_findings = dict(kinds)
        result.log_examples = [f"{n} x {examples[key]}" for key, n in messages.most_common(8)]
