"""The public Celery tasks. Names and JSON kwargs are a contract with other apps."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery.exceptions import Ignore

from leases import Lease, redeem_for_run
from storage import applies
from storage.database import Database
from storage.errors import (
    ApplyNotFound,
    InvalidInput,
    InvalidLease,
    InvalidTransition,
    LeaseLost,
    RowNotFound,
    StorageBusy,
    StorageUnavailable,
)
from tasks import notify, runtime, security, service
from tasks.app import app
from tasks.backoff import Backoff
from tasks.dispatcher import send_notification, send_run
from tasks.engines import make_engine
from tasks.github.effects import github_effects
from tasks.interrupts import Interrupts
from tasks.progress import CeleryProgress
from tasks.runner import ApplyRunner

log = logging.getLogger(__name__)

LEASE_LOST = "LEASE_LOST"  # a distinct final state, shown by Flower from the task event below
# While the store is unreachable, a worker that received run_apply keeps trying to redeem it.
REDEEM_BACKOFF = Backoff((0.5, 1.0, 2.0, 4.0, 5.0))


# Errors that are the caller's, not ours: reported as task failures, logged without a traceback.
EXPECTED = (InvalidInput, ApplyNotFound, InvalidTransition, RowNotFound)


@app.task(name="leasehold.submit_apply", bind=True, throws=EXPECTED)
def submit_apply(self: Any, **payload: Any) -> dict[str, int]:
    signer = _signer(self)
    if signer is not None:
        payload["requested_by"] = service.requester(payload.get("requested_by"), signer)
    apply_id = service.submit(runtime.database(), runtime.settings(), payload, send_run)
    return {"apply_id": apply_id}


@app.task(name="leasehold.control_apply", bind=True, throws=EXPECTED)
def control_apply(
    self: Any, apply_id: Any, action: Any, requested_by: Any = None
) -> dict[str, Any]:
    requested_by = service.requester(requested_by, _signer(self))
    return service.control_apply(
        runtime.database(), apply_id, action, requested_by, send_run, send_notification
    )


def _signer(task: Any) -> str | None:
    """Who signed the message, as the worker's guard verified it (tasks/security.py); None when
    messages are not signed, or the task was called in-process."""
    signer = getattr(task.request, security.SIGNER_HEADER, None)
    return signer if isinstance(signer, str) else None


@app.task(name="leasehold.get_apply", throws=EXPECTED)
def get_apply(apply_id: Any) -> dict[str, Any]:
    """Read-only: how an apply is doing, for callers that enqueued it."""
    return service.get_apply(runtime.database(), apply_id)


@app.task(name="leasehold.reclaim_stale_applies")
def reclaim_stale_applies() -> int:
    return service.reclaim_stale(
        runtime.database(), runtime.settings(), send_run, send_notification
    )


# Strategy: admitted into a free apply slot of the worker, never onto the control pool (slots.py).
@app.task(name="leasehold.run_apply", bind=True, throws=EXPECTED, Strategy="tasks.slots:strategy")
def run_apply(self: Any, apply_id: Any, lease: Any) -> dict[str, Any]:
    apply_id = service.require_id(apply_id)
    held = Lease.from_json(lease)
    if held.apply_id != apply_id:
        raise InvalidLease(f"lease is for apply {held.apply_id}, not {apply_id}")
    db = runtime.runs_database()  # the slots' pool; the heartbeat has a connection of its own
    settings = runtime.settings()
    owner = f"{self.request.hostname or 'local'}/{os.getpid()}/{self.request.id}"
    if runtime.shutting_down():
        # Received during this worker's warm shutdown (e.g. the lease it just handed back):
        # pass it on unredeemed, writing nothing, so that a worker that stays takes it.
        send_run(held)
        return {"apply_id": apply_id, "epoch": held.epoch, "outcome": "passed_on"}
    try:
        # Redeemed, and what the run starts from read in the same transaction.
        origin, snapshot = _redeem(db, held, owner, patience=settings.dispatch_timeout)
    except LeaseLost as exc:
        if exc.current_epoch is not None and held.epoch >= exc.current_epoch:
            # Every epoch has exactly one token: a later epoch, or the current one with another
            # token, was never issued. Only an older epoch is ambiguous (stale or forged).
            raise InvalidLease(
                f"lease for apply {apply_id} epoch {held.epoch} was never issued"
            ) from exc
        # A duplicate or stale message: nothing was written, nothing to do.
        log.info("run_apply %r not redeemed: %s", held, exc)
        return {"apply_id": apply_id, "epoch": held.epoch, "outcome": "not_redeemed"}

    apply = snapshot.apply
    engine = make_engine(apply["engine"], targets=settings.targets)
    interrupts = Interrupts()
    effects = github_effects(db, held, interrupts, apply, settings, reclaimed=origin == "reclaimed")
    runtime.register_run(self.request.id, interrupts)
    beats = runtime.heartbeats()
    beats.hold(held, interrupts)
    reporter = CeleryProgress.for_task(self, apply_id)
    try:
        outcome = ApplyRunner(
            db,
            held,
            engine,
            interrupts,
            reporter,
            effects=effects,
            target_retry=settings.target_retry,
            progress_interval=settings.checkpoint_interval,
            snapshot=snapshot,
        ).run()
    except LeaseLost as exc:
        log.warning("run_apply %r: lease lost, stopping without further writes: %s", held, exc)
        # No progress report may land after the final state: one in flight (e.g. sent just
        # before a SIGSTOP and finished after the SIGCONT) would overwrite LEASE_LOST.
        reporter.close()
        _report_lease_lost(self, {"apply_id": apply_id, "epoch": held.epoch, "reason": str(exc)})
        raise Ignore() from exc
    finally:
        beats.release(held)
        reporter.close()
        effects.close()
        runtime.unregister_run(self.request.id)
    for lease in (outcome.lease, outcome.successor):
        if lease is not None:
            send_run(lease)
    if outcome.state.terminal:
        notify.deliver(db, send_notification, [apply_id])
    return {
        "apply_id": apply_id,
        "epoch": held.epoch,
        "outcome": str(outcome.state),
        "error": outcome.error,
    }


def _redeem(
    db: Database, lease: Lease, owner: str, *, patience: float
) -> tuple[str, applies.RunSnapshot]:
    """Redeem, retrying while the store is unreachable: the message is already taken from the
    broker, and giving up would leave the apply until the dispatch timeout. Past ``patience``
    (the dispatch timeout, after which reclaim re-dispatches anyway) the error is raised."""
    deadline = time.monotonic() + patience
    attempt = 0
    while True:
        try:
            return redeem_for_run(db, lease, owner)
        except (StorageUnavailable, StorageBusy) as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("run_apply %r: store unreachable, retrying the redemption: %s", lease, exc)
            time.sleep(REDEEM_BACKOFF.delay(attempt))
            attempt += 1


def _report_lease_lost(task: Any, meta: dict[str, Any]) -> None:
    """Flower's distinct state for a run that lost its lease: best-effort, like all progress."""
    try:
        task.update_state(state=LEASE_LOST, meta=meta)
        task.send_event("task-lease_lost", **meta)
    except Exception as exc:  # the broker or result backend is down: the database is the truth
        log.warning("apply %s: lease loss not reported to Celery: %s", meta["apply_id"], exc)
