"""The race of issue 4, under the effect window (issue 10): a worker's GitHub call is in flight
(the stand-in holds it) when a reclaim runs in another process.

No lock is held during a call, so the reclaim rotates the apply at once, on every store: the
brake never waits for GitHub. What the fence then guarantees:

- the stale holder's call lands, but nothing of it is recorded, and it makes no further call;
- its answered call closes its own effect window (nothing else of it is written);
- the new holder's calls start only after that window closed, and adopt what the stale call
  created (nothing is created twice); the final state is published under the new lease.

The heartbeat is aged before the call starts.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from leases import Lease, fence, redeem
from storage import applies, fenced
from storage.database import Database
from storage.states import ApplyState
from tasks.github import render
from tasks.runner import Outcome
from tasks.testing.standin import GitHubStandIn
from tests import support
from tests.celery_fixtures import run_lease, wait_until
from tests.contract.test_github_effects import (
    COMMENT,
    COMMENTS,
    comment_record,
    kinds,
    pr_apply,
    publisher,
    run_to_end,
    runner,
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
def test_a_reclaim_in_another_process_rotates_while_an_effect_is_in_flight(
    db: Database,
    reclaimers: Callable[[], Reclaimer],
    github: GitHubStandIn,
    token: str,
    call: str,
) -> None:
    apply_id = pr_apply(db, (1.0, 1.0))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, timeout=30.0)  # the hold stays within the timeout
    if call == "creation":
        gate = github.hold("POST", COMMENTS)
        pub.start()
    else:
        pub.start()
        wait_until(lambda: comment_record(db, apply_id), timeout=10, what="the comment record")
        task_id = support.task_ids(db, apply_id)[0]
        with fence(db, lease) as fx:  # a change worth an edit
            fenced.update_task(fx, task_id, state="running", progress=40)
        gate = github.hold("PATCH", COMMENT)
        pub.progress(boundary=True)
    before = comment_record(db, apply_id)

    support.age_heartbeat(db, apply_id, 60.0)
    try:
        assert gate.wait_arrived(10), "the call never reached the stand-in"
        window = applies.get(db, apply_id)
        assert (window["effect_epoch"], window["effect_until"] is None) == (lease.epoch, False)
        # the pass rotates at once, the call still held: nothing waits for GitHub
        assert reclaimers().result() == [[apply_id, lease.epoch, lease.epoch + 1]]
        assert gate.answered == 0
    finally:
        gate.release()
    assert gate.wait_answered(10)
    wait_until(lambda: pub.stale, timeout=10, what="the publisher finding its lease gone")

    # the stale call landed, and nothing of it was recorded; its window is closed
    held = max(r.seq for r in github.requests() if r.fault == "held")
    comment_id, bodies = the_comment(github)
    assert render.parse_marker(bodies[-1]) == (apply_id, lease.epoch)
    assert comment_record(db, apply_id) == before
    assert applies.get(db, apply_id)["effect_until"] is None
    state, epoch, new_token, _ = support.lease_of(db, apply_id)
    assert (state, epoch) == ("dispatched", lease.epoch + 1)
    assert support.log_events(db, apply_id)[-1] == (lease.epoch + 1, "reclaimed")

    # the stale publisher makes no further call, whatever it is told
    pub.progress(boundary=True)
    pub.close()
    assert pub.join(10)
    assert [kinds([r]) for r in github.requests() if r.seq > held] == []

    # the new holder (a reclaimed lease: lock-delay) adopts what the stale call made
    assert new_token is not None
    new = Lease(apply_id, epoch, new_token)
    redeem(db, new, "worker-2")
    pub2 = publisher(db, new, github, token, grace=0.2, reclaimed=True)
    assert run_to_end(runner(db, new, pub2), pub2) == Outcome(ApplyState.COMPLETED)
    after_id, bodies = the_comment(github)
    assert after_id == comment_id
    assert render.parse_marker(bodies[-1]) == (apply_id, new.epoch + 1)
    assert kinds(github.requests()).count("POST comments") == 1
    changes = [r for r in github.requests() if r.seq > held and r.method in ("POST", "PATCH")]
    held_answer = next(r for r in github.requests() if r.seq == held).answered_at
    assert held_answer is not None
    assert all(r.received_at >= held_answer for r in changes)
