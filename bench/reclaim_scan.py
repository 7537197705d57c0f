"""What a reclaim pass costs as the applies table grows: one pass of ``leases.reclaim`` over 10k and
over 1M applies rows, nearly all finished, with 1k stale ``running`` applies to reclaim (plus
fresh ``running`` and ``dispatched`` ones that must be left alone).

Each size gets its own scratch database, loaded the same way: one multi-row INSERT for a seed of
finished applies, the live ones, then ``INSERT ... SELECT`` doubling of the finished ones. A pass
rotates the stale applies (to ``dispatched``), so before every timed pass the same rows are made
stale again (untimed). Passes on the two sizes are interleaved, so that noise (other clients of
the server, InnoDB's background flush and purge after the load) hits both alike; the figure per
size is the median. The candidate SELECT is also timed alone, an empty pass (nothing stale) is
timed, and the plan is printed (EXPLAIN, and ANALYZE with the rows really read: MariaDB's
``ANALYZE``, PostgreSQL's ``EXPLAIN (ANALYZE, BUFFERS)``), to show an index range on
(state, heartbeat_at).

The stores (MariaDB and PostgreSQL by default; SQLite on request) are measured one after the
other in the same run, with the same workload; every ratio is within one store. A store that does
not answer gets a ``SKIPPED, NOT MEASURED`` line and ``unavailable`` figures; the others are
still measured.

The last line is ``reclaim_scan_ratio_1m_vs_10k_<store>=<x>`` for each store asked for: median
pass time at the large size over the median at the small size (goal <= 1.5), or ``unavailable``
when the store does not answer. It starts with the unsuffixed ``reclaim_scan_ratio_1m_vs_10k``,
the key scripts know: MariaDB's figure (the first store's when MariaDB is not asked for).

Run: ``.venv/bin/python bench/reclaim_scan.py [--rows-large N] [--backends mariadb,postgres]``.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, insert, select, text
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.dialects.postgresql import psycopg

from leases import ReclaimPolicy, reclaim
from storage import _statements as statements
from storage import clock
from storage.database import Database
from storage.errors import StorageUnavailable
from storage.states import ApplyState
from storage.tables import applies

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _common, _stores

INDEX = "ix_applies_state_heartbeat_at"
FINISHED = (ApplyState.COMPLETED, ApplyState.FAILED, ApplyState.CANCELLED)
SEED_ROWS = 10_000  # finished applies written by one multi-row INSERT; the rest is doubling
COPIED = [c for c in applies.c if c.name not in ("id", "request_id")]


@dataclass
class Staged:
    """The non-finished applies: the same rows at every size."""

    stale: list[int]
    fresh_running: list[int]
    fresh_dispatched: list[int]

    @property
    def count(self) -> int:
        return len(self.stale) + len(self.fresh_running) + len(self.fresh_dispatched)


@dataclass
class SizeResult:
    rows: int
    load_s: float
    passes_ns: list[int] = field(default_factory=list)
    select_ns: list[int] = field(default_factory=list)
    empty_ns: list[int] = field(default_factory=list)
    unindexed_ns: list[int] = field(default_factory=list)
    reclaimed: list[int] = field(default_factory=list)
    untouched_ok: bool = True

    @property
    def pass_ms(self) -> float:
        return statistics.median(self.passes_ns) / 1e6

    @property
    def select_us(self) -> float:
        return _common.median_us(self.select_ns)

    @property
    def empty_us(self) -> float:
        return _common.median_us(self.empty_ns)


# --- loading -------------------------------------------------------------------------------------


def db_now(conn: Connection) -> datetime:
    now = conn.execute(statements.db_time()).scalar_one()
    if isinstance(now, str):  # SQLite hands back the text it computed
        now = datetime.fromisoformat(now)
    if not isinstance(now, datetime):
        raise TypeError(f"the database clock returned {now!r}")
    return now


def finished_rows(count: int, now: datetime) -> list[dict[str, Any]]:
    """Finished applies with heartbeats spread over the last 180 days (by the DB clock)."""
    rows: list[dict[str, Any]] = []
    for i in range(count):
        state = FINISHED[0] if i % 100 < 95 else FINISHED[1] if i % 100 < 99 else FINISHED[2]
        last_beat = now - timedelta(seconds=3600 + (i * 7919) % (180 * 86400))
        rows.append(
            {
                "state": state,
                "database_name": f"db{i % 50}",
                "environment": ("staging", "production")[i % 2],
                "engine": "gh-ost",
                "repository": "acme/shop",
                "pull_request": i + 1,
                "head_sha": None,
                "lease_owner": None,
                "lease_token": secrets.token_hex(16),
                "lease_epoch": 2 + i % 3,
                "lease_acquired_at": last_beat - timedelta(minutes=10),
                "heartbeat_at": last_beat,
                "reclaim_count": 0,
                "error": None if state == ApplyState.COMPLETED else "bench",
                "created_at": last_beat - timedelta(minutes=11),
                "updated_at": last_beat,
                "finished_at": last_beat,
            }
        )
    return rows


def live_rows(state: ApplyState, count: int, now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "state": state,
            "database_name": "live",
            "environment": "production",
            "engine": "gh-ost",
            "lease_owner": "bench-worker" if state == ApplyState.RUNNING else None,
            "lease_token": secrets.token_hex(16),
            "lease_epoch": 1,
            "heartbeat_at": now,
            "reclaim_count": 0,
            "created_at": now,
            "updated_at": now,
        }
        for _ in range(count)
    ]


def count_finished(conn: Connection) -> int:
    return int(
        conn.execute(
            select(func.count()).select_from(applies).where(applies.c.state.in_(FINISHED))
        ).scalar_one()
    )


def stage(db: Database, *, seed: int, stale: int, fresh: int) -> Staged:
    """The seed of finished applies (one multi-row INSERT), then the live ones, whose ids are
    kept. The future stale set starts ``dispatched`` with a fresh heartbeat (as a pass leaves it),
    so nothing is stale until :func:`restale` says so."""
    with db.transaction() as conn:
        now = db_now(conn)
        conn.execute(insert(applies), finished_rows(seed, now))
    groups: list[list[int]] = []
    for state, count in (
        (ApplyState.DISPATCHED, stale),
        (ApplyState.RUNNING, fresh),
        (ApplyState.DISPATCHED, fresh),
    ):
        with db.transaction() as conn:
            before = conn.execute(select(func.coalesce(func.max(applies.c.id), 0))).scalar_one()
            if count:
                conn.execute(insert(applies), live_rows(state, count, now))
            groups.append(
                [
                    int(i)
                    for i in conn.execute(
                        select(applies.c.id).where(applies.c.id > before).order_by(applies.c.id)
                    ).scalars()
                ]
            )
    return Staged(*groups)


def grow(db: Database, finished_target: int) -> None:
    """Double the finished applies with INSERT ... SELECT until there are ``finished_target``."""
    with db.transaction() as conn:
        have = count_finished(conn)
    while have < finished_target:
        take = min(have, finished_target - have)
        source = (
            select(*COPIED).where(applies.c.state.in_(FINISHED)).order_by(applies.c.id).limit(take)
        )
        with db.transaction() as conn:
            conn.execute(insert(applies).from_select([c.name for c in COPIED], source))
        have += take


def restale(db: Database, staged: Staged, stale_after: float) -> None:
    """Put the reclaimed applies back: running, heartbeat 1.5 min to 1 h past ``stale_after``
    by the DB clock (distinct ages, so the ORDER BY matters); and keep the fresh ones fresh."""
    age = stale_after + 90 + applies.c.id % 3600
    with db.transaction() as conn:
        for start in range(0, len(staged.stale), 1000):
            chunk = staged.stale[start : start + 1000]
            conn.execute(
                applies.update()
                .where(applies.c.id.in_(chunk))
                .values(
                    state=ApplyState.RUNNING,
                    lease_owner="bench-worker",
                    heartbeat_at=clock.now_minus(age),
                    reclaim_count=0,
                )
            )
        keep_fresh(conn, staged)


def keep_fresh(conn: Connection, staged: Staged) -> None:
    """The fresh applies' heartbeats to now by the DB clock: they were written before the load,
    which can take longer than ``stale_after`` on a busy machine (a pass would reclaim them)."""
    fresh = staged.fresh_running + staged.fresh_dispatched
    if fresh:
        conn.execute(
            applies.update().where(applies.c.id.in_(fresh)).values(heartbeat_at=clock.now())
        )


def analyze(db: Database) -> None:
    """Fresh optimizer statistics, as a long-lived production table has. PostgreSQL: ``VACUUM
    (ANALYZE)``, which also sets the hint bits and visibility map that a bulk load leaves unset
    (the first readers would otherwise pay for them), as autovacuum does to a settled table."""
    if _stores.is_postgres(db):
        with db.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                "VACUUM (ANALYZE) applies"
            )
        return
    with db.transaction() as conn:
        if db.is_sqlite:
            conn.execute(text("ANALYZE"))
        else:
            conn.execute(text("ANALYZE TABLE applies")).all()


# --- the candidate query -------------------------------------------------------------------------


def candidate_sql(db: Database, state: ApplyState, older_than: float, limit: int) -> str:
    stmt = statements.stale_candidates(state, older_than=older_than, limit=limit)
    return str(stmt.compile(dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}))


def explain(db: Database, sql: str) -> tuple[list[str], bool]:
    """Plan lines for ``sql`` and whether it is a range read of the (state, heartbeat_at) index
    without a sort."""
    with db.transaction() as conn:
        if db.is_sqlite:
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}").all()
            lines = [str(r[-1]) for r in plan]
            ok = any(f"USING INDEX {INDEX}" in line for line in lines) and not any(
                "TEMP B-TREE" in line or line.startswith("SCAN applies") for line in lines
            )
            return lines, ok
        if _stores.is_postgres(db):
            lines = [str(r[0]) for r in conn.exec_driver_sql(f"EXPLAIN {sql}")]
            ok = any(f"Index Scan using {INDEX}" in line for line in lines) and not any(
                "Seq Scan" in line or "Sort" in line or "Bitmap" in line for line in lines
            )
            return lines, ok
        result = conn.exec_driver_sql(f"EXPLAIN {sql}")
        keys = list(result.keys())
        rows: list[dict[str, Any]] = [dict(zip(keys, r, strict=True)) for r in result]
    lines = [
        " ".join(f"{k}={row[k]}" for k in ("table", "type", "key", "key_len", "rows", "Extra"))
        for row in rows
    ]
    ok = all(
        r["key"] == INDEX and r["type"] == "range" and "filesort" not in str(r["Extra"] or "")
        for r in rows
    )
    return lines, ok


def analyze_rows(db: Database, sql: str) -> str | None:
    """MariaDB's ANALYZE runs the query and reports the rows it really read (r_rows);
    PostgreSQL's EXPLAIN (ANALYZE, BUFFERS) the rows of each node and the pages it touched."""
    if db.is_sqlite:
        return None
    if _stores.is_postgres(db):
        with db.transaction() as conn:
            plan = [str(r[0]) for r in conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")]
        return "\n       ".join(["", *plan])
    try:
        with db.transaction() as conn:
            result = conn.exec_driver_sql(f"ANALYZE {sql}")
            keys = list(result.keys())
            rows = [dict(zip(keys, r, strict=True)) for r in result]
    except Exception as exc:  # MySQL has no ANALYZE <select>; the figure is optional
        return f"(ANALYZE unavailable: {type(exc).__name__})"
    return "; ".join(
        f"rows estimated={r.get('rows')} read(r_rows)={r.get('r_rows')} "
        f"filtered(r_filtered)={r.get('r_filtered')}"
        for r in rows
    )


def time_select(db: Database, policy: ReclaimPolicy, runs: int) -> list[int]:
    """The candidate SELECT ... FOR UPDATE SKIP LOCKED alone: its execution and fetch, timed
    inside an open transaction (the commit that releases the locks is not timed)."""
    samples: list[int] = []
    stmt = statements.stale_candidates(
        ApplyState.RUNNING, older_than=policy.stale_after, limit=policy.batch_size
    )
    for _ in range(runs):
        with db.transaction() as conn:
            start = time.perf_counter_ns()
            found = conn.execute(stmt).all()
            samples.append(time.perf_counter_ns() - start)
        if len(found) != policy.batch_size:
            print(f"   note: candidate SELECT found {len(found)} rows, not {policy.batch_size}")
    return samples


def time_unindexed(db: Database, sql: str, runs: int) -> list[int]:
    """For contrast only: the same candidate SELECT told to ignore the index (MariaDB: ``IGNORE
    INDEX``; PostgreSQL: index and bitmap scans disabled for the transaction), i.e. what the pass
    would cost if it were a scan of the table."""
    postgres = _stores.is_postgres(db)
    hinted = (
        sql if postgres else sql.replace("FROM applies", f"FROM applies IGNORE INDEX ({INDEX})", 1)
    )
    samples: list[int] = []
    for _ in range(runs):
        with db.transaction() as conn:
            if postgres:
                for setting in ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan"):
                    conn.exec_driver_sql(f"SET LOCAL {setting} = off")
            start = time.perf_counter_ns()
            conn.exec_driver_sql(hinted).all()
            samples.append(time.perf_counter_ns() - start)
    return samples


# --- the measurement -----------------------------------------------------------------------------


@dataclass
class Subject:
    """One size: its own scratch database, loaded, and what was measured on it."""

    label: str
    db: Database
    staged: Staged
    result: SizeResult


def load(label: str, db: Database, rows: int, args: argparse.Namespace) -> Subject:
    start = time.perf_counter_ns()
    live = args.stale + 2 * args.fresh
    staged = stage(db, seed=min(SEED_ROWS, rows - live), stale=args.stale, fresh=args.fresh)
    grow(db, rows - staged.count)
    load_s = (time.perf_counter_ns() - start) / 1e9
    return Subject(label, db, staged, SizeResult(rows=rows, load_s=load_s))


def census(subject: Subject) -> None:
    """Fresh statistics, and the rows by state, before anything is timed."""
    analyze(subject.db)
    with subject.db.transaction() as conn:
        by_state: dict[str, int] = {
            str(state): int(n)
            for state, n in conn.execute(
                select(applies.c.state, func.count()).group_by(applies.c.state)
            )
        }
    subject.result.rows = sum(by_state.values())
    print(
        f"== {subject.label}: {subject.result.rows:,} applies rows, loaded in "
        f"{subject.result.load_s:.1f} s: {dict(sorted(by_state.items()))}"
    )


def describe(subject: Subject, policy: ReclaimPolicy) -> None:
    """The plans of both candidate queries, with the stale set stale."""
    db = subject.db
    print(f"== {subject.label}: {subject.result.rows:,} rows, {len(subject.staged.stale)} stale")
    for state, older_than in (
        (ApplyState.RUNNING, policy.stale_after),
        (ApplyState.DISPATCHED, policy.dispatch_timeout),
    ):
        sql = candidate_sql(db, state, older_than, policy.batch_size)
        lines, ok = explain(db, sql)
        print(f"   EXPLAIN candidates state={state}:")
        for line in lines:
            print(f"     {line}")
        print(f"     index range on ({INDEX}), no sort: {'yes' if ok else 'NO'}")
        if state == ApplyState.RUNNING:
            real = analyze_rows(db, sql)
            if real is not None:
                print(f"     ANALYZE: {real}")


def in_turn(subjects: Sequence[Subject], iteration: int) -> Sequence[Subject]:
    """Alternate which size goes first, so that noise (other clients of the server, InnoDB's
    background flushing and purge) hits both sizes alike."""
    return subjects if iteration % 2 == 0 else subjects[::-1]


def one_pass(subject: Subject, policy: ReclaimPolicy) -> int:
    restale(subject.db, subject.staged, policy.stale_after)  # untimed
    start = time.perf_counter_ns()
    done = reclaim(subject.db, policy)
    elapsed = time.perf_counter_ns() - start
    subject.result.reclaimed.append(len(done))
    if {r.apply_id for r in done} != set(subject.staged.stale):
        subject.result.untouched_ok = False
    return elapsed


def measure(subjects: Sequence[Subject], policy: ReclaimPolicy, args: argparse.Namespace) -> None:
    """Every phase interleaves the sizes. The order of phases keeps each one free of the
    delete-marked index entries that the previous phase's updates leave until InnoDB purges
    them (they would tax whichever size happened to be updated last)."""
    # 1. The common case: a beat finds nothing stale. Then a pass is nothing but its two
    # candidate SELECTs (running, dispatched) and two commits: the scan cost itself. Measured
    # first, on the freshly loaded tables (the fresh applies made fresh again, untimed).
    for subject in subjects:
        with subject.db.transaction() as conn:
            keep_fresh(conn, subject.staged)
    for i in range(args.select_runs):
        for subject in in_turn(subjects, i):
            start = time.perf_counter_ns()
            nothing = reclaim(subject.db, policy)
            subject.result.empty_ns.append(time.perf_counter_ns() - start)
            if nothing:
                subject.result.untouched_ok = False
    # 2. The stale set becomes stale; the plans; the candidate SELECT alone (it changes nothing).
    for subject in subjects:
        restale(subject.db, subject.staged, policy.stale_after)
    for subject in subjects:
        describe(subject, policy)
    for i in range(args.select_runs):
        for subject in in_turn(subjects, i):
            subject.result.select_ns.extend(time_select(subject.db, policy, 1))
    # 3. Whole passes, each over a freshly re-staled set; one untimed warm-up pass each.
    for subject in subjects:
        one_pass(subject, policy)
    for i in range(args.passes):
        for subject in in_turn(subjects, i):
            subject.result.passes_ns.append(one_pass(subject, policy))
    # 4. For contrast: the candidate SELECT as a table scan.
    for subject in subjects:
        if subject.db.is_sqlite or not args.unindexed_runs:
            continue
        restale(subject.db, subject.staged, policy.stale_after)
        sql = candidate_sql(subject.db, ApplyState.RUNNING, policy.stale_after, policy.batch_size)
        subject.result.unindexed_ns = time_unindexed(subject.db, sql, args.unindexed_runs)


def report(subject: Subject, policy: ReclaimPolicy, args: argparse.Namespace) -> None:
    result = subject.result
    passes_ms = ", ".join(f"{ns / 1e6:.0f}" for ns in result.passes_ns)
    print(f"== {subject.label}: {result.rows:,} rows")
    print(
        f"   reclaim pass median {result.pass_ms:.0f} ms (passes: {passes_ms} ms); "
        f"reclaimed per pass {sorted(set(result.reclaimed))}; exactly the stale set and "
        f"nothing else: {'yes' if result.untouched_ok else 'NO'}"
    )
    print(
        f"   candidate SELECT (limit {policy.batch_size}) median {result.select_us:.0f} us "
        f"over {args.select_runs} runs"
    )
    print(
        f"   empty reclaim pass (nothing stale: two candidate SELECTs, two commits) median "
        f"{result.empty_us:.0f} us over {args.select_runs} runs"
    )
    if result.unindexed_ns:
        unindexed_ms = _common.median_us(result.unindexed_ns) / 1000
        print(
            f"   for contrast, the candidate SELECT without the index ({INDEX}): median "
            f"{unindexed_ms:.1f} ms over {args.unindexed_runs} runs"
        )


def run(
    backend: str, args: argparse.Namespace, policy: ReclaimPolicy
) -> tuple[SizeResult, SizeResult]:
    """Two scratch databases on ``backend``, one per size, so that the passes can be
    interleaved."""

    def scratch() -> AbstractContextManager[str]:
        return _stores.scratch(backend, args)

    with scratch() as small_url, scratch() as large_url:
        small_db = _stores.open_store(backend, small_url, args)
        large_db = _stores.open_store(backend, large_url, args)
        try:
            subjects = [
                load("small", small_db, args.rows_small, args),
                load("large", large_db, args.rows_large, args),
            ]
            for subject in subjects:
                census(subject)
            measure(subjects, policy, args)
            for subject in subjects:
                report(subject, policy, args)
        finally:
            small_db.dispose()
            large_db.dispose()
    return subjects[0].result, subjects[1].result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows-small", type=int, default=10_000, help="default 10000")
    parser.add_argument("--rows-large", type=int, default=1_000_000, help="default 1000000")
    parser.add_argument("--stale", type=int, default=1000, help="stale running applies (1000)")
    parser.add_argument(
        "--fresh", type=int, default=100, help="fresh running and fresh dispatched applies, each"
    )
    parser.add_argument("--passes", type=int, default=7, help="timed passes per size (7)")
    parser.add_argument(
        "--select-runs",
        type=int,
        default=200,
        help="timed candidate SELECTs and empty passes per size (200)",
    )
    parser.add_argument(
        "--unindexed-runs",
        type=int,
        default=3,
        help="MariaDB and PostgreSQL: timed runs of the candidate SELECT without the index, "
        "for contrast (3; 0 skips)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="ReclaimPolicy.batch_size: applies rotated per transaction (100)",
    )
    parser.add_argument(
        "--backends",
        default=f"{_stores.MARIADB},{_stores.POSTGRES}",
        help=f"comma-separated subset of {','.join(_stores.STORES)}, measured in that order "
        "(default mariadb,postgres)",
    )
    parser.add_argument(
        "--backend",
        choices=list(_stores.STORES),
        default=None,
        help="one store only (the same as --backends <store>)",
    )
    _stores.add_server_arguments(parser)
    args = parser.parse_args(argv)
    args.backend_list = _stores.parse_stores(
        parser, "--backends", args.backend if args.backend else args.backends
    )
    live = args.stale + 2 * args.fresh
    if args.stale < 1 or args.passes < 1 or args.select_runs < 1 or args.batch_size < 1:
        parser.error("--stale, --passes, --select-runs and --batch-size must be >= 1")
    if args.fresh < 0 or args.unindexed_runs < 0:
        parser.error("--fresh and --unindexed-runs must be >= 0")
    if not live < args.rows_small < args.rows_large:
        parser.error(f"need {live} (stale + 2 * fresh) < --rows-small < --rows-large")
    return args


DIALECTS = {
    _stores.MARIADB: mysql.dialect(),
    _stores.POSTGRES: psycopg.dialect(),  # type: ignore[no-untyped-call]
    _stores.SQLITE: sqlite.dialect(),
}


@dataclass
class StoreResult:
    small: SizeResult
    large: SizeResult
    elapsed_s: float

    @property
    def pass_ratio(self) -> float:
        return _common.ratio(self.large.pass_ms, self.small.pass_ms)

    @property
    def select_ratio(self) -> float:
        return _common.ratio(self.large.select_us, self.small.select_us)

    @property
    def empty_ratio(self) -> float:
        return _common.ratio(self.large.empty_us, self.small.empty_us)

    @property
    def scan_ratio(self) -> float | None:
        if not (self.large.unindexed_ns and self.small.unindexed_ns):
            return None
        return _common.ratio(
            _common.median_us(self.large.unindexed_ns), _common.median_us(self.small.unindexed_ns)
        )


def measure_store(backend: str, args: argparse.Namespace, policy: ReclaimPolicy) -> StoreResult:
    stmt = statements.stale_candidates(
        ApplyState.RUNNING, older_than=policy.stale_after, limit=policy.batch_size
    )
    rendered = stmt.compile(dialect=DIALECTS[backend], compile_kwargs={"literal_binds": True})
    print(f"==== {backend}")
    print(f"candidate query ({backend}): {' '.join(str(rendered).split())}")
    started = time.perf_counter_ns()
    small, large = run(backend, args, policy)
    store = StoreResult(small, large, (time.perf_counter_ns() - started) / 1e9)
    sizes = f"{large.rows:,} vs {small.rows:,} rows"
    print(
        f"candidate SELECT {sizes}: {large.select_us:.0f} / {small.select_us:.0f} us "
        f"= {store.select_ratio:.2f}"
    )
    print(
        f"empty reclaim pass {sizes}: {large.empty_us:.0f} / {small.empty_us:.0f} us "
        f"= {store.empty_ratio:.2f}"
    )
    if store.scan_ratio is not None:
        print(f"for contrast, the unindexed candidate SELECT {sizes}: {store.scan_ratio:.0f}x")
    print(
        f"reclaim pass of {small.reclaimed[-1]} stale applies, {sizes} ({backend}): "
        f"{large.pass_ms:.0f} / {small.pass_ms:.0f} ms = {store.pass_ratio:.2f} (goal <= 1.5)"
    )
    print(f"{backend}: {store.elapsed_s:.1f} s")
    return store


def side_by_side(results: dict[str, StoreResult]) -> None:
    """The stores measured, one column each (small / large, and large over small)."""
    if not results:
        return
    names = list(results)
    print("== side by side (ratios are large / small within each store)")
    print("   " + f"{'':<30}" + "".join(f"{name:>22}" for name in names))

    def row(label: str, cell: Callable[[StoreResult], str]) -> None:
        print(f"   {label:<30}" + "".join(f"{cell(results[n]):>22}" for n in names))

    row(
        "reclaim pass ms (small / large)",
        lambda r: f"{r.small.pass_ms:.0f} / {r.large.pass_ms:.0f}",
    )
    row("  ratio", lambda r: f"{r.pass_ratio:.2f}")
    row("candidate SELECT us", lambda r: f"{r.small.select_us:.0f} / {r.large.select_us:.0f}")
    row("  ratio", lambda r: f"{r.select_ratio:.2f}")
    row("empty pass us", lambda r: f"{r.small.empty_us:.0f} / {r.large.empty_us:.0f}")
    row("  ratio", lambda r: f"{r.empty_ratio:.2f}")

    def scan(r: StoreResult) -> str:
        if r.scan_ratio is None:
            return "-"
        small, large = (_common.median_us(x.unindexed_ns) / 1000 for x in (r.small, r.large))
        return f"{small:.1f} / {large:.0f} ms"

    row("unindexed SELECT (contrast)", scan)
    row("  ratio", lambda r: "-" if r.scan_ratio is None else f"{r.scan_ratio:.0f}x")
    row("rows (small / large)", lambda r: f"{r.small.rows:,} / {r.large.rows:,}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    policy = ReclaimPolicy(
        stale_after=30, dispatch_timeout=600, max_reclaims=5, batch_size=args.batch_size
    )
    print(f"policy: {policy}")
    started = time.perf_counter_ns()
    results: dict[str, StoreResult] = {}
    figures: dict[str, str] = {}
    for backend in args.backend_list:
        try:
            store = measure_store(backend, args, policy)
        except (_common.BackendUnavailable, StorageUnavailable) as exc:
            print(f"== {backend}: SKIPPED, NOT MEASURED: {exc}")
            figures[backend] = "unavailable"
            continue
        results[backend] = store
        figures[backend] = f"{store.pass_ratio:.2f}"
    side_by_side(results)
    elapsed = (time.perf_counter_ns() - started) / 1e9
    print(f"total time {elapsed:.1f} s")
    # The unsuffixed key scripts know: MariaDB's figure, or the only store's (--backend sqlite).
    legacy = _stores.MARIADB if _stores.MARIADB in figures else args.backend_list[0]
    keys = [("reclaim_scan_ratio_1m_vs_10k", figures[legacy])]
    keys += [(f"reclaim_scan_ratio_1m_vs_10k_{b}", figures[b]) for b in args.backend_list]
    print(_stores.key_line(keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
