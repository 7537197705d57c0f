"""Where the runner meets the effects of a run outside the database (a pull request's comment and
check run, ``tasks/github``): one protocol, in leasehold's own terms.

An effect succeeds, fails in a way worth another attempt later (``EffectRetryable``), or is
refused (``EffectRefused``): whoever makes the effect translates its own failures into these at
its boundary, so the runner knows nothing of HTTP, status codes or any client's exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from storage.errors import LeaseholdError
from storage.fenced import Fenced
from storage.states import ApplyState

T = TypeVar("T")


class EffectError(LeaseholdError):
    """An effect could not be made."""


class EffectRetryable(EffectError):
    """Worth another attempt later (the other side was down, slow or rate limiting us);
    ``retry_after``: the seconds it asked us to wait, if it said."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EffectRefused(EffectError):
    """The other side refused it: another attempt would be refused too."""


class Effects(Protocol):
    """What the runner asks of a run's effects (a no-op when there are none)."""

    def start(self) -> None:
        """Show the run as started; an effect that cannot be made is skipped."""

    def progress(self, *, boundary: bool) -> None:
        """Show progress (at an apply task boundary, or within one); may be skipped."""

    def publish_in(self, fx: Fenced, state: ApplyState, *, error: str | None = None) -> None:
        """Publish ``state`` (stopped or terminal) inside the caller's fenced transaction, so that
        the publication and the state change commit together. One attempt: raises
        ``EffectRetryable`` or ``EffectRefused``."""

    def retrying(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` (a fenced transaction that calls ``publish_in``) as the effects retry
        their own: after any lock-delay, again after a retryable failure while attempts remain.
        Raises ``EffectRefused`` at once, ``EffectRetryable`` once attempts run out, and
        ``LeaseLost`` as soon as the lease is lost."""

    def close(self) -> None: ...


class NoEffects:
    def start(self) -> None:
        pass

    def progress(self, *, boundary: bool) -> None:
        pass

    def publish_in(self, fx: Fenced, state: ApplyState, *, error: str | None = None) -> None:
        pass

    def retrying(self, attempt: Callable[[], T]) -> T:
        return attempt()

    def close(self) -> None:
        pass
