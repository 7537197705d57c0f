"""What the fence costs a GitHub effect, and how many effects one apply sustains.

Against the GitHub stand-in (a real HTTP server on 127.0.0.1, in this process), with the same
``tasks.github.client.GitHubClient`` for every call:

- fenced: one comment edit as the ``Publisher`` makes it:
  ``with leases.fence(db, lease) as fx: client.edit_comment(...); fenced.record_comment(fx, ...)``
  (the apply row locked from the first statement to the commit, the call and its record in one
  transaction);
- plain: ``client.edit_comment(...)`` alone, no database at all.

The two are interleaved, their order alternating per iteration, after a few warm-up rounds that
are not counted; every edit sets a new body. Reported as medians and their ratio, on MariaDB (a
scratch database, dropped at the end; skipped when no server answers) and on SQLite (a temporary
file).

Then the effect rate of one apply: ``Publisher.progress(boundary=True)`` in a tight loop for a
few seconds, each call preceded by the fenced progress write that precedes it in the runner
(without one the body would not change and the publisher would make no call at all). Counted
from the stand-in's request log: edits per second of wall time, and per second spent inside
``progress`` alone.

The client is opened once (one pooled HTTP connection), as ``run_apply`` opens it for a run.

The last line is ``effect_fence_ratio=<x> effect_rate_per_s=<y>``: median fenced / median plain
edit, and edits per second of wall time, on MariaDB (on SQLite if MariaDB is unavailable; the
line before says which). Figures, not assertions.

Run: ``.venv/bin/python bench/effects.py [--iterations 200] [--seconds 5] [--backends
mariadb,sqlite]``.
"""

from __future__ import annotations

import argparse
import gc
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from leases import Lease, fence
from storage import fenced
from storage.database import Database, open_database
from tasks.github import render
from tasks.github.client import GitHubClient, GitHubConfig
from tasks.github.publisher import Publisher
from tasks.interrupts import Interrupts
from tasks.testing.standin import GitHubStandIn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _common

OWNER, REPO, PR = "acme", "shop", 7
REPOSITORY = f"{OWNER}/{REPO}"
SHA = "be7c4" + "0" * 35
WARMUP = 10


@dataclass
class Figures:
    backend: str
    fenced_us: float
    plain_us: float
    fenced_p90_us: float
    plain_p90_us: float
    edits: int
    seconds: float
    progress_seconds: float
    progress_median_us: float

    @property
    def ratio(self) -> float:
        return _common.ratio(self.fenced_us, self.plain_us)

    @property
    def rate(self) -> float:
        return self.edits / self.seconds if self.seconds > 0 else float("nan")

    @property
    def rate_in_progress(self) -> float:
        return self.edits / self.progress_seconds if self.progress_seconds > 0 else float("nan")


def _timed(fn: Callable[[], object]) -> int:
    started = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - started


def measure(backend: str, url: str, *, iterations: int, seconds: float) -> Figures:
    token = "ghp_" + secrets.token_hex(20)
    db = open_database(url)
    try:
        with GitHubStandIn([token]) as github:
            return _measure(backend, db, github, token, iterations=iterations, seconds=seconds)
    finally:
        db.dispose()


def _measure(
    backend: str,
    db: Database,
    github: GitHubStandIn,
    token: str,
    *,
    iterations: int,
    seconds: float,
) -> Figures:
    lease, task_ids = _common.running_lease(db)
    client = GitHubClient(GitHubConfig(api_url=github.url, token=token, timeout=10.0)).open()
    marker = render.marker(lease.apply_id, lease.epoch)
    comment_id = client.create_comment(REPOSITORY, PR, f"{marker}\nfirst")
    bodies = (f"{marker}\nedit {n}" for n in range(10**9))

    def fenced_edit() -> None:
        body = next(bodies)
        with fence(db, lease) as fx:
            client.edit_comment(REPOSITORY, comment_id, body)
            fenced.record_comment(
                fx,
                kind=render.COMMENT_KIND,
                github_comment_id=comment_id,
                body_sha256=render.digest(body),
            )

    def plain_edit() -> None:
        client.edit_comment(REPOSITORY, comment_id, next(bodies))

    fenced_ns: list[int] = []
    plain_ns: list[int] = []
    gc.collect()
    gc.disable()
    try:
        for i in range(WARMUP + iterations):
            kinds = [(fenced_edit, fenced_ns), (plain_edit, plain_ns)]
            if i % 2:
                kinds.reverse()
            for fn, out in kinds:
                elapsed = _timed(fn)
                if i >= WARMUP:
                    out.append(elapsed)
    finally:
        gc.enable()

    try:
        edits, wall, in_progress, per_call = _rate(db, lease, task_ids[0], github, client, seconds)
    finally:
        client.close()
    return Figures(
        backend=backend,
        fenced_us=_common.median_us(fenced_ns),
        plain_us=_common.median_us(plain_ns),
        fenced_p90_us=_common.percentile_us(fenced_ns, 0.9),
        plain_p90_us=_common.percentile_us(plain_ns, 0.9),
        edits=edits,
        seconds=wall,
        progress_seconds=in_progress,
        progress_median_us=_common.median_us(per_call) if per_call else float("nan"),
    )


def _rate(
    db: Database,
    lease: Lease,
    task_id: int,
    github: GitHubStandIn,
    client: GitHubClient,
    seconds: float,
) -> tuple[int, float, float, list[int]]:
    """Publisher.progress(boundary=True) after each progress write, for ``seconds``."""
    publisher = Publisher(
        db,
        lease,
        client,
        Interrupts(),
        repository=REPOSITORY,
        pull_request=PR + 1,
        head_sha=SHA,
        comment_interval=3600.0,
    )
    publisher.start()  # adopt-or-create the comment and the check run; not counted
    before = _edits(github)
    per_call: list[int] = []
    progress = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        progress = progress % 100 + 1
        with fence(db, lease) as fx:
            fenced.update_task(fx, task_id, state="running", progress=progress)
        per_call.append(_timed(lambda: publisher.progress(boundary=True)))
    wall = time.perf_counter() - started
    edits = _edits(github) - before
    return edits, wall, sum(per_call) / 1e9, per_call


def _edits(github: GitHubStandIn) -> int:
    return sum(1 for r in github.requests() if r.method == "PATCH" and "/comments/" in r.path)


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


def report(figures: Figures, iterations: int) -> None:
    print(f"\n[{figures.backend}] one comment edit to the stand-in, {iterations} of each")
    print(f"  fenced (fence + edit + record, one tx): median {figures.fenced_us:9.0f} us")
    print(f"  plain  (edit alone)                  : median {figures.plain_us:9.0f} us")
    print(f"  ratio fenced/plain                   : {figures.ratio:.2f}")
    print(
        f"  p90 fenced {figures.fenced_p90_us:.0f} us, p90 plain {figures.plain_p90_us:.0f} us; "
        f"fence + record add {figures.fenced_us - figures.plain_us:.0f} us at the median"
    )
    print(
        f"  effect rate: {figures.edits} edits in {figures.seconds:.2f} s = "
        f"{figures.rate:.1f} edits/s with a progress write before each "
        f"({figures.rate_in_progress:.1f}/s counting only Publisher.progress, "
        f"median {figures.progress_median_us:.0f} us a call)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0, help="effect rate loop length")
    parser.add_argument("--backends", default="mariadb,sqlite")
    args = parser.parse_args(argv)

    results: dict[str, Figures] = {}
    for backend in backends(args.backends.split(",")):
        try:
            with backend.scratch() as url:
                results[backend.name] = measure(
                    backend.name, url, iterations=args.iterations, seconds=args.seconds
                )
        except _common.BackendUnavailable as exc:
            print(f"\n[{backend.name}] SKIPPED, NOT MEASURED: {exc}")
            continue
        report(results[backend.name], args.iterations)

    headline = results.get("mariadb") or results.get("sqlite")
    if headline is None:
        print("\nno backend available")
        print("effect_fence_ratio=unavailable effect_rate_per_s=unavailable")
        return 0
    others = ", ".join(
        f"{f.backend}: ratio {f.ratio:.2f}, {f.rate:.1f} edits/s" for f in results.values()
    )
    print(f"\nlast line from {headline.backend} ({others})")
    print(f"effect_fence_ratio={headline.ratio:.2f} effect_rate_per_s={headline.rate:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
