"""The one backoff policy: a delay per failed attempt, the last repeated, a server's hint that
may lengthen a wait up to a cap; and the delays each user of it keeps."""

from __future__ import annotations

import math

import pytest

from storage.errors import ConfigurationError
from tasks import runner
from tasks.backoff import Backoff
from tasks.github import publisher


def test_each_attempt_waits_its_delay_and_the_last_one_repeats() -> None:
    backoff = Backoff((0.5, 1.0, 2.0))
    assert [backoff.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_a_hint_lengthens_a_wait_never_shortens_it_and_is_capped() -> None:
    backoff = Backoff((0.5, 1.0, 8.0), max_hint=30.0)
    assert backoff.delay(0, hint=3.0) == 3.0
    assert backoff.delay(2, hint=3.0) == 8.0
    assert backoff.delay(0, hint=0.0) == 0.5
    assert backoff.delay(0, hint=3600.0) == 30.0
    assert Backoff((1.0,)).delay(0, hint=3600.0) == 3600.0  # uncapped unless told


def test_it_is_a_frozen_value() -> None:
    backoff = Backoff((1.0,))
    assert backoff == Backoff((1.0,))
    assert backoff.max_hint == math.inf
    with pytest.raises(AttributeError):
        backoff.delays = (2.0,)  # type: ignore[misc]


@pytest.mark.parametrize("delays", [(), (1.0, -0.1)], ids=["none", "negative"])
def test_delays_must_exist_and_be_non_negative(delays: tuple[float, ...]) -> None:
    with pytest.raises(ConfigurationError, match="backoff delays"):
        Backoff(delays)


def test_the_runner_and_the_publisher_keep_their_own_delays() -> None:
    """Owned writes wait on a database blip (short); GitHub effects, on their own thread, on a
    remote service that may be down for an hour: up to a minute between attempts, Retry-After
    honoured up to a minute."""
    storage_writes, effects = runner.RETRY_BACKOFF, publisher.BACKOFF
    assert (storage_writes.delays, storage_writes.max_hint) == (
        (0.05, 0.1, 0.2, 0.5, 1.0),
        math.inf,
    )
    assert (effects.delays, effects.max_hint) == ((1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0), 60.0)
