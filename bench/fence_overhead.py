"""What the fence costs: median latency of a fenced single-row write against the same write
unfenced, on the same engine and pooled connection, interleaved so that noise hits both alike.

Two writes, as the worker makes them:

- progress: an apply task's progress update
  (``with leases.fence(db, lease) as fx: storage.fenced.update_task(fx, task_id, progress=p)``
  against ``storage._statements.update_task(...)`` in a plain ``db.transaction()``);
- log: a log append (``storage.fenced.append_log`` against ``statements.append_log``).

Each is also timed in the single-statement fenced shape of DESIGN.md ("The fence"): a multi-table
``UPDATE apply_tasks, applies ... WHERE applies.lease_token = ...`` (PostgreSQL: ``UPDATE
apply_tasks ... WHERE EXISTS (SELECT ... FROM applies WHERE lease_token = ... FOR SHARE)``, since
its ``UPDATE ... FROM`` does not lock the joined row) and an ``INSERT apply_logs SELECT ... FROM
applies WHERE lease_token = ... LOCK IN SHARE MODE`` (``FOR SHARE``). Those shapes are written
here, not in ``storage``: they are measured for the trade-off, not used.

The stores (MariaDB, PostgreSQL, SQLite by default) are measured one after the other in the same
run, with the same workload; every ratio is within one store. A store that does not answer gets
a ``SKIPPED, NOT MEASURED`` line and ``unavailable`` figures; the others are still measured.

The last line is ``fence_overhead_ratio_<store>=<x>`` for each store asked for (``mariadb`` first,
the key scripts know): the *worse* of the two writes' ratios (median fenced / median plain) on
that store, or ``unavailable`` when it does not answer.

Run: ``.venv/bin/python bench/fence_overhead.py [--iterations N]
[--backends mariadb,postgres,sqlite]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Insert, Update, event, insert, literal, select, text

import leases
from leases import Lease
from storage import _statements as statements
from storage import clock, fenced
from storage.database import Database
from storage.errors import LeaseLost, StorageUnavailable
from storage.states import ApplyState
from storage.tables import applies, apply_logs, apply_tasks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _common, _stores

WRITES = ("progress", "log")
SHAPES = ("plain", "fenced", "single")
SHAPE_DOC = {
    "plain": "the write alone in db.transaction() (unfenced)",
    "fenced": "leases.fence(): SELECT ... FOR UPDATE first, then the write (the API)",
    "single": "one locking statement (UPDATE ... JOIN applies / INSERT ... SELECT ... SHARE)",
}


# --- the single-statement fenced shapes (measured, not used by leasehold) ------------------------


def single_update_task(lease: Lease, task_id: int, progress: int, *, postgres: bool) -> Update:
    """``UPDATE apply_tasks, applies SET ... WHERE ... applies.lease_token = :token`` (MySQL) or
    ``UPDATE apply_tasks SET ... FROM applies WHERE ...`` (SQLite): the lease check and the write
    in one statement, which locks the apply row it reads on InnoDB.

    PostgreSQL's ``UPDATE ... FROM applies`` locks only the target row, and under READ COMMITTED
    it re-checks the joined apply row as it was, not its newest version: not a fence. There the
    shape is ``UPDATE apply_tasks ... WHERE EXISTS (SELECT 1 FROM applies WHERE ... FOR SHARE)``,
    whose locking sub-select waits for a rotation in flight and re-checks the newest row."""
    if postgres:
        guard = (
            select(literal(1))
            .select_from(applies)
            .where(
                applies.c.id == apply_tasks.c.apply_id,
                applies.c.id == lease.apply_id,
                applies.c.lease_token == lease.token,
                applies.c.lease_epoch == lease.epoch,
                applies.c.state == ApplyState.RUNNING,
            )
            .with_for_update(read=True)
        )
        return (
            apply_tasks.update()
            .where(apply_tasks.c.id == task_id, guard.exists())
            .values({apply_tasks.c.progress: progress, apply_tasks.c.lease_epoch: lease.epoch})
        )
    return (
        apply_tasks.update()
        .where(
            apply_tasks.c.id == task_id,
            apply_tasks.c.apply_id == applies.c.id,
            applies.c.id == lease.apply_id,
            applies.c.lease_token == lease.token,
            applies.c.lease_epoch == lease.epoch,
            applies.c.state == ApplyState.RUNNING,
        )
        .values({apply_tasks.c.progress: progress, apply_tasks.c.lease_epoch: lease.epoch})
    )


def single_append_log(lease: Lease, message: str) -> Insert:
    """``INSERT INTO apply_logs (...) SELECT ... FROM applies WHERE lease_token = :token
    LOCK IN SHARE MODE``: without the locking clause it is not fenced under READ COMMITTED."""
    source = (
        select(
            applies.c.id,
            literal(lease.epoch),
            literal("info"),
            literal("bench"),
            literal(message),
            clock.now(),
        )
        .where(
            applies.c.id == lease.apply_id,
            applies.c.lease_token == lease.token,
            applies.c.lease_epoch == lease.epoch,
            applies.c.state == ApplyState.RUNNING,
        )
        .with_for_update(read=True)
    )
    return insert(apply_logs).from_select(
        ["apply_id", "lease_epoch", "level", "event", "message", "created_at"], source
    )


# --- the timed operations ------------------------------------------------------------------------


@dataclass
class Workload:
    """The six operations, each one transaction on ``db``, writing a value that differs from the
    previous one (an unchanged row would let InnoDB skip the write and flatter that sample)."""

    db: Database
    lease: Lease
    task_id: int
    _counter: int = 0

    @property
    def postgres(self) -> bool:
        return _stores.is_postgres(self.db)

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def progress_plain(self) -> None:
        values = {"progress": self._next() % 101}
        with self.db.transaction() as conn:
            conn.execute(
                statements.update_task(
                    self.lease.apply_id, self.task_id, epoch=self.lease.epoch, values=values
                )
            )

    def progress_fenced(self) -> None:
        progress = self._next() % 101
        with leases.fence(self.db, self.lease) as fx:
            fenced.update_task(fx, self.task_id, progress=progress)

    def progress_single(self) -> None:
        progress = self._next() % 101
        with self.db.transaction() as conn:
            result = conn.execute(
                single_update_task(self.lease, self.task_id, progress, postgres=self.postgres)
            )
            _expect_one(result.rowcount, self.lease)

    def log_plain(self) -> None:
        message = f"bench line {self._next()}"
        with self.db.transaction() as conn:
            conn.execute(
                statements.append_log(
                    self.lease.apply_id,
                    epoch=self.lease.epoch,
                    level="info",
                    event="bench",
                    message=message,
                )
            )

    def log_fenced(self) -> None:
        message = f"bench line {self._next()}"
        with leases.fence(self.db, self.lease) as fx:
            fenced.append_log(fx, "bench", message)

    def log_single(self) -> None:
        message = f"bench line {self._next()}"
        with self.db.transaction() as conn:
            # The rowcount of an INSERT is kept only when asked for (psycopg's is gone with
            # the closed cursor otherwise); SQLAlchemy keeps an UPDATE's anyway.
            result = conn.execute(
                single_append_log(self.lease, message),
                execution_options={"preserve_rowcount": True},
            )
            _expect_one(result.rowcount, self.lease)

    def operation(self, write: str, shape: str) -> Callable[[], None]:
        op: Callable[[], None] = getattr(self, f"{write}_{shape}")
        return op


def _expect_one(rowcount: int, lease: Lease) -> None:
    # Correctness of the benchmark, not timing: a single-statement fence that matched no row
    # would be timing a no-op.
    if rowcount != 1:
        raise LeaseLost(lease.apply_id, lease.epoch, reason=f"single statement matched {rowcount}")


@dataclass
class Result:
    backend: str
    description: str
    iterations: int
    samples: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    statements: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    # One more statement inside an open transaction: what the fence adds, as a floor.
    round_trip: list[int] = field(default_factory=list)
    # The progress write at the DBAPI level (no SQLAlchemy, no pool pre-ping): plain, fenced.
    driver: dict[str, list[int]] = field(default_factory=dict)
    # Python work per fenced transaction that a prebuilt statement would save: building
    # statements.fence() and computing its SQLAlchemy cache key, on every call.
    build: list[int] = field(default_factory=list)

    def median(self, write: str, shape: str) -> float:
        return _common.median_us(self.samples[write, shape])

    def ratio(self, write: str, shape: str) -> float:
        return _common.ratio(self.median(write, shape), self.median(write, "plain"))


def _statement_kind(sql: str) -> str:
    words = sql.split()
    head = words[0].upper() if words else "?"
    if head == "BEGIN":
        return " ".join(words[:2]).upper()
    upper = sql.upper()
    if "FOR UPDATE" in upper:
        return f"{head}..FOR UPDATE"
    if "LOCK IN SHARE MODE" in upper or "FOR SHARE" in upper:
        return f"{head}..SHARE"
    return head


def trace_statements(db: Database, op: Callable[[], None]) -> list[str]:
    """The statements one run of ``op`` sends, in order, ending with COMMIT (outside timing)."""
    seen: list[str] = []

    def on_execute(conn: Connection, cursor: Any, sql: str, *args: Any) -> None:
        seen.append(_statement_kind(sql))

    def on_commit(conn: Connection) -> None:
        seen.append("COMMIT")

    event.listen(db.engine, "before_cursor_execute", on_execute)
    event.listen(db.engine, "commit", on_commit)
    try:
        op()
    finally:
        event.remove(db.engine, "before_cursor_execute", on_execute)
        event.remove(db.engine, "commit", on_commit)
    return seen


def driver_level(db: Database, lease: Lease, task_id: int, iterations: int) -> dict[str, list[int]]:
    """The progress write, plain and fenced, on the bare DBAPI connection, interleaved: the SQL
    is leasehold's own statements compiled once, so only the round trips remain."""
    dialect = db.engine.dialect

    def compiled(stmt: Any) -> tuple[str, list[str] | None, dict[str, Any]]:
        # Positional keys for mysqlclient's and sqlite3's paramstyles; None for psycopg's named
        # %(name)s style, which takes the dict itself.
        c = stmt.compile(dialect=dialect)
        return c.string, list(c.positiontup) if c.positional else None, dict(c.params)

    def bound(keys: list[str] | None, params: dict[str, Any]) -> Any:
        return params if keys is None else [params[k] for k in keys]

    update_sql, update_keys, update_params = compiled(
        statements.update_task(lease.apply_id, task_id, epoch=lease.epoch, values={"progress": 0})
    )
    fence_sql, fence_keys, fence_params = compiled(statements.fence(lease.apply_id, lease.token))
    fence_args = bound(fence_keys, fence_params)
    samples: dict[str, list[int]] = {"plain": [], "fenced": []}
    raw = db.engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        cursor = conn.cursor()
        counter = 0

        def write(fenced_first: bool) -> None:
            nonlocal counter
            counter += 1
            update_params["progress"] = counter % 101
            if db.is_sqlite:
                cursor.execute("BEGIN IMMEDIATE")
            if fenced_first:
                cursor.execute(fence_sql, fence_args)
                if cursor.fetchone() is None:
                    raise LeaseLost(lease.apply_id, lease.epoch, reason="driver-level fence")
            cursor.execute(update_sql, bound(update_keys, update_params))
            conn.commit()

        for i in range(iterations):
            order = ("plain", "fenced") if i % 2 == 0 else ("fenced", "plain")
            for shape in order:
                start = time.perf_counter_ns()
                write(shape == "fenced")
                samples[shape].append(time.perf_counter_ns() - start)
        cursor.close()
    finally:
        raw.close()
    return samples


def orders(iteration: int) -> Iterator[tuple[str, str]]:
    """The order of the six operations in one iteration: which write goes first alternates, and
    the three shapes of each write rotate, so that no shape always follows the same one."""
    writes = WRITES if iteration % 2 == 0 else WRITES[::-1]
    k = iteration % len(SHAPES)
    shapes = SHAPES[k:] + SHAPES[:k]
    for write in writes:
        for shape in shapes:
            yield write, shape


def measure(
    backend: str, db: Database, description: str, *, iterations: int, warmup: int
) -> Result:
    lease, task_ids = _common.running_lease(db)
    work = Workload(db, lease, task_ids[0])
    result = Result(backend, description, iterations)
    for write in WRITES:
        for shape in SHAPES:
            op = work.operation(write, shape)
            result.statements[write, shape] = trace_statements(db, op)
            result.samples[write, shape] = []
    for i in range(warmup):
        for write, shape in orders(i):
            work.operation(write, shape)()
    clock_ns = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for i in range(iterations):
            for write, shape in orders(i):
                op = work.operation(write, shape)
                start = clock_ns()
                op()
                result.samples[write, shape].append(clock_ns() - start)
        with db.transaction() as conn:
            probe = text("SELECT 1")
            for _ in range(iterations):
                start = clock_ns()
                conn.execute(probe).scalar_one()
                result.round_trip.append(clock_ns() - start)
        result.driver = driver_level(db, lease, task_ids[0], iterations)
        for _ in range(iterations):
            start = clock_ns()
            statements.fence(lease.apply_id, lease.token)._generate_cache_key()
            result.build.append(clock_ns() - start)
    finally:
        gc.enable()
    return result


def report(result: Result) -> None:
    print(f"== {result.description}")
    print(f"   {result.iterations} interleaved iterations; latency of one whole transaction")
    print(
        f"   {'write':<9} {'shape':<7} {'median us':>10} {'p90 us':>9} {'vs plain':>9}  statements"
    )
    for write in WRITES:
        for shape in SHAPES:
            samples = result.samples[write, shape]
            print(
                f"   {write:<9} {shape:<7} {result.median(write, shape):>10.1f} "
                f"{_common.percentile_us(samples, 0.9):>9.1f} "
                f"{result.ratio(write, shape):>8.2f}x  "
                f"{', '.join(result.statements[write, shape])}"
            )
    extra = _common.median_us(result.round_trip)
    added = ", ".join(
        f"{write} +{result.median(write, 'fenced') - result.median(write, 'plain'):.1f}"
        for write in WRITES
    )
    print(
        f"   one more statement in an open transaction (SELECT 1): median {extra:.1f} us; "
        f"the fence added (median us): {added}"
    )
    plain, fenced_ = (_common.median_us(result.driver[k]) for k in ("plain", "fenced"))
    print(
        f"   progress at the DBAPI level (statements compiled once, no SQLAlchemy, no pre-ping): "
        f"plain {plain:.1f} us, fenced {fenced_:.1f} us = {_common.ratio(fenced_, plain):.2f}x"
    )
    print(
        "   building statements.fence() and its SQLAlchemy cache key, per fenced transaction: "
        f"median {_common.median_us(result.build):.1f} us"
    )
    for write in WRITES:
        for shape in ("fenced", "single"):
            print(f"fence_{shape}_{write}_ratio_{result.backend}={result.ratio(write, shape):.3f}")


def describe(db: Database, isolation: str) -> str:
    with db.transaction() as conn:
        if db.is_sqlite:
            version = conn.execute(text("SELECT sqlite_version()")).scalar_one()
            mode = conn.execute(text("PRAGMA journal_mode")).scalar_one()
            return f"SQLite {version} (journal_mode={mode}, synchronous=NORMAL, BEGIN IMMEDIATE)"
        if _stores.is_postgres(db):
            version = conn.execute(text("SHOW server_version")).scalar_one()
            sync = conn.execute(text("SHOW synchronous_commit")).scalar_one()
            fsync = conn.execute(text("SHOW fsync")).scalar_one()
            return (
                f"PostgreSQL {version} ({isolation}, synchronous_commit={sync}, fsync={fsync}, "
                "psycopg 3, one pooled connection with pre-ping)"
            )
        version = conn.execute(text("SELECT VERSION()")).scalar_one()
        flush = conn.execute(text("SELECT @@innodb_flush_log_at_trx_commit")).scalar_one()
    return (
        f"MariaDB/MySQL {version} ({isolation}, innodb_flush_log_at_trx_commit={flush}, "
        "mysqlclient, one pooled connection with pre-ping)"
    )


def run_backend(backend: str, args: argparse.Namespace) -> Result:
    with _stores.scratch(backend, args) as url:
        db = _stores.open_store(backend, url, args)
        try:
            return measure(
                backend,
                db,
                describe(db, args.isolation),
                iterations=args.iterations,
                warmup=args.warmup,
            )
        finally:
            db.dispose()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--iterations",
        type=int,
        default=3000,
        help="timed iterations per backend; each runs all six transactions (default 3000)",
    )
    parser.add_argument("--warmup", type=int, default=100, help="untimed iterations first")
    parser.add_argument(
        "--backends",
        default=",".join(_stores.STORES),
        help=f"comma-separated subset of {','.join(_stores.STORES)} (default all three), "
        "measured in that order",
    )
    _stores.add_server_arguments(parser)
    args = parser.parse_args(argv)
    args.backend_list = _stores.parse_stores(parser, "--backends", args.backends)
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    return args


def side_by_side(results: dict[str, Result]) -> None:
    """The stores measured, one column each: median us of each shape, and the ratios."""
    if not results:
        return
    names = list(results)
    print("== side by side (median us; ratios are within each store)")
    print("   " + f"{'':<24}" + "".join(f"{name:>14}" for name in names))
    for write in WRITES:
        for shape in SHAPES:
            cells = "".join(f"{results[n].median(write, shape):>14.1f}" for n in names)
            print(f"   {write + ' ' + shape:<24}{cells}")
        for shape in ("fenced", "single"):
            cells = "".join(f"{results[n].ratio(write, shape):>13.2f}x" for n in names)
            print(f"   {write + ' ' + shape + '/plain':<24}{cells}")
    cells = ""
    for n in names:
        plain, fenced_ = (_common.median_us(results[n].driver[k]) for k in ("plain", "fenced"))
        cells += f"{_common.ratio(fenced_, plain):>13.2f}x"
    print(f"   {'progress DBAPI f/p':<24}{cells}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for key, doc in SHAPE_DOC.items():
        print(f"shape {key:<7} {doc}")
    # MariaDB's key first, whatever the order asked: it is the one scripts have parsed.
    keyed = sorted(args.backend_list, key=lambda b: b != _stores.MARIADB)
    headline = {backend: "unavailable" for backend in keyed}
    results: dict[str, Result] = {}
    started = time.perf_counter_ns()
    for backend in args.backend_list:
        try:
            result = run_backend(backend, args)
        except (_common.BackendUnavailable, StorageUnavailable) as exc:
            print(f"== {backend}: SKIPPED, NOT MEASURED: {exc}")
            continue
        report(result)
        results[backend] = result
        worst = max(WRITES, key=lambda w: result.ratio(w, "fenced"))
        headline[backend] = f"{result.ratio(worst, 'fenced'):.2f}"
        print(
            f"headline ({backend}): the worse of the two writes' fenced/plain median ratios "
            f"(here: {worst}); goal <= 1.2"
        )
    side_by_side(results)
    elapsed = (time.perf_counter_ns() - started) / 1e9
    print(f"total time {elapsed:.1f} s")
    print(_stores.key_line([(f"fence_overhead_ratio_{b}", headline[b]) for b in keyed]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
