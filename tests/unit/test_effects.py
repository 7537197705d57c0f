"""Effects in leasehold's terms, without a store: the publication's boundary turns GitHub's
failures into ``EffectRetryable`` (with the wait GitHub asked for) or ``EffectRefused``; the
publisher's schedule (``Publisher._decide``, a pure function of its state and the clock) shows
boundaries at once, progress at most once a ``comment_interval``, honours backoffs and the
lock-delay, never publishes once stale or stopped, and publishes a stop or an end but not a
hand-back. ``NoEffects`` does nothing at all."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterator
from typing import cast

import pytest

from leases import Lease, mint_token
from storage.database import Database
from storage.errors import LeaseholdError, LeaseLost
from storage.states import ApplyState
from tasks.effects import EffectError, EffectRefused, EffectRetryable, NoEffects
from tasks.github.client import GitHubClient, GitHubConfig, GitHubRejected, GitHubRetryable
from tasks.github.publication import in_leasehold_terms
from tasks.github.publisher import Publisher, _Job
from tasks.interrupts import Interrupts
from tasks.testing.standin import GitHubStandIn

LEASE = Lease(1, 1, mint_token())
INTERVAL = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def publisher(
    clock: Clock,
    interrupts: Interrupts | None = None,
    *,
    grace: float = 0.0,
    reclaimed: bool = False,
) -> Publisher:
    """A publisher whose thread is never started: only its schedule is exercised."""
    return Publisher(
        cast(Database, None),
        LEASE,
        cast(GitHubClient, None),
        interrupts or Interrupts(),
        repository="acme/shop",
        pull_request=1,
        head_sha="0" * 40,
        comment_interval=INTERVAL,
        effect_timeout=5.0,
        effect_grace=grace,
        reclaimed=reclaimed,
        monotonic=clock,
    )


def decide(pub: Publisher, now: float) -> _Job | None:
    with pub._cond:
        return pub._decide(now)


def test_nothing_to_do_until_something_changed() -> None:
    clock = Clock()
    pub = publisher(clock)
    assert decide(pub, clock.now) is None
    assert decide(pub, math.inf) is None


def test_a_boundary_is_due_at_once_progress_once_an_interval() -> None:
    clock = Clock()
    pub = publisher(clock)
    pub._last_edit = clock.now
    pub.progress(boundary=False)
    assert decide(pub, clock.now) is None
    assert decide(pub, clock.now + INTERVAL - 0.01) is None
    assert decide(pub, clock.now + INTERVAL) is _Job.RUNNING
    pub.progress(boundary=True)
    assert decide(pub, clock.now) is _Job.RUNNING


def test_a_failed_attempt_is_retried_after_its_backoff_not_an_interval() -> None:
    clock = Clock()
    pub = publisher(clock)
    pub._retry_after(2.0, reason=None)
    assert decide(pub, clock.now + 1.99) is None
    assert decide(pub, clock.now + 2.0) is _Job.RUNNING  # urgent: no interval on top


def test_the_lock_delay_holds_every_call_of_a_reclaimed_lease() -> None:
    clock = Clock()
    pub = publisher(clock, grace=3.0, reclaimed=True)
    pub.progress(boundary=True)
    assert decide(pub, clock.now + 2.9) is None
    assert decide(pub, clock.now + 3.0) is _Job.RUNNING
    pub.ended(ApplyState.COMPLETED)
    assert decide(pub, clock.now + 2.9) is None
    assert decide(pub, clock.now + 3.0) is _Job.FINAL
    fresh = publisher(clock, grace=3.0)  # not from a reclaim: no delay
    fresh.progress(boundary=True)
    assert decide(fresh, clock.now) is _Job.RUNNING


def test_github_s_retry_after_binds_the_final_publication() -> None:
    clock = Clock()
    pub = publisher(clock)
    pub._retry_after(30.0, reason=None)
    pub.ended(ApplyState.FAILED)
    assert decide(pub, clock.now + 29.0) is None
    assert decide(pub, clock.now + 30.0) is _Job.FINAL


@pytest.mark.parametrize(
    ("state", "job"),
    [
        (ApplyState.COMPLETED, _Job.FINAL),
        (ApplyState.FAILED, _Job.FINAL),
        (ApplyState.CANCELLED, _Job.FINAL),
        (ApplyState.STOPPED, _Job.FINAL),
        (ApplyState.DISPATCHED, _Job.STOP),  # handed back: the next holder publishes
    ],
)
def test_a_stop_or_an_end_is_published_a_hand_back_is_not(state: ApplyState, job: _Job) -> None:
    clock = Clock()
    pub = publisher(clock)
    pub.progress(boundary=True)
    pub.ended(state)
    assert decide(pub, clock.now) is job


def test_a_stale_publisher_makes_no_running_call_but_still_publishes_an_end() -> None:
    clock = Clock()
    pub = publisher(clock)
    pub.stale = True
    pub.progress(boundary=True)
    assert decide(pub, math.inf) is None
    pub.ended(ApplyState.COMPLETED)  # the runner's own end rotated the lease under it
    assert decide(pub, clock.now) is _Job.FINAL


def test_a_lost_lease_or_a_close_stops_the_thread() -> None:
    clock = Clock()
    interrupts = Interrupts()
    pub = publisher(clock, interrupts)
    pub.progress(boundary=True)
    interrupts.lease_lost(LeaseLost(LEASE.apply_id, LEASE.epoch, current_epoch=LEASE.epoch + 1))
    assert decide(pub, clock.now) is _Job.STOP
    closed = publisher(clock)
    closed.progress(boundary=True)
    closed.close()
    assert decide(closed, clock.now) is _Job.STOP


def test_no_effects_do_nothing() -> None:
    effects = NoEffects()
    effects.start()
    effects.progress(boundary=True)
    effects.ended(ApplyState.COMPLETED)
    effects.close()


def test_effect_errors_are_leasehold_errors() -> None:
    assert issubclass(EffectError, LeaseholdError)
    assert issubclass(EffectRetryable, EffectError)
    assert issubclass(EffectRefused, EffectError)
    assert not issubclass(EffectRetryable, GitHubRetryable)  # the runner needs no GitHub types
    assert EffectRetryable("x").retry_after is None


# --- the boundary: GitHub's answers as leasehold's errors -----------------------------------------


@pytest.fixture
def github() -> Iterator[tuple[GitHubStandIn, GitHubClient]]:
    token = "ghp_" + secrets.token_hex(20)
    with GitHubStandIn([token]) as standin:
        gh = GitHubClient(GitHubConfig(api_url=standin.url, token=token, timeout=5)).open()
        try:
            yield standin, gh
        finally:
            gh.close()


def test_a_rate_limit_is_retryable_with_the_wait_asked_for(
    github: tuple[GitHubStandIn, GitHubClient],
) -> None:
    standin, gh = github
    standin.rate_limit_next(1, kind="secondary", retry_after=7)
    with pytest.raises(EffectRetryable) as caught, in_leasehold_terms():
        gh.create_comment("acme/shop", 1, "x")
    assert caught.value.retry_after == 7
    assert isinstance(caught.value.__cause__, GitHubRetryable)
    assert caught.value.__cause__.answered  # GitHub answered: the call's window may close


def test_a_5xx_is_retryable(github: tuple[GitHubStandIn, GitHubClient]) -> None:
    standin, gh = github
    standin.fail_next(1, status=503)
    with pytest.raises(EffectRetryable, match="503"), in_leasehold_terms():
        gh.create_comment("acme/shop", 1, "x")


def test_a_4xx_is_refused(github: tuple[GitHubStandIn, GitHubClient]) -> None:
    _, gh = github
    with pytest.raises(EffectRefused) as caught, in_leasehold_terms():
        gh.edit_comment("acme/shop", 999_999, "no such comment")
    assert isinstance(caught.value.__cause__, GitHubRejected)


def test_a_request_past_its_send_deadline_is_never_sent(
    github: tuple[GitHubStandIn, GitHubClient],
) -> None:
    """A worker frozen between opening its effect window and sending must not send once the
    window is over: the transport checks the deadline as the last step before the connection."""
    standin, gh = github
    with (
        pytest.raises(GitHubRetryable, match="not sent") as caught,
        gh.send_before(time.monotonic() - 0.5),
    ):
        gh.create_comment("acme/shop", 1, "stale")
    assert caught.value.answered  # it never left: the window may close at once
    assert standin.requests() == []
    with gh.send_before(time.monotonic() + 30):
        gh.create_comment("acme/shop", 1, "in time")
    assert [r.method for r in standin.requests()] == ["POST"]
