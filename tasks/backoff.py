"""How long to wait between attempts: one policy for every retry loop of a run (the runner's owned
writes, the publisher's effects), each with its own delays."""

from __future__ import annotations

import math
from dataclasses import dataclass

from storage.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class Backoff:
    """``delays[n]`` is the wait after failed attempt ``n`` (0-based); the last one repeats.

    ``max_hint`` caps a wait the other side asked for (a ``Retry-After``): a hint may lengthen a
    wait, never shorten it, and never beyond ``max_hint``, so that a far-off rate-limit reset does
    not park the apply."""

    delays: tuple[float, ...]
    max_hint: float = math.inf

    def __post_init__(self) -> None:
        if not self.delays or any(d < 0 for d in self.delays):
            raise ConfigurationError(
                f"backoff delays must be at least one, none negative: {self.delays}"
            )

    def delay(self, attempt: int, *, hint: float | None = None) -> float:
        wait = self.delays[min(max(attempt, 0), len(self.delays) - 1)]
        if hint is None:
            return wait
        return min(max(wait, hint), self.max_hint)
