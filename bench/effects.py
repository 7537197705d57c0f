"""What GitHub costs an apply: nothing it has to wait for, whether GitHub is up, refusing
connections or accepting them and never answering; and what the fence costs one effect.

Against the GitHub stand-in (a real HTTP server on 127.0.0.1, in this process):

1. **An apply under a GitHub outage** (issue 10). The same apply (``--tasks`` sleep-engine tasks
   of ``--task-seconds`` each, on a pull request) is run by the real ``ApplyRunner`` with the
   real ``Publisher`` (effect timeout 2 s, comment interval 3 s, as in the issue's report), in
   three conditions, interleaved over ``--rounds`` rounds so that drift hits each alike:

   - ``up``: the stand-in answers;
   - ``refusing``: the client points at a port where nothing listens (connection refused);
   - ``hanging``: every request is held inside the stand-in and never answered (each call ends
     at the client's timeout).

   Timed: ``ApplyRunner.run()`` from its start to the apply's terminal commit (the runner never
   waits for the publisher thread, which finishes in the background). Reported as medians and
   ``apply_outage_ratio`` = the slower outage's median / up's median; the goal is <= 1.2.

2. **One fenced effect.** A comment edit as the publication makes it (open the effect window,
   edit, record the answer in the effect fence, close the window) against the edit alone, no
   database: interleaved, order alternating, after warm-up; medians and their ratio.

The last line is ``apply_outage_ratio=<x> effect_fence_ratio=<y>`` on MariaDB (on SQLite if
MariaDB is unavailable; the line before says which). Figures, not assertions.

Run: ``.venv/bin/python bench/effects.py [--rounds 3] [--tasks 8] [--task-seconds 1]
[--iterations 200] [--backends mariadb,sqlite]``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import secrets
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common
from leases import Lease, dispatch, redeem
from leases.effects import close_window, effect_fence, open_window
from storage import applies, published
from storage.applies import NewApply, NewTask
from storage.database import Database, open_database
from storage.states import ApplyState
from tasks.engines.sleep import SleepEngine
from tasks.github import render
from tasks.github.client import GitHubClient, GitHubConfig
from tasks.github.publisher import Publisher
from tasks.interrupts import Interrupts
from tasks.runner import ApplyRunner
from tasks.testing.standin import GitHubStandIn

REPOSITORY, PR = "acme/shop", 7
SHA = "be7c4" + "0" * 35
EFFECT_TIMEOUT, COMMENT_INTERVAL = 2.0, 3.0
CONDITIONS = ("up", "refusing", "hanging")
WARMUP = 10
_DATABASES = itertools.count(1)


class _NoReporter:
    def progress(self, *, epoch: int, index: int, total: int, table: str, percent: int) -> None:
        pass


@dataclass
class Figures:
    backend: str
    apply_s: dict[str, list[float]]
    fenced_us: float
    plain_us: float

    def median(self, condition: str) -> float:
        return statistics.median(self.apply_s[condition])

    @property
    def outage_ratio(self) -> float:
        worst = max(self.median("refusing"), self.median("hanging"))
        return _common.ratio(worst, self.median("up"))

    @property
    def fence_ratio(self) -> float:
        return _common.ratio(self.fenced_us, self.plain_us)


def _refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def _condition(github: GitHubStandIn, condition: str) -> Iterator[str]:
    """The API URL the client uses under ``condition``."""
    if condition == "refusing":
        yield _refused_url()
        return
    gate = github.hold("*", ".*") if condition == "hanging" else None
    try:
        yield github.url
    finally:
        if gate is not None:
            github.clear_faults()


def _pr_lease(db: Database, tasks: int, seconds: float) -> tuple[int, Lease]:
    new = NewApply(
        database_name=f"shop{next(_DATABASES)}",
        environment="bench",
        engine="sleep",
        tasks=[
            NewTask(f"t{i}", f"ALTER TABLE t{i} ADD COLUMN c INT", {"seconds": seconds})
            for i in range(tasks)
        ],
        repository=REPOSITORY,
        pull_request=PR,
        head_sha=SHA,
    )
    apply_id = applies.create(db, new).apply_id
    lease = dispatch(db, apply_id)
    redeem(db, lease, "bench-worker")
    return apply_id, lease


def time_apply(
    db: Database, github: GitHubStandIn, token: str, condition: str, tasks: int, seconds: float
) -> float:
    """Seconds from the runner's start to the apply's terminal commit."""
    apply_id, lease = _pr_lease(db, tasks, seconds)
    with _condition(github, condition) as api_url:
        client = GitHubClient(GitHubConfig(api_url=api_url, token=token, timeout=EFFECT_TIMEOUT))
        interrupts = Interrupts()
        publisher = Publisher(
            db,
            lease,
            client.open(),
            interrupts,
            repository=REPOSITORY,
            pull_request=PR,
            head_sha=SHA,
            comment_interval=COMMENT_INTERVAL,
            effect_timeout=EFFECT_TIMEOUT,
            effect_grace=EFFECT_TIMEOUT,
        )
        runner = ApplyRunner(
            db,
            lease,
            SleepEngine(),
            interrupts,
            _NoReporter(),
            effects=publisher,
        )
        started = time.perf_counter()
        outcome = runner.run()
        elapsed = time.perf_counter() - started
        publisher.close()
        if condition == "up":
            publisher.join(30.0)
        else:
            github.clear_faults()  # the thread's held call ends; what it owes is left owed
            publisher.join(EFFECT_TIMEOUT * 3)
    if outcome.state != ApplyState.COMPLETED or applies.get(db, apply_id)["state"] != "completed":
        raise SystemExit(f"apply {apply_id} under {condition}: {outcome}")
    return elapsed


def fence_cost(
    db: Database, github: GitHubStandIn, token: str, iterations: int
) -> tuple[float, float]:
    apply_id, lease = _pr_lease(db, 1, 0.0)
    client = GitHubClient(GitHubConfig(api_url=github.url, token=token, timeout=10.0)).open()
    marker = render.marker(apply_id, lease.epoch)
    comment_id = client.create_comment(REPOSITORY, PR, f"{marker}\nfirst")
    bodies = (f"{marker}\nedit {n}" for n in itertools.count())

    def fenced_edit() -> None:
        body = next(bodies)
        open_window(db, lease, EFFECT_TIMEOUT + 1.0)
        client.edit_comment(REPOSITORY, comment_id, body)
        with effect_fence(db, lease) as fx:
            published.record_comment(
                fx,
                kind=render.COMMENT_KIND,
                github_comment_id=comment_id,
                body_sha256=render.digest(body),
            )
        close_window(db, lease)

    def plain_edit() -> None:
        client.edit_comment(REPOSITORY, comment_id, next(bodies))

    fenced_ns: list[int] = []
    plain_ns: list[int] = []
    gc.collect()
    gc.disable()
    try:
        for i in range(WARMUP + iterations):
            kinds: list[tuple[Callable[[], None], list[int]]] = [
                (fenced_edit, fenced_ns),
                (plain_edit, plain_ns),
            ]
            if i % 2:
                kinds.reverse()
            for fn, out in kinds:
                started = time.perf_counter_ns()
                fn()
                if i >= WARMUP:
                    out.append(time.perf_counter_ns() - started)
    finally:
        gc.enable()
        client.close()
    return _common.median_us(fenced_ns), _common.median_us(plain_ns)


def measure(backend: str, url: str, args: argparse.Namespace) -> Figures:
    token = "ghp_" + secrets.token_hex(20)
    db = open_database(url)
    try:
        with GitHubStandIn([token]) as github:
            timings: dict[str, list[float]] = {c: [] for c in CONDITIONS}
            for n in range(args.rounds):
                order = CONDITIONS[n % 3 :] + CONDITIONS[: n % 3]
                for condition in order:
                    timings[condition].append(
                        time_apply(db, github, token, condition, args.tasks, args.task_seconds)
                    )
            fenced_us, plain_us = fence_cost(db, github, token, args.iterations)
    finally:
        db.dispose()
    return Figures(backend, timings, fenced_us, plain_us)


@dataclass
class Backend:
    name: str
    scratch: Callable[[], AbstractContextManager[str]]


def backends(names: list[str]) -> Iterator[Backend]:
    for name in names:
        if name == "mariadb":
            yield Backend(name, lambda: _common.scratch_mysql(_common.mysql_server_url()))
        elif name == "sqlite":
            yield Backend(name, _common.scratch_sqlite)
        else:
            raise SystemExit(f"unknown backend {name!r} (mariadb, sqlite)")


def report(figures: Figures, args: argparse.Namespace) -> None:
    print(
        f"\n[{figures.backend}] an apply of {args.tasks} x {args.task_seconds:g}s tasks on a pull "
        f"request (effect timeout {EFFECT_TIMEOUT:g}s, comment interval {COMMENT_INTERVAL:g}s), "
        f"{args.rounds} rounds"
    )
    for condition in CONDITIONS:
        runs = ", ".join(f"{s:.2f}" for s in figures.apply_s[condition])
        print(f"  GitHub {condition:9}: median {figures.median(condition):6.2f} s  ({runs})")
    print(f"  slower outage / up: {figures.outage_ratio:.2f}")
    print(
        f"  one comment edit: window + edit + record + close {figures.fenced_us:.0f} us, "
        f"edit alone {figures.plain_us:.0f} us, ratio {figures.fence_ratio:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--task-seconds", type=float, default=1.0)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--backends", default="mariadb,sqlite")
    args = parser.parse_args(argv)

    results: dict[str, Figures] = {}
    for backend in backends(args.backends.split(",")):
        try:
            with backend.scratch() as url:
                results[backend.name] = measure(backend.name, url, args)
        except _common.BackendUnavailable as exc:
            print(f"\n[{backend.name}] SKIPPED, NOT MEASURED: {exc}")
            continue
        report(results[backend.name], args)

    headline = results.get("mariadb") or results.get("sqlite")
    if headline is None:
        print("\nno backend available")
        print("apply_outage_ratio=unavailable effect_fence_ratio=unavailable")
        return 0
    others = ", ".join(
        f"{f.backend}: outage ratio {f.outage_ratio:.2f}, fence ratio {f.fence_ratio:.2f}"
        for f in results.values()
    )
    print(f"\nlast line from {headline.backend} ({others})")
    print(
        f"apply_outage_ratio={headline.outage_ratio:.2f} "
        f"effect_fence_ratio={headline.fence_ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
