"""One attempt at showing an apply's state on its pull request, under one lease: the progress
comment and the check run, brought up to date with the state the store holds now.

Every call that changes something at GitHub is made inside the lease's effect window
(``leases.effects.open_window``, ``storage.published``): the window is opened first, by the
store's clock, for ``window`` seconds; the call starts only if that took less than
``WINDOW_MARGIN`` by our own clock, and the client's hard timeout (``effect_timeout``) ends it
within the window. No lock is held while a call is in flight. A later epoch's call cannot start
before the window closes: it is closed as soon as GitHub answered; a call left without an answer
(a timeout) keeps it open to its end, since GitHub may still apply it. The answer is recorded in
a fence of its own (the lease proven current again), so a holder that lost its lease meanwhile
records nothing.

Creation is idempotent: an existing comment carrying the apply's marker, or a check run with its
``external_id``, is adopted instead of creating a second one. Every body renders the full
current state, so a late edit is overwritten by the next. This module is the boundary of the
GitHub client: its errors leave as ``EffectRetryable`` (with GitHub's ``Retry-After`` or
rate-limit reset as ``retry_after``) or ``EffectRefused``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final, TypeVar

from leases import Lease
from leases.effects import close_window, effect_fence, open_window
from storage import published
from storage.database import Database
from storage.published import Snapshot
from storage.states import ApplyState
from tasks.effects import EffectRefused, EffectRetryable
from tasks.github import render
from tasks.github.client import GitHubClient, GitHubRejected, GitHubRetryable

T = TypeVar("T")
# Opening the window must take less than this, by our clock, or the call is not made: the window
# is measured from the store's statement, the call's timeout from our side, and a worker paused
# between the two (GC, SIGSTOP) must not start a call the window no longer covers.
WINDOW_MARGIN: Final = 1.0


@contextmanager
def in_leasehold_terms() -> Iterator[None]:
    try:
        yield
    except GitHubRejected as exc:
        raise EffectRefused(str(exc)) from exc
    except GitHubRetryable as exc:
        raise EffectRetryable(str(exc), retry_after=exc.retry_after) from exc


class Publication:
    def __init__(
        self,
        db: Database,
        lease: Lease,
        client: GitHubClient,
        *,
        repository: str,
        pull_request: int,
        head_sha: str,
        window: float,
        may_call: Callable[[], None] = lambda: None,
    ) -> None:
        """``window``: the effect window of one call, at least the client's timeout plus
        ``WINDOW_MARGIN``. ``may_call`` raises (``LeaseLost``) when no call may be made any more
        (the holder presumes its lease lost)."""
        self.db = db
        self.lease = lease
        self.client = client
        self.repository = repository
        self.pull_request = pull_request
        self.head_sha = head_sha
        self.window = window
        self.may_call = may_call
        self.calls = 0

    def running(self) -> None:
        """Show a running apply: the check run exists (in progress), the comment shows now."""
        with in_leasehold_terms():
            snap = self._snapshot()
            if snap.check is None or snap.check["github_check_run_id"] is None:
                self._check(snap)
            self._comment(snap, unless_shown=False)

    def final(self) -> None:
        """Show a stopped or ended apply (what the store holds now) and settle what its pull
        request was owed. Whatever GitHub already shows is not sent again, so that the final
        body is edited in once and the check run concluded once."""
        with in_leasehold_terms():
            snap = self._snapshot()
            self._comment(snap, unless_shown=True)
            if ApplyState(snap.apply["state"]).terminal:
                self._check(snap)
            with effect_fence(self.db, self.lease) as fx:
                published.settle(fx)

    # --- steps -----------------------------------------------------------------------------------

    def _snapshot(self) -> Snapshot:
        return published.snapshot(self.db, self.lease.apply_id, comment_kind=render.COMMENT_KIND)

    def _comment(self, snap: Snapshot, *, unless_shown: bool) -> None:
        state = str(snap.apply["state"])
        body = render.render_comment(snap.apply, snap.tasks, epoch=self.lease.epoch, state=state)
        digest = render.digest(body)
        record = snap.comment
        if record is not None and record["body_sha256"] == digest:
            return  # GitHub already shows exactly this
        comment_id = None if record is None else record["github_comment_id"]
        if comment_id is None:
            comment_id = self._read(
                lambda: self.client.find_comment(
                    self.repository, self.pull_request, render.marker_prefix(self.lease.apply_id)
                )
            )
        if comment_id is None:
            comment_id = self._change(
                lambda: self.client.create_comment(self.repository, self.pull_request, body)
            )
        elif not (unless_shown and self._shows(int(comment_id), body)):
            self._change(lambda: self.client.edit_comment(self.repository, int(comment_id), body))
        with effect_fence(self.db, self.lease) as fx:
            published.record_comment(
                fx, kind=render.COMMENT_KIND, github_comment_id=int(comment_id), body_sha256=digest
            )

    def _check(self, snap: Snapshot) -> None:
        record = snap.check
        if record is not None and record["status"] == "completed":
            return  # concluded once, never again
        state = str(snap.apply["state"])
        summary = render.render_summary(snap.tasks, state=state)
        run_id = None if record is None else record["github_check_run_id"]
        if run_id is None:
            run_id = self._read(
                lambda: self.client.find_check_run(
                    self.repository,
                    self.head_sha,
                    render.CHECK_NAME,
                    render.external_id(self.lease.apply_id),
                )
            )
        if run_id is None:
            run_id = self._change(
                lambda: self.client.create_check_run(
                    self.repository,
                    self.head_sha,
                    name=render.CHECK_NAME,
                    external_id=render.external_id(self.lease.apply_id),
                    summary=summary,
                )
            )
        conclusion = render.CONCLUSIONS.get(state)
        if conclusion is not None and self._run_state(int(run_id)) != ("completed", conclusion):
            self._change(
                lambda: self.client.update_check_run(
                    self.repository,
                    int(run_id),
                    name=render.CHECK_NAME,
                    summary=summary,
                    conclusion=conclusion,
                )
            )
        with effect_fence(self.db, self.lease) as fx:
            published.record_check(
                fx,
                check_run_id=int(run_id),
                status="completed" if conclusion else "in_progress",
                conclusion=conclusion,
            )

    def _shows(self, comment_id: int, body: str) -> bool:
        return self._read(lambda: self.client.comment_body(self.repository, comment_id)) == body

    def _run_state(self, run_id: int) -> tuple[str, str | None]:
        return self._read(lambda: self.client.check_run_state(self.repository, run_id))

    # --- calls -----------------------------------------------------------------------------------

    def _read(self, call: Callable[[], T]) -> T:
        """A call that changes nothing at GitHub: no window needed, but never once the holder
        may no longer act."""
        self.may_call()
        self.calls += 1
        return call()

    def _change(self, call: Callable[[], T]) -> T:
        """A call that changes something at GitHub, inside the lease's effect window, which is
        closed again as soon as GitHub answered (a later epoch need not wait for it to run out);
        a call left without an answer keeps it open to its end, since GitHub may still apply it."""
        started = time.monotonic()
        open_window(self.db, self.lease, self.window)
        if time.monotonic() - started > WINDOW_MARGIN:
            raise EffectRetryable(
                f"opening the effect window took over {WINDOW_MARGIN:g}s; call not made"
            )
        self.may_call()
        self.calls += 1
        try:
            # The margin is checked again as the request is sent (the transport), so that a
            # thread paused between here and the send cannot send once the window ended.
            with self.client.send_before(started + WINDOW_MARGIN):
                result = call()
        except GitHubRetryable as exc:
            if exc.answered:
                close_window(self.db, self.lease)
            raise
        except GitHubRejected:
            close_window(self.db, self.lease)
            raise
        close_window(self.db, self.lease)
        return result
