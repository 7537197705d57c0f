"""Effects in leasehold's terms, without a store: the publisher's boundary turns GitHub's failures
into ``EffectRetryable`` (with the wait GitHub asked for) or ``EffectRefused``, and its one retry
loop (also the runner's, for the stop and terminal publications) waits by the effects' backoff,
honours that wait up to a cap, stops at a refusal, gives up after its attempts, and stops at once
when the lease is lost. ``NoEffects`` makes one attempt."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from leases import Lease, mint_token
from storage.database import Database
from storage.errors import LeaseholdError, LeaseLost, StorageUnavailable
from tasks.effects import EffectError, EffectRefused, EffectRetryable, NoEffects
from tasks.github import publisher as publisher_module
from tasks.github.client import GitHubClient, GitHubConfig, GitHubRejected, GitHubRetryable
from tasks.github.publisher import Publisher
from tasks.interrupts import Interrupts
from tasks.testing.standin import GitHubStandIn

LEASE = Lease(1, 1, mint_token())


class Clock:
    """The publisher's ``monotonic`` and (patched in) ``time.sleep``: sleeping moves it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.on_sleep: Callable[[], None] = lambda: None

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.on_sleep()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(publisher_module, "time", clock)
    return clock


def publisher(
    clock: Clock, interrupts: Interrupts | None = None, *, grace: float = 0.0, **kwargs: Any
) -> Publisher:
    """A publisher whose retries need neither a store nor GitHub (``retrying`` touches neither)."""
    return Publisher(
        cast(Database, None),
        LEASE,
        cast(GitHubClient, None),
        interrupts or Interrupts(),
        repository="acme/shop",
        pull_request=1,
        head_sha="0" * 40,
        comment_interval=60.0,
        grace=grace,
        monotonic=clock.monotonic,
        **kwargs,
    )


class Attempts:
    """An attempt that fails with ``failures`` in turn, then returns "done"; records when."""

    def __init__(self, clock: Clock, *failures: Exception) -> None:
        self.clock = clock
        self.failures = list(failures)
        self.at: list[float] = []

    def __call__(self) -> str:
        self.at.append(self.clock.now)
        if self.failures:
            raise self.failures.pop(0)
        return "done"


# --- the retry loop ------------------------------------------------------------------------------


def test_retryable_failures_are_retried_after_the_effects_backoff(clock: Clock) -> None:
    attempt = Attempts(clock, EffectRetryable("502"), EffectRetryable("timed out"))
    assert publisher(clock).retrying(attempt) == "done"
    assert attempt.at == [0.0, 0.5, 1.5]


def test_storage_trouble_of_an_effects_fence_is_retried_too(clock: Clock) -> None:
    attempt = Attempts(clock, StorageUnavailable("gone"))
    assert publisher(clock).retrying(attempt) == "done"
    assert attempt.at == [0.0, 0.5]


@pytest.mark.parametrize(
    ("asked", "waited"),
    [(3.0, 3.0), (0.1, 0.5), (3600.0, 30.0)],
    ids=["longer", "shorter-than-the-backoff", "capped"],
)
def test_the_wait_the_other_side_asked_for_is_honoured_up_to_a_cap(
    clock: Clock, asked: float, waited: float
) -> None:
    attempt = Attempts(clock, EffectRetryable("rate limited", retry_after=asked))
    assert publisher(clock, max_retry_after=30.0).retrying(attempt) == "done"
    assert attempt.at == [0.0, waited]


def test_a_refusal_is_not_retried(clock: Clock) -> None:
    attempt = Attempts(clock, EffectRefused("422"))
    with pytest.raises(EffectRefused, match="422"):
        publisher(clock).retrying(attempt)
    assert attempt.at == [0.0]


def test_it_gives_up_after_its_attempts_saying_why(clock: Clock) -> None:
    last = EffectRetryable("503 again")
    attempt = Attempts(clock, EffectRetryable("503"), EffectRetryable("503"), last)
    with pytest.raises(EffectRetryable, match="given up after 3 attempts: 503 again") as caught:
        publisher(clock, max_attempts=3).retrying(attempt)
    assert caught.value.__cause__ is last
    assert len(attempt.at) == 3


def test_a_lease_lost_during_a_pause_stops_the_retries_at_once(clock: Clock) -> None:
    interrupts = Interrupts()
    lost = LeaseLost(LEASE.apply_id, LEASE.epoch, reason="rotated by a reclaim")
    clock.on_sleep = lambda: interrupts.lease_lost(lost)
    attempt = Attempts(clock, EffectRetryable("rate limited", retry_after=25.0))
    with pytest.raises(LeaseLost) as caught:
        publisher(clock, interrupts).retrying(attempt)
    assert caught.value is lost
    assert attempt.at == [0.0]
    assert clock.now < 1.0  # far less than the 25 s asked for


def test_every_attempt_waits_for_the_lock_delay(clock: Clock) -> None:
    attempt = Attempts(clock)
    assert publisher(clock, grace=5.0).retrying(attempt) == "done"
    assert attempt.at == [pytest.approx(5.0)]


def test_no_effects_make_one_attempt_and_let_its_errors_through() -> None:
    assert NoEffects().retrying(lambda: 42) == 42
    with pytest.raises(EffectRefused):
        NoEffects().retrying(Attempts(Clock(), EffectRefused("no")))


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


def test_a_rate_limit_leaves_the_publisher_retryable_with_the_wait_asked_for(
    github: tuple[GitHubStandIn, GitHubClient],
) -> None:
    standin, gh = github
    standin.rate_limit_next(1, kind="secondary", retry_after=7)
    with pytest.raises(EffectRetryable) as caught, publisher_module._in_leasehold_terms():
        gh.create_comment("acme/shop", 1, "x")
    assert caught.value.retry_after == 7
    assert isinstance(caught.value.__cause__, GitHubRetryable)


def test_a_5xx_leaves_the_publisher_retryable(github: tuple[GitHubStandIn, GitHubClient]) -> None:
    standin, gh = github
    standin.fail_next(1, status=503)
    with pytest.raises(EffectRetryable, match="503"), publisher_module._in_leasehold_terms():
        gh.create_comment("acme/shop", 1, "x")


def test_a_4xx_leaves_the_publisher_refused(github: tuple[GitHubStandIn, GitHubClient]) -> None:
    _, gh = github
    with pytest.raises(EffectRefused) as caught, publisher_module._in_leasehold_terms():
        gh.edit_comment("acme/shop", 999_999, "no such comment")
    assert isinstance(caught.value.__cause__, GitHubRejected)
