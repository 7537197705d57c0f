"""Where the runner meets the effects of a run outside the database (a pull request's comment and
check run, ``tasks/github``): one protocol, in leasehold's own terms.

An effect succeeds, fails in a way worth another attempt later (``EffectRetryable``), or is
refused (``EffectRefused``): whoever makes the effect translates its own failures into these at
its boundary, so the runner knows nothing of HTTP, status codes or any client's exceptions.
"""

from __future__ import annotations

from typing import Protocol

from storage.errors import LeaseholdError
from storage.states import ApplyState


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
    """What the runner asks of a run's effects (a no-op when there are none). None of these
    waits for the other side: the runner never waits for GitHub."""

    def start(self) -> None:
        """Begin showing the run."""

    def progress(self, *, boundary: bool) -> None:
        """Something changed (at an apply task boundary, or within one): show it when due."""

    def ended(self, state: ApplyState) -> None:
        """The run ended in ``state`` (committed): publish what the pull request is owed."""

    def close(self) -> None:
        """The run is over; finish what is owed in the background."""


class NoEffects:
    def start(self) -> None:
        pass

    def progress(self, *, boundary: bool) -> None:
        pass

    def ended(self, state: ApplyState) -> None:
        pass

    def close(self) -> None:
        pass
