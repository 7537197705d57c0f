"""The GitHub effects of one run, on a thread of their own: the runner never waits for GitHub.

The runner only says that something changed (:meth:`Publisher.progress`) or that the run ended
(:meth:`Publisher.ended`); neither blocks. The publisher's thread renders the state the store
holds *now* and publishes it (``tasks.github.publication``): at every apply task boundary, and at
most once a ``comment_interval`` within a task. Edits coalesce, and every edit carries the full
state, so a late one catches up. While GitHub fails, attempts back off (up to ``MAX_BACKOFF``,
or longer if GitHub asked with ``Retry-After``) and the apply goes on untouched.

When the run stops or ends, the rotation that made it so also made the new state *owed* to the
pull request (``storage.publications``), in the same transaction. The thread then claims that
publication and makes it under the apply's new lease, retrying for ``FINAL_ATTEMPTS``; whatever
is still owed after that (GitHub down, the worker killed) is settled by a later reclaim pass
(``tasks.github.owed``). A handed-back run publishes nothing: its next holder does.

Lock-delay: a holder whose lease came from a reclaim makes no call before ``effect_grace`` has
passed, so that a call of the previous holder that timed out on its side but still reached
GitHub lands before ours. The effect window (``storage.published``) keeps the calls of two
epochs from overlapping on our side.

Once the lease is lost, or presumed lost (no heartbeat for ``stale_after``), no call is made.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from leases import Lease
from leases.effects import claim_publication
from storage import publications
from storage.database import Database
from storage.errors import EffectWindowBusy, LeaseLost, StorageError
from storage.states import ApplyState
from tasks.backoff import Backoff
from tasks.effects import EffectRefused, EffectRetryable
from tasks.github.client import GitHubClient
from tasks.github.publication import WINDOW_MARGIN, Publication
from tasks.interrupts import Interrupts

log = logging.getLogger(__name__)

# While GitHub fails: the wait before the next attempt (GitHub may ask for longer, up to
# MAX_BACKOFF); the last one repeats for as long as the outage lasts.
MAX_BACKOFF: Final = 60.0
BACKOFF: Final = Backoff((1.0, 2.0, 4.0, 8.0, 15.0, 30.0, MAX_BACKOFF), max_hint=MAX_BACKOFF)
FINAL_ATTEMPTS: Final = 4  # by the holder, before a reclaim pass takes over
POLL: Final = 0.25  # how often a waiting thread looks at the lease and the clock


class _Job(Enum):
    RUNNING = auto()
    FINAL = auto()
    STOP = auto()


class Publisher:
    """The ``tasks.effects.Effects`` of a run whose apply has a pull request."""

    def __init__(
        self,
        db: Database,
        lease: Lease,
        client: GitHubClient,
        interrupts: Interrupts,
        *,
        repository: str,
        pull_request: int,
        head_sha: str,
        comment_interval: float,
        effect_timeout: float,
        effect_grace: float,
        reclaimed: bool = False,
        backoff: Backoff = BACKOFF,
        final_attempts: int = FINAL_ATTEMPTS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.lease = lease
        self.client = client
        self.interrupts = interrupts
        self.repository = repository
        self.pull_request = pull_request
        self.head_sha = head_sha
        self.comment_interval = comment_interval
        # A call's window: as long as the lock-delay allows a call that timed out on our side
        # (after effect_timeout) to land at GitHub, plus the margin for opening it.
        self.window = max(effect_grace, effect_timeout) + WINDOW_MARGIN
        self.backoff = backoff
        self.final_attempts = final_attempts
        self._monotonic = monotonic
        self._grace_until = monotonic() + (effect_grace if reclaimed else 0.0)
        self._cond = threading.Condition()
        self._dirty = False
        self._urgent = False
        self._ended: ApplyState | None = None
        self._closing = False
        self._last_edit = -math.inf
        self._not_before = -math.inf
        # Set once a publication found the lease moved on: no running publication is tried again
        # (it would only be refused), but an end the runner still reports is published.
        self.stale = False
        self.failures = 0
        self.calls = 0
        self.published = 0
        self._thread = threading.Thread(
            target=self._run, name=f"publisher-{lease.apply_id}", daemon=True
        )

    # --- the runner's hooks (never block) --------------------------------------------------------

    def start(self) -> None:
        if self._thread.ident is None:  # idempotent: a test may start it before the runner does
            self._thread.start()
        self.progress(boundary=True)

    def progress(self, *, boundary: bool) -> None:
        with self._cond:
            self._dirty = True
            self._urgent = self._urgent or boundary
            self._cond.notify()

    def ended(self, state: ApplyState) -> None:
        with self._cond:
            self._ended = state
            self._cond.notify()

    def close(self) -> None:
        """The run is over: the thread finishes what it owes (a final publication) and exits
        on its own; nothing waits for it."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def join(self, timeout: float | None = None) -> bool:
        """For tests and shutdown: wait for the thread; True if it has exited."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (job := self._next()) is _Job.RUNNING:
                self._publish_running()
            if job is _Job.FINAL:
                self._publish_final()
        except Exception:
            log.exception("apply %s: the publisher failed", self.lease.apply_id)
        finally:
            self.client.close()

    def _next(self) -> _Job:
        with self._cond:
            while (job := self._decide(self._monotonic())) is None:
                self._cond.wait(POLL)
            if job is _Job.RUNNING:
                self._dirty = self._urgent = False
            return job

    def _decide(self, now: float) -> _Job | None:
        """The thread's next job at ``now``, or None to wait (called with the condition held)."""
        if self._ended is not None:
            if not (self._ended.terminal or self._ended == ApplyState.STOPPED):
                return _Job.STOP  # handed back: the next holder publishes
            # the lock-delay, and GitHub's Retry-After, bind the final publication too
            return _Job.FINAL if now >= max(self._grace_until, self._not_before) else None
        if self.interrupts.lost is not None or self._closing:
            return _Job.STOP
        if self._dirty and not self.stale and self._due() <= now:
            return _Job.RUNNING
        return None

    def _due(self) -> float:
        if not self._dirty:
            return math.inf
        spacing = 0.0 if self._urgent else self.comment_interval
        return max(self._last_edit + spacing, self._not_before, self._grace_until)

    def _publication(self, lease: Lease, *, may_call: Callable[[], None]) -> Publication:
        return Publication(
            self.db,
            lease,
            self.client,
            repository=self.repository,
            pull_request=self.pull_request,
            head_sha=self.head_sha,
            window=self.window,
            may_call=may_call,
        )

    def _publish_running(self) -> None:
        publication = self._publication(self.lease, may_call=self.interrupts.raise_if_lost)
        self._last_edit = self._monotonic()
        try:
            publication.running()
        except LeaseLost:
            # Rotated: by the runner's own end (which it reports next), or by a stop, cancel or
            # reclaim the runner learns of from its heartbeat. No running call is made any more.
            self.stale = True
        except EffectWindowBusy as exc:
            self._retry_after(exc.remaining, reason=None)
        except (EffectRetryable, EffectRefused, StorageError) as exc:
            hint = exc.retry_after if isinstance(exc, EffectRetryable) else None
            self._retry_after(self.backoff.delay(self.failures, hint=hint), reason=str(exc))
            self.failures += 1
        else:
            self.failures = 0
            self.published += 1
        finally:
            self.calls += publication.calls

    def _retry_after(self, delay: float, *, reason: str | None) -> None:
        with self._cond:
            # Still owed: the next attempt comes after the backoff, not a comment_interval later.
            self._dirty = self._urgent = True
            self._not_before = self._monotonic() + delay
        if reason is not None:
            log.warning(
                "apply %s: GitHub not updated (%s); the apply goes on, next attempt in %gs",
                self.lease.apply_id,
                reason,
                delay,
            )

    def _publish_final(self) -> None:
        """Claim and make the owed publication, a few times; then leave it to the reclaim pass."""
        for attempt in range(self.final_attempts):
            try:
                owed = claim_publication(self.db, self.lease.apply_id)
            except StorageError as exc:
                log.warning("apply %s: cannot claim its publication: %s", self.lease.apply_id, exc)
                self._sleep(self.backoff.delay(attempt))
                continue
            if owed is None:
                return  # nothing owed (no pull request), or another publisher has it
            publication = self._publication(owed.lease, may_call=_free)
            settled = settle(self.db, publication, attempts=owed.attempts, backoff=self.backoff)
            self.calls += publication.calls
            self.published += settled.published
            if settled.retry_in is None:
                return
            if attempt + 1 < self.final_attempts:
                self._sleep(settled.retry_in)  # the release made it due again just this late
        log.warning(
            "apply %s: its %s state is not on GitHub yet; the reclaim pass will publish it",
            self.lease.apply_id,
            self._ended,
        )

    @staticmethod
    def _sleep(seconds: float) -> None:
        # Real time, not the injected clock: a test's frozen clock must not make this spin.
        time.sleep(max(0.0, seconds))


def _free() -> None:
    """A final publication is made under the lease the stop or end minted: the run's own
    interrupts (its lease lost, by that very rotation) do not stop it."""


@dataclass(frozen=True, slots=True)
class Settled:
    """How one attempt at an owed publication went."""

    published: bool  # GitHub shows the owed state now
    retry_in: float | None = None  # not settled: the next attempt may start this much later


def settle(
    db: Database, publication: Publication, *, attempts: int, backoff: Backoff = BACKOFF
) -> Settled:
    """One attempt (the ``attempts``-th) at a claimed publication. Unless it is settled, or
    nothing more is to be done, the claim is released with the delay before the next attempt,
    for whoever tries next."""
    apply_id = publication.lease.apply_id
    try:
        publication.final()
        return Settled(published=True)
    except LeaseLost:
        # Resumed or retried since: its new holder publishes. Free the claim for a later end.
        _release(db, apply_id, 0.0, "the apply moved on before its publication")
        return Settled(published=False)
    except EffectRefused as exc:
        log.error("apply %s: GitHub refused its publication: %s", apply_id, exc)
        publications.abandon(db, apply_id, error=str(exc)[:1000])
        return Settled(published=False)
    except EffectWindowBusy as exc:
        _release(db, apply_id, exc.remaining, None)
        return Settled(published=False, retry_in=exc.remaining)
    except (EffectRetryable, StorageError) as exc:
        hint = exc.retry_after if isinstance(exc, EffectRetryable) else None
        delay = backoff.delay(max(0, attempts - 1), hint=hint)
        _release(db, apply_id, delay, str(exc)[:1000])
        log.warning("apply %s: publication failed, next attempt in %gs: %s", apply_id, delay, exc)
        return Settled(published=False, retry_in=delay)


def _release(db: Database, apply_id: int, delay: float, error: str | None) -> None:
    try:
        publications.release(db, apply_id, delay=delay, error=error)
    except StorageError as exc:
        # The claim expires on its own (storage.publications.CLAIM_EXPIRY).
        log.warning("apply %s: cannot release its publication claim: %s", apply_id, exc)
