"""The lease lifecycle: dispatch, redeem, heartbeat, check. A held lease ends one way: as the last
write of its owner's fence (``storage.fenced.end_lease``, ``storage.fenced.finish``).

Every rotation is a compare-and-swap on the previous token and is logged, at the new epoch, in
the same transaction. Heartbeats set ``heartbeat_at`` from the database clock and are fenced by
their own WHERE clause. None of these raises ``LeaseLost`` for a connection error: that is
``StorageUnavailable``, and the caller retries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import Connection

from leases.lease import Lease, mint_token
from storage import _leasing as leasing
from storage import _lines as lines
from storage import applies, control
from storage.control import ControlRequest
from storage.database import Database
from storage.errors import InvalidTransition, LeaseLost
from storage.states import ApplyState

# States from which an apply with no holder may be dispatched: first dispatch and resume.
DISPATCHABLE = (ApplyState.PENDING, ApplyState.QUEUED, ApplyState.STOPPED)


def dispatch(
    db: Database,
    apply_id: int,
    *,
    from_states: Iterable[ApplyState] = DISPATCHABLE,
    event: str = "dispatched",
    reason: str = "dispatched to a worker",
) -> Lease:
    """Mint a lease for an apply nobody holds (queued, or stopped for a resume) that heads its
    line: ``InvalidTransition`` if another apply of its (database, environment) is ahead of it.

    The new lease is returned for the caller to send to a worker; until a worker redeems it the
    apply is ``dispatched`` and reclaim re-dispatches it after the dispatch timeout.
    """
    allowed = [ApplyState(s) for s in from_states]
    for txn in db.attempts():
        with txn as conn:
            line = lines.of(conn, apply_id)
            lines.lock(conn, line)
            row = leasing.lock(conn, apply_id)
            if row.state not in allowed:
                raise InvalidTransition(apply_id, row.state, "dispatch")
            first = lines.head(conn, line)
            if first is not None and first.apply_id != apply_id:
                raise InvalidTransition(
                    apply_id,
                    row.state,
                    f"dispatch: apply {first.apply_id} ({first.state}) is ahead of it on {line}",
                )
            token = mint_token()
            epoch = leasing.rotate(
                conn,
                row,
                new_token=token,
                to_state=ApplyState.DISPATCHED,
                event=event,
                reason=reason,
            )
    return Lease(apply_id, epoch, token)


def redeem(db: Database, lease: Lease, owner: str) -> str:
    """Claim a dispatched lease for ``owner``. ``LeaseLost``: a duplicate or stale message.

    Returns how the lease came to be (the event of the rotation that minted it: ``dispatched``,
    ``reclaimed``, ``handed_back``, ``resumed``), which tells the new holder whether a previous
    holder may still have an external call in flight.
    """
    for txn in db.attempts():
        with txn as conn:
            origin = _redeem(conn, lease, owner)
    return origin


def redeem_for_run(db: Database, lease: Lease, owner: str) -> tuple[str, applies.RunSnapshot]:
    """:func:`redeem`, and in the same transaction what the run starts from (the apply, its
    tasks, its pending control requests: ``storage.applies.run_snapshot``), read under the row
    lock the redemption took: one store round trip fewer on the way to the first task."""
    for txn in db.attempts():
        with txn as conn:
            origin = _redeem(conn, lease, owner)
            snapshot = applies.run_snapshot(conn, lease.apply_id)
    return origin, snapshot


def _redeem(conn: Connection, lease: Lease, owner: str) -> str:
    leasing.redeem(conn, lease.apply_id, epoch=lease.epoch, token=lease.token, owner=owner)
    origin = leasing.rotation_event(conn, lease.apply_id, lease.epoch)
    leasing.append_log(
        conn,
        lease.apply_id,
        epoch=lease.epoch,
        level="info",
        event="redeemed",
        message=f"lease epoch {lease.epoch} redeemed by {owner}",
    )
    return origin


def owe_dispatch(db: Database, lease: Lease) -> bool:
    """``run_apply`` for ``lease`` could not be sent (the broker was down): record it as owed,
    so that the next reclaim pass sends it again instead of leaving the apply until the dispatch
    timeout. False if the lease is no longer current and unredeemed (nothing is owed then)."""
    for txn in db.attempts():
        with txn as conn:
            owed = leasing.owe_dispatch(conn, lease.apply_id, epoch=lease.epoch)
    return owed


def owed_dispatches(db: Database, *, limit: int = 100) -> list[Lease]:
    """The leases whose ``run_apply`` is still owed, to be sent again."""
    with db.transaction() as conn:
        rows = leasing.owed_dispatches(conn, limit=limit)
    return [Lease(r.apply_id, r.epoch, str(r.token)) for r in rows]


def dispatch_sent(db: Database, lease: Lease) -> None:
    for txn in db.attempts():
        with txn as conn:
            leasing.dispatch_sent(conn, lease.apply_id, epoch=lease.epoch)


def heartbeat(db: Database, lease: Lease) -> None:
    """Renew liveness from the database clock; ``LeaseLost`` if the lease is no longer current."""
    for txn in db.attempts():
        with txn as conn:
            leasing.heartbeat(conn, lease.apply_id, epoch=lease.epoch, token=lease.token)


@dataclass(frozen=True, slots=True)
class Renewal:
    """One batched heartbeat of a worker, by apply id: the leases renewed (with the control
    requests pending for them), the ones proven lost, and the ones skipped because another
    transaction held their row (neither renewed nor lost: tried again at the next beat)."""

    renewed: frozenset[int]
    lost: dict[int, LeaseLost] = field(default_factory=dict)
    busy: frozenset[int] = frozenset()
    requests: dict[int, list[ControlRequest]] = field(default_factory=dict)


def heartbeat_all(db: Database, held: Iterable[Lease]) -> Renewal:
    """Renew every lease of ``held`` that is still current and read the control requests pending
    for them: one transaction of three statements, whatever their number (a worker's heartbeat).

    Each lease is fenced as :func:`heartbeat` fences one: renewed only while current and running,
    by the database clock; ``lost`` only on a row that proves it. A connection error raises
    (``StorageUnavailable``): it proves nothing about any lease.
    """
    leases = [(lease.apply_id, lease.epoch, lease.token) for lease in held]
    if not leases:
        return Renewal(frozenset())
    for txn in db.attempts():
        with txn as conn:
            found = leasing.renew_held(conn, leases)
            requests = control.pending_in(conn, found.renewed)
    return Renewal(found.renewed, found.lost, found.busy, requests)


def check(db: Database, lease: Lease) -> None:
    """Raise ``LeaseLost`` unless ``lease`` is current and its apply running. Writes nothing.

    Advisory only: a check followed by a write is not a fence. Use ``fence`` for that.
    """
    with db.transaction() as conn:
        leasing.check(conn, lease.apply_id, epoch=lease.epoch, token=lease.token)
