"""How leasehold's cost grows with the number of concurrent applies: N applies running at once on
real ``celery worker`` and ``celery beat`` processes, for N in ``--applies`` (default 50, 200, 500
and 1,000), on Redis + MariaDB and on Redis + PostgreSQL (``--store mariadb|postgres|both``).

The stack (``tasks.testing.processes``, as ``bench/failover.py`` runs it): a private
``redis-server`` this bench starts on ``--redis-port`` (default 6391, no persistence; stopped by its
pid at the end) as broker and result backend, and per store a scratch database
(``leasehold_bench_<hex>``, migrated, dropped at the end) on a store server of the bench's own
(``--servers private``, the default: a ``mariadbd`` and a PostgreSQL cluster with the shared
servers' InnoDB / ``shared_buffers`` and durability settings but ``--max-connections`` 2500, started
and stopped by pid), or on the shared ones (``--servers shared``: ``--mysql-url``,
``--postgres-url``). Private, because the workers open more sessions than the shared servers'
``max_connections`` (151 and 100) from N=200 on, and because MariaDB's counters are server-wide:
other clients of a shared server would be counted too. Settings as in production but short,
through the same ``LEASEHOLD_*`` variables (printed at the start): heartbeat every 1 s,
``stale_after`` 5 s, a reclaim pass every 1 s. Per N a fresh cluster: one beat and ``--workers``
(default 2) worker processes with ``ceil(N / workers) + 4`` apply slots each, so that every apply
has a slot at once and the processes' threads and memory are those of N, not of a larger N before.
A worker's store connections are what leasehold gives it: its apply slots share
``LEASEHOLD_DATABASE_CONNECTIONS`` (default one per slot, at most 32; ``--database-connections``
sets it), its heartbeat has one of its own and its control plane a pool of its own. Pooled
connections open only when used at once, so the peak number of store sessions is measured and
printed, not set.

One run of N:

1. submit N ``sleep``-engine applies (``send_task("leasehold.submit_apply")``, as another app
   would), one task of ``--seconds`` (default 90) each, every one on a line of its own (a distinct
   ``database``: applies of one ``(database, environment)`` run one after another);
2. ramp-up: the seconds from the first submit (the database's clock read just before it) until
   the last of the N ``redeemed`` log rows (the database's clock too), once all N are ``running``;
3. the steady state, from ``2 x heartbeat`` after all run, for ``--window`` seconds (default 40;
   shorter if the applies would end sooner): every ``--sample-every`` seconds (0.5) the heartbeat
   age of every running apply, computed by the database (``storage.clock.age_of(heartbeat_at)``,
   the expression ``applies.get`` uses), pooled into p50 / p99 / max; the peak number of store
   sessions of the scratch database; the worker processes' RSS (``VmRSS``) and threads
   (``Threads``) from ``/proc``, summed over every process in the workers' process groups;
4. over the window: the workers' CPU (``utime + stime`` deltas from ``/proc/PID/stat``, as % of one
   core and of all cores), and the store's statements: on MariaDB the ``Questions`` delta of
   ``SHOW GLOBAL STATUS`` minus this bench's own sampling session's (its ``SHOW SESSION STATUS``),
   plus transactions as ``Com_commit + Com_rollback``; on PostgreSQL ``xact_commit +
   xact_rollback`` of the scratch database in ``pg_stat_database`` (read from the maintenance
   database) minus the sampler's own transactions. PostgreSQL counts no statements without
   ``pg_stat_statements``, so its figure is transactions, not statements. MariaDB's counters are
   server-wide: sessions of other databases at the window's end are counted and flagged, since
   other clients of the same server inflate the figure. Both per running apply per second;
5. false reclaims: ``reclaimed`` log rows written during the run (from the first submit to the end
   of the window); each is false here, since no worker is ever stopped. Must be 0, and so must the
   workers' ``lease presumed lost`` log lines (a worker that renewed no heartbeat of a lease for
   ``stale_after`` stops its run: a reclaim follows, maybe after the window), counted over the
   whole run including the cancels;
6. every apply is cancelled (``leasehold.control_apply``, action ``cancel``), the bench waits until
   none is queued, dispatched or running, and stops the cluster; each process's log is searched
   for ``Traceback``, ``ERROR`` and ``WARNING`` lines (counted, the first distinct ones shown).

Before an N of 500 or more the bench waits (up to ``--load-wait``, 20 minutes, polling every 30 s)
until the 1-minute load average is at most ``--max-load`` (1.5), and prints the load it started
at. (Linux counts runnable threads: a run of hundreds of applies raises it for minutes after.)

A PNG (``--plot``, default ``docs/img/scale.png``; matplotlib, Agg backend; skipped with a line
saying so when matplotlib is missing): heartbeat-age p99 against N, and store statements (MariaDB)
or transactions (both) per second per running apply against N, one line per store, with a dashed
line at twice the heartbeat interval.

A store's scale is the largest N with 0 false reclaims, no lease presumed lost, and a
heartbeat-age p99 under twice the heartbeat interval (with all N running through the window).
With both stores, a line ``scale_applies_mariadb=<N> scale_statements_per_apply_s_mariadb=<x>
scale_transactions_per_apply_s_mariadb=<x> scale_applies_postgres=<N>
scale_transactions_per_apply_s_postgres=<x>`` comes first. The last line is ``scale_applies=<N>
scale_statements_per_apply_s=<x>``: MariaDB's (PostgreSQL's, in transactions, when MariaDB is not
measured); ``unavailable`` when no store answers, 0 when no N qualifies. Figures, not assertions.

Run: ``.venv/bin/python bench/scale.py [--applies 50,200,500,1000] [--seconds 90]
[--store both] [--plot docs/img/scale.png]``; a quick run: ``--applies 20 --seconds 30``.
``tests/e2e/test_scale_smoke.py`` runs one small N of it on the suite's shared servers.

The parts: the servers and a store's stack (``bench/_scale_servers.py``), ``/proc`` and the load
(``bench/_scale_proc.py``), the store's clock and counters (``bench/_scale_sampler.py``), one N
(``bench/_scale_run.py``), the lines, table, plot and headline (``bench/_scale_report.py``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _common, _stores
from bench._scale_proc import LOAD_WAIT, load1, wait_for_quiet
from bench._scale_report import headline, plot, print_result, print_table
from bench._scale_run import SPARE_SLOTS, Result, ScaleRun
from bench._scale_sampler import Sampler
from bench._scale_servers import private_redis, store_stack
from bench.failover import add_interval_arguments, intervals_of

ROOT = Path(__file__).resolve().parent.parent
INTERVALS = {
    "LEASEHOLD_HEARTBEAT_INTERVAL": "1",
    "LEASEHOLD_STALE_AFTER": "5",
    "LEASEHOLD_RECLAIM_INTERVAL": "1",
}
DEFAULT_APPLIES = "50,200,500,1000"
BIG_N = 500  # from here on, wait for a quiet machine first


# --- the runs -----------------------------------------------------------------------------------


def run_store(
    store: str, args: argparse.Namespace, redis_url: str, intervals: Mapping[str, str]
) -> list[Result]:
    results: list[Result] = []
    with store_stack(store, args, redis_url, intervals) as (stack, server):
        stack.activate()
        print(f"== {store}: {stack.describe()}", flush=True)
        admin_url = server.url if server is not None else args.postgres_url
        sampler = Sampler(store, stack.database_url, admin_url)
        try:
            bench = ScaleRun(store, stack, sampler, args, server)
            for n in args.applies_list:
                load = wait_for_quiet(args.max_load, args.load_wait) if n >= BIG_N else load1()
                workers = max(1, min(args.workers, n))
                print(
                    f"-- {store} N={n}: {workers} workers x "
                    f"{math.ceil(n / workers) + SPARE_SLOTS} apply slots; load {load:.2f}",
                    flush=True,
                )
                result = bench.run(n)
                result.load_before = load
                results.append(result)
                print_result(result, float(intervals["LEASEHOLD_HEARTBEAT_INTERVAL"]))
        finally:
            sampler.close()
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--applies", default=DEFAULT_APPLIES, help="comma-separated values of N")
    parser.add_argument("--seconds", type=float, default=90.0, help="each apply's one task")
    parser.add_argument("--window", type=float, default=40.0, help="steady-state seconds")
    parser.add_argument("--sample-every", type=float, default=0.5)
    parser.add_argument("--store", choices=["mariadb", "postgres", "both"], default="both")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--redis-port", type=int, default=6391, help="the private redis-server")
    parser.add_argument("--max-load", type=float, default=1.5, help="before N >= 500")
    parser.add_argument(
        "--load-wait", type=float, default=LOAD_WAIT, help="seconds to wait for --max-load"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "scale.png")
    parser.add_argument("--no-plot", action="store_true")
    add_interval_arguments(parser, INTERVALS)
    parser.add_argument("--mysql-url", default=_common.mysql_server_url(), help="server URL")
    parser.add_argument(
        "--servers",
        choices=["private", "shared"],
        default="private",
        help="private (default): a mariadbd and a PostgreSQL cluster of this bench's own, with "
        "room for the sessions the workers open and counters that count them alone; shared: "
        "--mysql-url and --postgres-url (their max_connections, 151 and 100 by default, are "
        "exhausted from N=200 on)",
    )
    parser.add_argument("--max-connections", type=int, default=2500, help="private servers")
    parser.add_argument(
        "--database-connections",
        type=int,
        help="LEASEHOLD_DATABASE_CONNECTIONS of every worker (default: leasehold's)",
    )
    parser.add_argument("--logs", type=Path, help="a folder to keep the celery processes' logs in")
    parser.add_argument(
        "--postgres-url", default=_stores.postgres_server_url(), help="server URL (maintenance db)"
    )
    args = parser.parse_args(argv)
    try:
        args.applies_list = sorted({int(v) for v in args.applies.split(",") if v.strip()})
    except ValueError:
        parser.error(f"--applies: not a comma-separated list of numbers: {args.applies!r}")
    if not args.applies_list or min(args.applies_list) < 1:
        parser.error("--applies: every N must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    args.stores = [_stores.MARIADB, _stores.POSTGRES] if args.store == "both" else [args.store]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    intervals = intervals_of(args, INTERVALS)
    if args.database_connections is not None:
        intervals["LEASEHOLD_DATABASE_CONNECTIONS"] = str(args.database_connections)
    interval = float(intervals["LEASEHOLD_HEARTBEAT_INTERVAL"])
    print(
        "intervals (environment of every process): "
        + ", ".join(f"{k}={v}" for k, v in intervals.items())
    )
    print(
        f"N = {', '.join(map(str, args.applies_list))}; applies of one {args.seconds:g} s task; "
        f"steady window up to {args.window:g} s, sampled every {args.sample_every:g} s; stores "
        f"{', '.join(args.stores)}; load {load1():.2f}",
        flush=True,
    )
    started = time.monotonic()
    results: list[Result] = []
    try:
        with private_redis(args.redis_port) as redis_url:
            for store in args.stores:
                try:
                    results += run_store(store, args, redis_url, intervals)
                except _common.BackendUnavailable as exc:
                    print(f"== {store}: SKIPPED, NOT MEASURED: {exc}", flush=True)
    except _common.BackendUnavailable as exc:
        print(f"== SKIPPED, NOT MEASURED: {exc}")
    print(f"== {len(results)} runs, {time.monotonic() - started:.0f} s in all")
    if results:
        print_table(results, interval)
        if not args.no_plot:
            plot(results, args.plot, interval)
    figures = {store: headline(results, store, interval) for store in args.stores}
    if len(args.stores) > 1:
        keys: list[tuple[str, str]] = []
        for store in args.stores:
            n, statements, transactions = figures[store]
            keys.append((f"scale_applies_{store}", n))
            if store == _stores.MARIADB:
                keys.append((f"scale_statements_per_apply_s_{store}", statements))
            keys.append((f"scale_transactions_per_apply_s_{store}", transactions))
        print(_stores.key_line(keys))
    measured = [s for s in args.stores if figures[s][0] != "unavailable"]
    main_store = measured[0] if measured else args.stores[0]
    n, statements, transactions = figures[main_store]
    per_apply = statements if main_store == _stores.MARIADB else transactions
    print(f"scale_applies={n} scale_statements_per_apply_s={per_apply}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
