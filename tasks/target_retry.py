"""One apply task on its target: fenced on the target side, retried through target outages.

Each attempt, in order:

1. **The target-side fence** (invariant 9): wait until no other statement of this apply runs
   on the target (a frozen or partitioned predecessor's, or this holder's own from before a
   lost connection; found by their tags), reporting their progress. On stop or cancel they are
   killed (see ``tasks/engines/mysql.py`` for why wait, and why kill then).
2. ``already_applied``: a change already in place (made by the statement just waited for,
   perhaps) is not run again.
3. Confirm the lease with a fence round-trip, then run the DDL.

A ``TargetUnavailable`` anywhere in an attempt (refused, lost connection, server gone) starts
the next attempt after a backoff, for ``window`` seconds from the first failure; the waits are
``interrupts.event`` waits, so a stop, cancel, handover or lost lease is honoured at once. The
apply log says when the target went away and when it came back. Once the window is spent the
task fails with a message for people: ``target 'orders' unreachable for 300 s: ...``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from tasks.backoff import Backoff
from tasks.engines import (
    Engine,
    EngineCancelled,
    EngineContext,
    EngineError,
    TargetStatement,
    TargetUnavailable,
    TaskSpec,
)
from tasks.interrupts import Interrupts, Reason

# A failover takes seconds to a minute: try soon, then every few seconds, never so rarely that
# a target back for a while goes unused.
TARGET_BACKOFF: Final = Backoff((0.25, 0.5, 1.0, 2.0, 5.0))
# How often a waiting holder looks at the target's process list again.
EARLIER_POLL: Final = 0.5
# Stop and cancel kill what they waited for; handover and a lost lease leave it to the next
# holder, which waits for it in turn.
_KILLING: Final = {Reason.STOP: "stopped", Reason.CANCEL: "cancelled"}


def run_task(
    engine: Engine,
    task: TaskSpec,
    ctx: EngineContext,
    *,
    window: float,
    interrupts: Interrupts,
    backoff: Backoff = TARGET_BACKOFF,
    poll: float = EARLIER_POLL,
    monotonic: Callable[[], float] = time.monotonic,
) -> bool:
    """Run ``task`` on its target. True if the change was already in place (nothing was run).

    Raises ``EngineCancelled`` when interrupted (``LeaseLost`` when the lease is lost),
    ``EngineError`` when the change fails or the target stayed unreachable for ``window``."""
    down_since: float | None = None
    attempt = 0
    while True:
        try:
            await_earlier(engine, task, ctx, interrupts, poll=poll, monotonic=monotonic)
            if engine.already_applied(task):
                done = True
            else:
                if interrupts.event.is_set():  # asked meanwhile: start nothing on the target
                    interrupts.raise_if_lost()
                    raise EngineCancelled(f"{interrupts.reason} before the DDL was sent")
                ctx.confirm_lease()
                engine.run(task, ctx)
                done = False
        except TargetUnavailable as exc:
            now = monotonic()
            if down_since is None:
                down_since = now
                ctx.log(
                    "warning",
                    "target_waiting",
                    f"target {task.database!r} unavailable: {exc.reason}; retrying for up to "
                    f"{window:g} s",
                )
            waited = now - down_since
            if waited >= window:
                raise EngineError(
                    f"target {task.database!r} unreachable for {window:g} s: {exc.reason}"
                ) from exc
            _pause(interrupts, min(backoff.delay(attempt), window - waited))
            attempt += 1
            continue
        if down_since is not None:
            ctx.log(
                "info",
                "target_recovered",
                f"target {task.database!r} reachable again after {monotonic() - down_since:.1f} "
                f"s and {attempt} retries",
            )
        return done


def await_earlier(
    engine: Engine,
    task: TaskSpec,
    ctx: EngineContext,
    interrupts: Interrupts,
    *,
    poll: float = EARLIER_POLL,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Return once no other statement of this apply runs on ``task``'s target."""
    since: float | None = None
    reported: set[tuple[int, int | None]] = set()
    while statements := engine.running_statements(task, ctx):
        if since is None:
            since = monotonic()
        for statement in statements:
            key = (statement.connection_id, statement.query_id)
            if key not in reported:
                reported.add(key)
                ctx.log(
                    "warning",
                    "target_waiting_earlier",
                    f"waiting for a {statement.describe()} on target {task.database!r}, "
                    "before running this task",
                )
        known = [s.progress for s in statements if s.progress is not None]
        if known:
            ctx.progress(min(99, int(max(known))))
        if interrupts.event.wait(poll):
            _interrupted_while_waiting(engine, task, ctx, interrupts, statements)
    if since is not None:
        ctx.log(
            "info",
            "target_earlier_ended",
            f"no earlier statement of this apply runs on target {task.database!r} any more "
            f"(waited {monotonic() - since:.1f} s); checking whether the change is in place",
        )


def _interrupted_while_waiting(
    engine: Engine,
    task: TaskSpec,
    ctx: EngineContext,
    interrupts: Interrupts,
    statements: list[TargetStatement],
) -> None:
    interrupts.raise_if_lost()  # not the holder any more: touch nothing on the target
    reason = interrupts.reason
    verb = _KILLING.get(reason) if reason is not None else None
    if verb is not None:
        for statement in statements:
            if statement.tag.epoch > ctx.epoch:
                continue  # a later holder's: never ours to kill (our lease is on its way out)
            killed = engine.kill_statement(task, statement)
            ctx.log(
                "warning",
                "target_earlier_killed" if killed else "target_earlier_kill_failed",
                f"{'killed' if killed else 'could not kill'} the {statement.describe()} on "
                f"target {task.database!r}: the apply is being {verb}, and a statement left "
                "running would change the schema after that",
            )
    raise EngineCancelled(f"{reason} while waiting for an earlier statement on the target")


def _pause(interrupts: Interrupts, seconds: float) -> None:
    """Wait ``seconds`` unless interrupted; an interrupt ends the wait at once."""
    if interrupts.event.wait(max(0.0, seconds)):
        interrupts.raise_if_lost()
        raise EngineCancelled(f"{interrupts.reason} while waiting for the target")
