"""The GitHub effects of one held lease: a progress comment and a check run, each call made
inside the fence, so that no rotation can commit while it is in flight.

Each attempt is ``with fence(...)``: prove the lease and lock the apply row, render the full
state from that same transaction, make one HTTP call (hard timeout ``effect_timeout``, well under
``stale_after``), record the result (comment id, edit count, epoch, body digest; check status),
commit. A retry is a new attempt in a new fence, so a lease lost between attempts stops the
retries at once (``LeaseLost``). Creation is idempotent: an existing comment carrying the apply's
marker, or a check run with its ``external_id``, is adopted instead of creating a second one,
which heals a crash between GitHub's answer and our commit.

Lock-delay: a holder whose lease came from a reclaim waits ``effect_grace`` (longer than the
effect timeout) before its first call, so that a call of the previous holder that timed out on
its side but still reaches GitHub lands before ours and is overwritten by our next edit.

This is the boundary of the GitHub client: its errors leave here as ``EffectRetryable`` (with
GitHub's ``Retry-After`` or rate-limit reset as ``retry_after``) or ``EffectRefused``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Final, TypeVar

from leases import Lease, fence
from storage import fenced
from storage.database import Database
from storage.errors import LeaseholdError, StorageBusy, StorageUnavailable
from storage.fenced import Fenced
from storage.states import ApplyState
from tasks.backoff import Backoff
from tasks.effects import EffectRefused, EffectRetryable
from tasks.github import render
from tasks.github.client import GitHubClient, GitHubRejected, GitHubRetryable
from tasks.interrupts import Interrupts

log = logging.getLogger(__name__)
T = TypeVar("T")
# GitHub may ask for longer (Retry-After, a rate-limit reset); max_hint bounds what we grant it.
BACKOFF: Final = Backoff((0.5, 1.0, 2.0, 4.0, 8.0), max_hint=30.0)


@contextmanager
def _in_leasehold_terms() -> Iterator[None]:
    try:
        yield
    except GitHubRejected as exc:
        raise EffectRefused(str(exc)) from exc
    except GitHubRetryable as exc:
        raise EffectRetryable(str(exc), retry_after=exc.retry_after) from exc


class Publisher:
    """The ``tasks.effects.Effects`` of an apply on a pull request."""

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
        grace: float = 0.0,
        max_attempts: int = 5,
        max_retry_after: float = BACKOFF.max_hint,
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
        self.max_attempts = max_attempts
        self.backoff = replace(BACKOFF, max_hint=max_retry_after)
        self._monotonic = monotonic
        self._grace_until = monotonic() + grace
        self._last_edit = float("-inf")
        self._quiet_until = float("-inf")
        self.calls = 0

    # --- the runner's hooks ----------------------------------------------------------------------

    def start(self) -> None:
        """Create or adopt the comment and the check run, then show the running state."""
        self._effect(lambda fx: self._check_in(fx, ApplyState.RUNNING))
        self._effect(lambda fx: self._comment_in(fx, ApplyState.RUNNING))
        self._last_edit = self._monotonic()

    def progress(self, *, boundary: bool) -> None:
        """Edit the comment: at every apply task boundary, otherwise at most once an interval."""
        now = self._monotonic()
        if now < self._quiet_until:
            return  # GitHub failed us just now: don't stall the apply on every boundary
        if not boundary and now - self._last_edit < self.comment_interval:
            return
        self._last_edit = now
        self._effect(lambda fx: self._comment_in(fx, ApplyState.RUNNING))

    def publish_in(self, fx: Fenced, state: ApplyState, *, error: str | None = None) -> None:
        """One attempt, inside the caller's fence, at publishing ``state`` (stopped or terminal),
        so that the publication and the state change commit together.

        An earlier attempt's calls may have reached GitHub although its transaction rolled back
        (an answer lost or too late): what GitHub already shows is not sent again, so that the
        final body is edited in once and the check run concluded once."""
        with _in_leasehold_terms():
            self._comment_in(fx, state, error=error, unless_shown=True)
            if state.terminal:
                self._check_in(fx, state)

    def retrying(self, attempt: Callable[[], T]) -> T:
        """Make ``attempt`` (one fenced transaction calling GitHub) until it succeeds, is refused,
        or attempts run out; each attempt after the lock-delay, each retry after a pause."""
        failure: LeaseholdError | None = None
        for n in range(self.max_attempts):
            self._await_grace()
            try:
                return attempt()
            except EffectRefused as exc:
                log.error("apply %s: GitHub refused an effect: %s", self.lease.apply_id, exc)
                raise
            except EffectRetryable as exc:
                log.warning(
                    "apply %s: GitHub effect failed, will retry: %s", self.lease.apply_id, exc
                )
                failure = exc
            except (StorageUnavailable, StorageBusy) as exc:
                log.warning("apply %s: effect not fenced, will retry: %s", self.lease.apply_id, exc)
                failure = exc
            self.pause(n, failure)
        raise EffectRetryable(
            f"GitHub effect given up after {self.max_attempts} attempts: {failure}"
        ) from failure

    def close(self) -> None:
        self.client.close()

    # --- attempts --------------------------------------------------------------------------------

    def pause(self, attempt: int, error: LeaseholdError) -> None:
        """The backoff after failed ``attempt``; ends early only if the lease is lost."""
        hint = error.retry_after if isinstance(error, EffectRetryable) else None
        self._sleep_until(self._monotonic() + self.backoff.delay(attempt, hint=hint))

    def _await_grace(self) -> None:
        """The lock-delay after a reclaim; ends early only if the lease is lost."""
        self._sleep_until(self._grace_until)
        self.interrupts.raise_if_lost()

    def _sleep_until(self, deadline: float) -> None:
        while (remaining := deadline - self._monotonic()) > 0:
            self.interrupts.raise_if_lost()
            time.sleep(min(0.1, remaining))

    def _effect(self, body: Callable[[Fenced], None]) -> bool:
        """Make ``body`` in a fence of its own, retrying. An effect that cannot be made is logged
        and skipped: the apply itself goes on, and the next edit renders the full state anyway."""

        def attempt() -> None:
            with fence(self.db, self.lease) as fx, _in_leasehold_terms():
                body(fx)

        try:
            self.retrying(attempt)
        except EffectRefused:
            return False
        except EffectRetryable as exc:
            log.error(
                "apply %s: %s; progress edits pause for %gs",
                self.lease.apply_id,
                exc,
                self.comment_interval,
            )
            self._quiet_until = self._monotonic() + self.comment_interval
            return False
        return True

    def _comment_in(
        self,
        fx: Fenced,
        state: ApplyState,
        *,
        error: str | None = None,
        unless_shown: bool = False,
    ) -> None:
        apply, tasks = fenced.read_state(fx)
        body = render.render_comment(apply, tasks, epoch=fx.epoch, state=state, error=error)
        digest = render.digest(body)
        record = fenced.comment_record(fx, render.COMMENT_KIND)
        if record is not None and record["body_sha256"] == digest:
            return  # GitHub already shows exactly this
        comment_id = None if record is None else record["github_comment_id"]
        if comment_id is None:
            comment_id = self.client.find_comment(
                self.repository, self.pull_request, render.marker_prefix(fx.apply_id)
            )
            self.calls += 1
        if comment_id is None:
            comment_id = self.client.create_comment(self.repository, self.pull_request, body)
            self.calls += 1
        elif not (unless_shown and self._shows(int(comment_id), body)):
            self.client.edit_comment(self.repository, int(comment_id), body)
            self.calls += 1
        fenced.record_comment(
            fx, kind=render.COMMENT_KIND, github_comment_id=int(comment_id), body_sha256=digest
        )

    def _check_in(self, fx: Fenced, state: ApplyState) -> None:
        record = fenced.check_record(fx)
        if record is not None and record["status"] == "completed":
            return  # concluded once, never again
        _, tasks = fenced.read_state(fx)
        summary = render.render_summary(tasks, state=state)
        run_id = None if record is None else record["github_check_run_id"]
        if run_id is None:
            run_id = self.client.find_check_run(
                self.repository, self.head_sha, render.CHECK_NAME, render.external_id(fx.apply_id)
            )
            self.calls += 1
            if run_id is None:
                run_id = self.client.create_check_run(
                    self.repository,
                    self.head_sha,
                    name=render.CHECK_NAME,
                    external_id=render.external_id(fx.apply_id),
                    summary=summary,
                )
                self.calls += 1
        conclusion = render.CONCLUSIONS.get(state)
        if conclusion is not None and self._run_state(int(run_id)) != ("completed", conclusion):
            self.client.update_check_run(
                self.repository,
                int(run_id),
                name=render.CHECK_NAME,
                summary=summary,
                conclusion=conclusion,
            )
            self.calls += 1
        fenced.record_check(
            fx,
            check_run_id=int(run_id),
            status="completed" if conclusion else "in_progress",
            conclusion=conclusion,
        )

    def _shows(self, comment_id: int, body: str) -> bool:
        self.calls += 1
        return self.client.comment_body(self.repository, comment_id) == body

    def _run_state(self, run_id: int) -> tuple[str, str | None]:
        self.calls += 1
        return self.client.check_run_state(self.repository, run_id)
