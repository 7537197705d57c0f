"""Runs one redeemed apply: its unfinished apply tasks in order, through an engine.

Every write is an owned write inside the fence of the held lease. The runner acts on interrupts
at safe points (between apply tasks, and inside an engine, which sees ``interrupts.event``):
stop and handover put the current task back to pending with its checkpoint and rotate the lease
away; cancel ends the apply; a lost lease writes nothing more and raises ``LeaseLost``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from leases import Lease, fence, mint_token
from storage import applies, fenced
from storage.database import Database
from storage.errors import LeaseLost, StorageBusy, StorageError, StorageUnavailable
from storage.fenced import Fenced
from storage.states import ApplyState, ControlState, TaskState
from tasks.backoff import Backoff
from tasks.effects import Effects, NoEffects
from tasks.engines import Engine, EngineCancelled, EngineContext, EngineError, TaskSpec
from tasks.engines.base import Progress
from tasks.engines.target_errors import describe
from tasks.interrupts import Interrupts, Reason
from tasks.target_retry import run_task as run_on_target

log = logging.getLogger(__name__)
T = TypeVar("T")
# Short: an owned write waits on a database blip, not on a remote service.
RETRY_BACKOFF: Final = Backoff((0.05, 0.1, 0.2, 0.5, 1.0))


class Reporter(Protocol):
    """Where progress goes besides the database (Flower, in the Celery task)."""

    def progress(self, *, epoch: int, index: int, total: int, table: str, percent: int) -> None: ...


@dataclass(frozen=True, slots=True)
class _Done:
    """An apply task's completion, to be written: its log event and line, its place in the
    apply, and its 100 % checkpoint if that is still unwritten."""

    spec: TaskSpec
    event: str
    label: str
    index: int
    total: int
    checkpoint: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Outcome:
    state: ApplyState
    lease: Lease | None = None  # a handed-back apply's new lease, to be dispatched
    error: str | None = None
    successor: Lease | None = None  # the next apply of the line, dispatched as this one ended


class ApplyRunner:
    def __init__(
        self,
        db: Database,
        lease: Lease,
        engine: Engine,
        interrupts: Interrupts,
        reporter: Reporter,
        *,
        progress_interval: float = 1.0,
        effects: Effects | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        target_retry: float = 0.0,
        snapshot: applies.RunSnapshot | None = None,
    ) -> None:
        # target_retry: how long a task retries a target it cannot reach (run_apply passes
        # LEASEHOLD_TARGET_RETRY); 0 fails it at the first outage.
        # snapshot: the apply, its tasks and pending requests as read right after redemption
        # (run_apply reads them in one transaction, applies.for_run); read by run() if None.
        self.effects: Effects = effects or NoEffects()
        self.target_retry = target_retry
        self.db = db
        self.lease = lease
        self.engine = engine
        self.interrupts = interrupts
        self.reporter = reporter
        self.progress_interval = progress_interval
        self._monotonic = monotonic
        self._snapshot = snapshot
        self._apply: Mapping[Any, Any] | None = None  # the apply's row, once run() read it
        # The start of the current apply task, not written at once but first in the next fenced
        # transaction of this run (_write).
        self._starting: Callable[[Fenced], None] | None = None
        # An apply task's 100% checkpoint, not written at once but in the next fenced
        # transaction of this run (its completion, as a rule): (task id, values).
        self._deferred: tuple[int, dict[str, Any]] | None = None
        # The last apply task's completion, written in the transaction that ends the apply.
        self._last_done: _Done | None = None

    def run(self) -> Outcome:
        snapshot = self._snapshot or applies.for_run(self.db, self.lease.apply_id)
        self._snapshot = None  # a second run() reads afresh
        apply, rows = snapshot.apply, snapshot.tasks
        self._apply = apply
        # A stop or cancel requested before this worker redeemed (e.g. while its predecessor was
        # dying) is acted on before any work.
        self.interrupts.requested(snapshot.requests)
        total = len(rows)
        self.effects.start()
        last = max(
            (i for i, row in enumerate(rows) if row["state"] != TaskState.COMPLETED), default=-1
        )
        for index, row in enumerate(rows):
            if row["state"] == TaskState.COMPLETED:
                continue
            if self.interrupts.event.is_set():
                return self._interrupted(None)
            spec = TaskSpec(
                id=int(row["id"]),
                position=int(row["position"]),
                table_name=row["table_name"],
                ddl=row["ddl"],
                options=row["options"] or {},
                database=apply["database_name"],
                checkpoint=row["checkpoint"],
                progress=int(row["progress"]),
            )
            outcome = self._run_task(spec, index, total, last=index == last)
            if outcome is not None:
                return outcome
        return self._end(ApplyState.COMPLETED, "completed", f"all {total} apply tasks completed")

    def _run_task(self, spec: TaskSpec, index: int, total: int, *, last: bool) -> Outcome | None:
        """Run one apply task. The last one's completion is left to the transaction that ends
        the apply (:meth:`_end`), which writes it first: one store round trip fewer."""
        label = f"task {index + 1}/{total}: {spec.table_name}"

        def start(fx: Fenced) -> None:
            fenced.start_task(fx, spec.id)
            fenced.append_log(fx, "task_started", label)

        # Written first in the task's first fenced transaction (_write): the confirmation of
        # the lease before the DDL, as a rule, or a log line, checkpoint or end before that.
        self._starting = start
        self._report(index, total, spec, spec.progress)
        self.effects.progress(boundary=True)
        ctx = EngineContext(
            progress=self._progress_writer(spec, index, total),
            cancelled=self.interrupts.event,
            apply_id=self.lease.apply_id,
            epoch=self.lease.epoch,
            log=lambda level, event, message: self._write(
                lambda fx: fenced.append_log(fx, event, message, level=level)
            ),
            confirm_lease=lambda: self._write(lambda fx: None),
        )
        try:
            # The target-side fence, already_applied, the DDL; target outages retried.
            if run_on_target(
                self.engine, spec, ctx, window=self.target_retry, interrupts=self.interrupts
            ):
                self._completed(spec, "task_skipped", label, index, total, last=last)
                return None
        except EngineCancelled:
            return self._interrupted(spec)
        except (LeaseLost, StorageError):
            raise  # ours, not the engine's: nothing more may be written / retried by reclaim
        except Exception as exc:
            # EngineError, but also a target missing from this worker's configuration or an
            # engine bug: fail the apply with the real reason rather than leave it running, to
            # be reclaimed again and again until it fails as "abandoned".
            if isinstance(exc, EngineError):
                error = str(exc)
            else:  # never a driver's wrapping, nor a target URL's password
                error = f"{type(exc).__name__}: {describe(exc)}"
            return self._end(ApplyState.FAILED, "failed", error, failed_task=spec)
        self._completed(spec, "task_completed", label, index, total, last=last)
        return None

    def _completed(
        self, spec: TaskSpec, event: str, label: str, index: int, total: int, *, last: bool
    ) -> None:
        done = _Done(spec, event, label, index, total, self._take_checkpoint(spec))
        if last:
            self._last_done = done
            return
        self._write(lambda fx: self._complete_task(fx, done))
        self._task_done(spec, index, total)

    def _take_checkpoint(self, spec: TaskSpec) -> Mapping[str, Any] | None:
        """The task's 100 % checkpoint, if it is still to be written: it goes with the task's
        completion, in the same statement, instead of before it (the completion's closure keeps
        it until a fence carrying it commits, like ``_write``'s deferred writes)."""
        deferred = self._deferred
        if deferred is None or deferred[0] != spec.id:
            return None
        self._deferred = None
        checkpoint: Mapping[str, Any] | None = deferred[1].get("checkpoint")
        return checkpoint

    def _task_done(self, spec: TaskSpec, index: int, total: int) -> None:
        """Shown once the task's completion committed."""
        self._report(index, total, spec, 100)
        self.effects.progress(boundary=True)

    @staticmethod
    def _complete_task(fx: Fenced, done: _Done) -> None:
        fenced.finish_task(fx, done.spec.id, TaskState.COMPLETED, checkpoint=done.checkpoint)
        fenced.append_log(fx, done.event, done.label)

    def _report(self, index: int, total: int, spec: TaskSpec, percent: int) -> None:
        self.reporter.progress(
            epoch=self.lease.epoch, index=index, total=total, table=spec.table_name, percent=percent
        )

    def _progress_writer(self, spec: TaskSpec, index: int, total: int) -> Progress:
        last_write = [float("-inf")]

        def write(percent: int, checkpoint: Mapping[str, Any] | None = None) -> None:
            self.interrupts.raise_if_lost()
            now = self._monotonic()
            # Throttled: a checkpoint every progress_interval is plenty to resume from, and keeps
            # the row lock (which a rotation waits for) free nearly all the time.
            if now - last_write[0] < self.progress_interval and percent < 100:
                return
            last_write[0] = now
            values: dict[str, Any] = {"progress": max(0, min(100, int(percent)))}
            if checkpoint is not None:
                values["checkpoint"] = dict(checkpoint)
            if values["progress"] == 100:
                # The task is done: its completion follows at once, and the checkpoint goes
                # with it, or with whatever this run writes next (_write), in one transaction.
                deferred = self._deferred
                if deferred is not None and deferred[0] != spec.id:
                    self._write(lambda fx: None)  # another task's, never left behind
                elif deferred is not None and "checkpoint" not in values:
                    values = {**deferred[1], **values}
                # Checked now, and copied: the engine may reuse its checkpoint's objects.
                self._deferred = (spec.id, fenced.task_values(copy.deepcopy(values)))
            else:
                self._write(lambda fx: fenced.update_task(fx, spec.id, **values))
            self._report(index, total, spec, values["progress"])
            self.effects.progress(boundary=False)

        return write

    def _write(self, body: Callable[[Fenced], T], *, finishing: bool = False) -> T:
        """Run ``body`` inside the fence, retrying while the database is unreachable or busy.

        A connection error is not a lost lease; the retries end when the heartbeat thread proves
        the lease lost, or presumes it lost after ``stale_after`` without a heartbeat.
        ``finishing``: ``body`` ends the apply, so the fence holds its line too.
        """
        attempt = 0
        while True:
            self.interrupts.raise_if_lost()
            starting, deferred = self._starting, self._deferred
            try:
                apply_row = self._apply if finishing else None  # whose line it is
                with fence(self.db, self.lease, finishing=finishing, apply_row=apply_row) as fx:
                    # Deferred writes first, in order: the task's start (_run_task), then its
                    # 100% checkpoint (_progress_writer).
                    if starting is not None:
                        starting(fx)
                    if deferred is not None:
                        fenced.update_task(fx, deferred[0], **deferred[1])
                    result = body(fx)
                # Committed.
                if self._starting is starting:
                    self._starting = None
                if self._deferred is deferred:
                    self._deferred = None
                return result
            except (StorageUnavailable, StorageBusy) as exc:
                log.warning("apply %s: owned write failed, retrying: %s", self.lease.apply_id, exc)
                time.sleep(RETRY_BACKOFF.delay(attempt))
                attempt += 1

    def _interrupted(self, spec: TaskSpec | None) -> Outcome:
        self.interrupts.raise_if_lost()
        reason = self.interrupts.reason
        if reason == Reason.CANCEL:
            return self._end(ApplyState.CANCELLED, "cancelled", "cancelled by request")
        stopping = reason == Reason.STOP
        target = ApplyState.STOPPED if stopping else ApplyState.DISPATCHED
        token = mint_token()

        def prepare(fx: Fenced) -> None:
            if spec is not None:
                # Back to pending with its checkpoint: the next holder resumes it.
                fenced.update_task(fx, spec.id, state=TaskState.PENDING)
            self._finish_request(fx)

        def rotate(fx: Fenced) -> int:
            return fenced.end_lease(
                fx,
                new_token=token,
                to_state=target,
                event="stopped" if stopping else "handed_back",
                reason="stopped by request" if stopping else "worker shutting down: handed back",
            )

        epoch = self._transition(prepare, rotate, state=target)
        log.info("apply %s %s at a safe point", self.lease.apply_id, target)
        if stopping:
            return Outcome(target)
        return Outcome(target, lease=Lease(self.lease.apply_id, epoch, token))

    def _transition(
        self,
        prepare: Callable[[Fenced], None],
        rotate: Callable[[Fenced], T],
        *,
        state: ApplyState,
        finishing: bool = False,
    ) -> T:
        """Change state and rotate the lease away in one fenced transaction, after the last
        apply task's completion if it is still to be written (:meth:`_completed`); then tell the
        effects, which publish the new state on their own time (the rotation made it owed to
        the pull request in the same transaction): the change never waits for GitHub."""
        done = self._last_done

        def transition(fx: Fenced) -> T:
            if done is not None:
                self._complete_task(fx, done)
            prepare(fx)
            return rotate(fx)

        self.interrupts.ending = True
        result = self._write(transition, finishing=finishing)
        self._last_done = None
        if done is not None:
            self._task_done(done.spec, done.index, done.total)
        self.effects.ended(state)
        return result

    def _finish_request(self, fx: Fenced) -> None:
        if self.interrupts.request_id is not None:
            fenced.finish_control_request(
                fx, self.interrupts.request_id, state=ControlState.COMPLETED
            )

    def _end(
        self, state: ApplyState, event: str, reason: str, *, failed_task: TaskSpec | None = None
    ) -> Outcome:
        """The terminal write: the failed task recorded, the remaining ones cancelled, a control
        request completed (the others still pending failed), the lease rotated away and the next
        apply of the line dispatched, in one fenced transaction that holds the line."""
        error = reason if state == ApplyState.FAILED else None
        successor_token = mint_token()

        def prepare(fx: Fenced) -> None:
            if failed_task is not None:
                fenced.finish_task(fx, failed_task.id, TaskState.FAILED, error=error)
            if state != ApplyState.COMPLETED:
                fenced.cancel_unfinished_tasks(fx)
            if state == ApplyState.CANCELLED:
                self._finish_request(fx)

        def rotate(fx: Fenced) -> fenced.Finished:
            return fenced.finish(
                fx,
                new_token=mint_token(),
                successor_token=successor_token,
                to_state=state,
                event=event,
                reason=reason,
                error=error,
            )

        finished = self._transition(prepare, rotate, state=state, finishing=True)
        log.info("apply %s %s: %s", self.lease.apply_id, state, reason)
        successor = finished.successor
        return Outcome(
            state,
            error=error,
            successor=None
            if successor is None
            else Lease(successor.apply_id, successor.epoch, successor_token),
        )
