"""The race of issue 4: a worker's GitHub call is in flight (the stand-in holds it) when a reclaim
runs in another process. The reclaim must not rotate that apply until the call is over:

- MariaDB: the pass skips the locked row (``FOR UPDATE SKIP LOCKED``) and returns without it;
- SQLite: the pass waits on the database write lock until the call's fence commits, then rotates.

After the call, a reclaim rotates the apply, and the stale worker's next effect fails with
``LeaseLost`` without reaching the stand-in. The heartbeat is aged *before* the call starts (with
the row or the database locked, nothing else could write it).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from leases import fence
from storage import applies, fenced
from storage.database import Database
from storage.errors import LeaseLost
from tasks.github import render
from tasks.testing.standin import GitHubStandIn
from tests import support
from tests.celery_fixtures import run_lease
from tests.contract.test_github_effects import (
    COMMENT,
    COMMENTS,
    Background,
    comment_record,
    kinds,
    pr_apply,
    publisher,
    the_comment,
)

ROOT = Path(__file__).resolve().parents[2]
# One reclaim pass in a process of its own: prints "ready" once its imports are done, then the
# applies it rotated as JSON [[apply_id, previous_epoch, new_epoch], ...].
RECLAIM = """
import json, sys
from leases import reclaim
from storage import open_database
from tests import support
db = open_database(sys.argv[1])
print("ready", flush=True)
done = reclaim(db, support.reclaim_policy(stale_after=0.2, dispatch_timeout=3600.0))
print(json.dumps([[r.apply_id, r.previous_epoch, r.lease and r.lease.epoch] for r in done]))
db.dispose()
"""
HELD_FOR = 1.0  # how long the SQLite pass is watched not finishing while the call is held


@pytest.fixture
def token() -> str:
    return "ghp_" + secrets.token_hex(20)


@pytest.fixture
def github(token: str) -> Iterator[GitHubStandIn]:
    with GitHubStandIn([token]) as standin:
        yield standin


@pytest.fixture
def reclaimers(backend_url: str) -> Iterator[Callable[[], Reclaimer]]:
    """Start reclaim passes in other processes; any still running after the test is killed."""
    started: list[Reclaimer] = []

    def start() -> Reclaimer:
        started.append(Reclaimer(backend_url))
        return started[-1]

    yield start
    for reclaimer in started:
        reclaimer.kill()


class Reclaimer:
    """``leases.reclaim`` in another process, against the same database URL."""

    def __init__(self, url: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RECLAIM, url],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().strip()
        if first != "ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"the reclaim process did not start: {first!r}\n{err}")

    def running_for(self, seconds: float) -> bool:
        """True if the pass is still running after ``seconds`` (polled, not slept through)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return self.proc.poll() is None

    def result(self, timeout: float = 30.0) -> list[list[int]]:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        rotated: list[list[int]] = json.loads(out.strip().splitlines()[-1])
        return rotated

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


@pytest.mark.parametrize("call", ["creation", "edit"])
def test_a_reclaim_in_another_process_cannot_rotate_while_an_effect_is_in_flight(
    db: Database,
    reclaimers: Callable[[], Reclaimer],
    github: GitHubStandIn,
    token: str,
    call: str,
) -> None:
    apply_id = pr_apply(db, (1.0, 1.0))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, timeout=30.0)  # the hold stays within the timeout
    effect: Callable[[], None]
    if call == "creation":
        gate = github.hold("POST", COMMENTS)
        effect = pub.start
    else:
        pub.start()
        task_id = support.task_ids(db, apply_id)[0]
        with fence(db, lease) as fx:  # a change worth an edit
            fenced.update_task(fx, task_id, state="running", progress=40)
        gate = github.hold("PATCH", COMMENT)

        def effect() -> None:
            pub.progress(boundary=True)

    support.age_heartbeat(db, apply_id, 60.0)  # stale long before the call starts
    in_flight = Background(effect)
    reclaimer: Reclaimer | None = None
    try:
        assert gate.wait_arrived(10), "the call never reached the stand-in"
        reclaimer = reclaimers()
        if db.is_sqlite:
            # the pass waits on the database lock the call's fence holds
            assert reclaimer.running_for(HELD_FOR), reclaimer.result()
            assert gate.answered == 0
        else:
            # the pass skips the locked row and ends without touching it, the call still held
            assert reclaimer.result() == []
            assert gate.answered == 0
            assert applies.get(db, apply_id)["lease_epoch"] == lease.epoch
    finally:
        gate.release()
    in_flight.result()

    # the call was recorded, at the old epoch, before any rotation could commit
    comment_id, bodies = the_comment(github)
    record = comment_record(db, apply_id)
    assert record is not None
    assert (record["github_comment_id"], record["last_epoch"]) == (comment_id, lease.epoch)
    assert record["body_sha256"] == render.digest(bodies[-1])
    assert render.parse_marker(bodies[-1]) == (apply_id, lease.epoch)
    if call == "edit":
        assert "| 1 | `t0` | running | 40% |" in bodies[-1]

    # after the call: the SQLite pass that waited rotates it; on MariaDB the next pass does
    if db.is_sqlite:
        assert reclaimer is not None
        rotated = reclaimer.result()
    else:
        rotated = reclaimers().result()
    assert rotated == [[apply_id, lease.epoch, lease.epoch + 1]]
    state, epoch, _, _ = support.lease_of(db, apply_id)
    assert (state, epoch) == ("dispatched", lease.epoch + 1)
    assert support.log_events(db, apply_id)[-1] == (lease.epoch + 1, "reclaimed")

    # the stale worker's next effect: LeaseLost, and the stand-in never hears of it
    seen = github.requests()
    with pytest.raises(LeaseLost):
        pub.progress(boundary=True)
    assert github.requests() == seen, kinds(github.requests()[len(seen) :])
    assert comment_record(db, apply_id) == record
