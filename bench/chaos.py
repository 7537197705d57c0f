"""A seeded chaos campaign (issue 11): real ``celery worker`` and ``celery beat`` processes on a
private Redis (broker and results) and a private MariaDB (the store), publishing on the GitHub
stand-in, while seeded random faults hit them and applies are submitted throughout.

- **Faults** (``bench/_chaos_faults.py``): SIGKILL and SIGSTOP/SIGCONT of workers (killed ones
  restarted), beat killed and restarted, leasehold's store sessions killed (``KILL CONNECTION``),
  Redis restarted empty, a worker in a network namespace partitioned and healed, the store
  crashed and restarted, the ``mysql`` target crashed and restarted (a target failover), the
  store's ``time_zone`` moved (a clock jump), poison messages pushed raw onto the queues, GitHub
  answering 5xx, accepting and never answering, refusing connections, or slow. Every kind runs
  at least once (in a seeded order), then kinds are drawn by weight.
- **Applies**: ``N`` applies at seeded moments of the first 80% of the run, each with a
  ``request_id`` and a pull request: mostly ``sleep`` applies on six databases (so lines queue),
  about one in six a ``mysql`` apply adding columns on the private target. Sent as another app
  would (``send_task("leasehold.submit_apply")``), and sent again with the same ``request_id``
  until the apply is in the store: through broker and store outages alike.
- **The end**: every fault healed, every apply waited for until terminal (with a deadline) and
  its pull request published, then the invariants (``bench/_chaos_checks.py``).

``random.Random(seed)`` draws the whole plan before anything starts (printed at the start), and
every line is stamped with seconds since the start: a run is replayed by its seed. The last line
is ``chaos_violations=V applies_completed=C/N faults=F seed=S``.

Run: ``.venv/bin/python bench/chaos.py --seed 1 --applies 120 --seconds 300`` (about 5.5 min).
Needs ``mariadbd``, ``redis-server``; partitions need root, ``ip`` and ``socat`` (skipped with a
loud line otherwise, or with ``--no-partition``).
"""

from __future__ import annotations

import argparse
import bisect
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import redis
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _chaos_checks as checks
from bench._chaos_faults import KINDS, MAX_POISON_BYTES, STORE_DATABASE, Injector, Rig, targets_json
from bench._chaos_plan import TARGETS, Submission, Submitter, plan_applies, plan_faults
from storage import publications
from storage.tables import metadata
from tasks import deadletter
from tasks.testing.standin import GitHubStandIn
from tests.e2e.faults import Link, all_ids, namespaced_worker, private_deployment
from tests.e2e.helpers import PROCESS_START_TIMEOUT, Cluster, Stack
from tests.servers import (
    Namespace,
    PrivateMariaDB,
    PrivateRedis,
    free_port,
    namespaces_available,
)

TERMINAL = ("completed", "failed", "cancelled")
# The campaign injects faults far more often than production sees them: without room, an apply
# hit by several store outages would be abandoned by design after 5 reclaims.
MAX_RECLAIMS = 50


@dataclass
class Result:
    seed: int
    applies: int
    completed: int = 0
    faults: int = 0
    violations: list[str] = field(default_factory=list)
    injected: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"chaos_violations={len(self.violations)} applies_completed={self.completed}/"
            f"{self.applies} faults={self.faults} seed={self.seed}"
        )


# --- the run ------------------------------------------------------------------------------------


def _states(stack: Stack, ids: Sequence[int]) -> dict[int, str]:
    table = metadata.tables["applies"]
    try:
        with stack.db.transaction() as conn:
            rows = conn.execute(select(table.c.id, table.c.state).where(table.c.id.in_(ids)))
            return {int(r[0]): str(r[1]) for r in rows}
    except Exception:
        return {}


def _reclaims(stack: Stack, ids: Sequence[int]) -> str:
    table = metadata.tables["applies"]
    with stack.db.transaction() as conn:
        counts = list(
            conn.execute(select(table.c.reclaim_count).where(table.c.id.in_(ids))).scalars()
        )
    hit = [int(c) for c in counts if c]
    return f"reclaims {sum(hit)} over {len(hit)} applies (at most {max(hit, default=0)} each)"


def _dead_letters(broker: PrivateRedis) -> int:
    client = redis.Redis.from_url(broker.url(0))
    try:
        return int(deadletter.RedisStore(client).count())
    finally:
        client.close()


def _published(stack: Stack, apply_id: int) -> bool:
    owed = publications.get(stack.db, apply_id)
    return owed is not None and owed["published_at"] is not None


def _wait(what: str, done: Callable[[], bool], timeout: float, log: Callable[[str], None]) -> bool:
    deadline = time.monotonic() + timeout
    next_note = time.monotonic() + 15
    while not done():
        if time.monotonic() > deadline:
            log(f"gave up after {timeout:g}s waiting for {what}")
            return False
        if time.monotonic() > next_note:
            log(f"still waiting for {what}")
            next_note += 15
        time.sleep(0.5)
    return True


def _target(folder: Path, plan: list[Submission]) -> PrivateMariaDB:
    target = PrivateMariaDB(folder / "target").start()
    for name in TARGETS:
        target.create_database(name)
    for sub in plan:
        if sub.payload["engine"] == "mysql":
            table = sub.payload["tasks"][0]["table"]
            target.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY)", sub.payload["database"])
    return target


def _poisons() -> list[tuple[str, str, bytes]]:
    from tests.e2e.test_poison import POISONS

    return [(p.name, p.queue, p.raw) for p in POISONS if len(p.raw) <= MAX_POISON_BYTES]


def _namespace(
    es: ExitStack,
    store: PrivateMariaDB,
    broker: PrivateRedis,
    github_port: int,
    target: PrivateMariaDB | None,
) -> tuple[Namespace, Link, dict[str, str]]:
    """A network namespace for one worker, reaching the store, the target and GitHub through one
    veth pair and Redis through another (``tests/e2e/faults.py``), and that worker's settings."""
    ns = Namespace().create()
    es.callback(ns.close)
    link = Link(ns).create()
    es.callback(link.close)
    host, db_port = ns.forward(store.port)
    _, redis_port = link.forward(broker.port)
    ns.forward(github_port)
    env = {
        "LEASEHOLD_DATABASE_URL": f"mysql+mysqldb://root@{host}:{db_port}/{STORE_DATABASE}",
        "LEASEHOLD_BROKER_URL": f"redis://{link.host_ip}:{redis_port}/0",
        "LEASEHOLD_RESULT_BACKEND": f"redis://{link.host_ip}:{redis_port}/1",
        "LEASEHOLD_GITHUB_API_URL": f"http://{host}:{github_port}",
    }
    if target is not None:
        ns.forward(target.port)
        env["LEASEHOLD_TARGETS"] = targets_json(host, target.port, TARGETS)
    return ns, link, env


def describe_plan(seed: int, applies: int, seconds: float, interval: float) -> list[str]:
    """The faults and applies a seed draws (the target's share assumed on)."""
    rng = random.Random(seed)
    submissions = plan_applies(rng, applies, seconds, seed, True)
    faults = plan_faults(rng, seconds, interval)
    return [f"+{p.at:7.3f}s fault {p.kind} {p.args}" for p in faults] + [
        f"+{s.at:7.3f}s apply {s.request_id} {s.payload['engine']} on {s.payload['database']} "
        f"({len(s.payload['tasks'])} tasks)"
        for s in submissions
    ]


def run(
    seed: int,
    applies: int,
    seconds: float,
    *,
    workers: int = 3,
    interval: float = 4.5,
    partition: bool = True,
    target: bool = True,
    settle: float = 300.0,
    keep: bool = False,
    out: Callable[[str], None] = print,
) -> Result:
    rng = random.Random(seed)
    submissions = plan_applies(rng, applies, seconds, seed, target)
    faults = plan_faults(rng, seconds, interval)
    result = Result(seed, applies)
    origin = time.monotonic()

    def log(line: str) -> None:
        out(f"[{time.monotonic() - origin:8.3f}] {line}")

    log(f"seed {seed}: {applies} applies over {seconds:g}s, {len(faults)} faults planned")
    for p in faults:
        log(f"plan +{p.at:7.3f}s {p.kind} {p.args}")
    folder = Path(tempfile.mkdtemp(prefix=f"leasehold-chaos-{seed}-"))
    with ExitStack() as es:
        store = PrivateMariaDB(folder / "store").start()
        es.callback(store.close)
        url = store.create_database(STORE_DATABASE)
        tgt = _target(folder, submissions) if target else None
        if tgt is not None:
            es.callback(tgt.close)
        broker = PrivateRedis(folder / "redis").start()
        es.callback(broker.close)
        token = "ghp_" + secrets.token_hex(20)
        github_port = free_port()
        github = GitHubStandIn([token], port=github_port).start()
        es.callback(github.stop)
        stack = es.enter_context(private_deployment(folder, database_url=url, redis=broker))
        stack.env.update(
            {
                "LEASEHOLD_GITHUB_API_URL": github.url,
                "LEASEHOLD_GITHUB_TOKEN": token,
                "LEASEHOLD_COMMENT_INTERVAL": "0.3",
                "LEASEHOLD_MAX_RECLAIMS": str(MAX_RECLAIMS),
            }
        )
        if tgt is not None:
            stack.env["LEASEHOLD_TARGETS"] = targets_json("127.0.0.1", tgt.port, TARGETS)
        why_not = namespaces_available() if partition else "--no-partition"
        ns = link = ns_worker = None
        ns_env: dict[str, str] = {}
        if why_not is None:
            ns, link, ns_env = _namespace(es, store, broker, github_port, tgt)
        cluster = Cluster(stack)
        es.callback(cluster.close)  # before the namespace goes: its worker lives in it
        if ns is not None:
            ns_worker = namespaced_worker(cluster, ns, env=ns_env, apply_slots=2, name="nsw")
        procs = cluster.workers(workers - (ns_worker is not None), apply_slots=2)
        (beat,) = cluster.beats(1)
        rig = Rig(
            store,
            broker,
            github,
            [*procs, *([ns_worker] if ns_worker else [])],
            beat,
            _poisons(),
            tgt,
            ns,
            link,
            ns_worker,
        )
        injector = Injector(rig, log)
        if why_not is not None:
            injector.skipped["partition"] = why_not
        log(f"rig up: {len(rig.workers)} workers, 1 beat, folder {folder}")

        start = time.monotonic()
        submitter = Submitter(stack, submissions, start, log)
        submitter.start()
        queue = list(faults)
        while queue or time.monotonic() - start < seconds:
            injector.heal_due(time.monotonic())
            if queue and queue[0].at <= time.monotonic() - start:
                planned = queue.pop(0)
                until = injector.busy_until(planned.kind, planned.args)
                if until is not None:
                    later = replace(planned, at=until - start + 0.1)
                    bisect.insort(queue, later, key=lambda p: p.at)
                    log(f"fault {planned.kind} deferred to +{later.at:.1f}s: its target is down")
                    continue
                try:
                    result.faults += injector.inject(planned.kind, planned.args)
                except Exception as exc:
                    log(f"fault {planned.kind} could not be injected: {exc!r}")
            else:
                time.sleep(0.05)
        log("fault window over: healing everything")
        injector.heal_all()
        injector.ready(PROCESS_START_TIMEOUT)

        deadline = time.monotonic() + settle
        _wait("every apply in the store", lambda: not submitter.is_alive(), settle, log)
        submitter.stop.set()
        ids = sorted(submitter.ids.values())

        def all_terminal() -> bool:
            states = _states(stack, ids)
            return len(states) == len(ids) and all(s in TERMINAL for s in states.values())

        _wait("every apply terminal", all_terminal, max(0.0, deadline - time.monotonic()), log)
        states = _states(stack, ids)
        completed = sorted(i for i, s in states.items() if s == "completed")
        # GitHub's backoff may have grown to a minute during the outages.
        _wait(
            "every completed apply published",
            lambda: all(_published(stack, i) for i in completed),
            120.0,
            log,
        )
        result.completed = len(completed)
        for state in states.values():
            result.states[state] = result.states.get(state, 0) + 1
        result.injected = dict(injector.injected)
        result.skipped = dict(injector.skipped)
        result.violations = _check(stack, github, submissions, submitter, ids, completed, log)
        log(
            f"store rows {len(ids)}, states {result.states}; sends {submitter.sends} "
            f"({submitter.failed_sends} failed)"
        )
        dead = _dead_letters(broker)
        log(f"{_reclaims(stack, ids)}; dead letters {dead} (since the last Redis restart)")
        for line in injector.exits:
            log(f"note: {line}")
        for kind in KINDS:
            note = injector.skipped.get(kind)
            count = injector.injected.get(kind, 0)
            log(f"faults {kind}: {count}" + (f" (SKIPPED, NOT INJECTED: {note})" if note else ""))
        if result.violations or result.completed < applies:
            keep = True
            (folder / "violations.txt").write_text(
                "\n".join(result.violations)
                + "\n\n"
                + checks.details(stack.db, result.violations, ids)
            )
        for line in result.violations:
            log(f"VIOLATION {line}")
        # Logs survive the servers' own cleanup: they are in folder/logs.
    if keep:
        log(f"kept {folder} (process logs in logs/)")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def _check(
    stack: Stack,
    github: GitHubStandIn,
    plan: list[Submission],
    submitter: Submitter,
    ids: list[int],
    completed: list[int],
    log: Callable[[str], None],
) -> list[str]:
    violations: list[str] = []
    missing = [s.request_id for s in plan if s.request_id not in submitter.ids]
    if missing:
        violations.append(f"{len(missing)} submitted applies never reached the store: {missing}")
    rows = all_ids(stack)
    if len(rows) != len(plan):
        violations.append(f"{len(rows)} applies in the store for {len(plan)} request ids")
    note, audited = checks.audit(stack.db)
    log(f"leasehold audit: {note}")
    violations += audited
    found = checks.history(stack, ids, set(completed))
    log(f"history helpers: {len(found)} violations")
    violations += found
    shas = {
        submitter.ids[s.request_id]: s.payload["head_sha"]
        for s in plan
        if submitter.ids.get(s.request_id) in set(completed)
    }
    found = checks.pull_requests(github, stack.db, shas)
    log(f"GitHub stand-in: {len(found)} violations over {len(shas)} pull request records")
    violations += found
    return violations


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--applies", type=int, default=120)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--interval", type=float, default=4.5, help="mean seconds between faults")
    parser.add_argument("--settle", type=float, default=300.0, help="deadline after the faults")
    parser.add_argument("--no-partition", action="store_true")
    parser.add_argument("--no-target", action="store_true", help="sleep applies only")
    parser.add_argument("--keep", action="store_true", help="keep the folder (logs) afterwards")
    parser.add_argument(
        "--plan-only", action="store_true", help="print the seed's plan, run nothing"
    )
    args = parser.parse_args(argv)
    if args.plan_only:
        for line in describe_plan(args.seed, args.applies, args.seconds, args.interval):
            print(line)
        return 0
    try:
        result = run(
            args.seed,
            args.applies,
            args.seconds,
            workers=args.workers,
            interval=args.interval,
            partition=not args.no_partition,
            target=not args.no_target,
            settle=args.settle,
            keep=args.keep,
            out=lambda line: print(line, flush=True),
        )
    except BaseException as exc:
        # tests/servers/ reports a missing server with pytest's skip outcome.
        if type(exc).__name__ in ("Skipped", "Failed"):
            print(f"SKIPPED, NOT MEASURED: {exc}", flush=True)
            print(
                f"chaos_violations=unavailable applies_completed=0/{args.applies} faults=0 "
                f"seed={args.seed}"
            )
            return 2
        raise
    print(result.summary(), flush=True)
    return 0 if not result.violations and result.completed == result.applies else 1


if __name__ == "__main__":
    sys.exit(main())
