"""Reclaim: rotate the leases of applies whose holder went silent, so that a new worker can take
over and the silent one is fenced.

Two reclaimers at once are safe: candidates are locked ``FOR UPDATE SKIP LOCKED`` (on SQLite the
database write lock serializes the passes), each rotation is a CAS, and a rotated apply's
heartbeat is fresh, so the other pass no longer sees it as stale. Rows whose holder is inside a
fence (an effect in flight) are locked, so they are skipped, never waited for.
"""

from __future__ import annotations

from dataclasses import dataclass

from leases.lease import Lease, mint_token
from storage import _leasing as leasing
from storage.database import Database
from storage.states import ApplyState

# A batch runs at READ COMMITTED whatever the engine's level. Under REPEATABLE READ the candidate
# scan also takes gap locks on the (state, heartbeat_at) index, which SKIP LOCKED does not skip:
# the rotations of a concurrent pass, which insert into that index, then wait for this batch (and
# two passes can deadlock). READ COMMITTED locks only the rows the scan returns; each rotation is
# still a CAS on the locked row, so nothing else changes.
BATCH_ISOLATION = "READ COMMITTED"


@dataclass(frozen=True, slots=True)
class ReclaimPolicy:
    """What a reclaim pass takes over (from the settings; their defaults are celeryconfig's)."""

    stale_after: float
    dispatch_timeout: float
    max_reclaims: int
    batch_size: int = 100  # rows per transaction: an implementation choice, not a setting

    def __post_init__(self) -> None:
        if self.stale_after <= 0 or self.dispatch_timeout <= 0:
            raise ValueError("stale_after and dispatch_timeout must be positive")
        if self.max_reclaims < 0 or self.batch_size < 1:
            raise ValueError("max_reclaims must be >= 0 and batch_size >= 1")


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """One apply this pass took over: ``lease`` is set when it must be dispatched again, and
    ``None`` when the apply was failed as abandoned instead."""

    apply_id: int
    previous_epoch: int
    from_state: str
    lease: Lease | None


def reclaim(db: Database, policy: ReclaimPolicy) -> list[Reclaimed]:
    """One reclaim pass, in batches of one transaction each. The caller dispatches every returned
    lease after this returns (after commit, so a worker never redeems an uncommitted lease)."""
    done: list[Reclaimed] = []
    for state, older_than in (
        (ApplyState.RUNNING, policy.stale_after),
        (ApplyState.DISPATCHED, policy.dispatch_timeout),
    ):
        while True:
            batch = _reclaim_batch(db, policy, state, older_than)
            done.extend(batch)
            if len(batch) < policy.batch_size:
                break
    return done


def _reclaim_batch(
    db: Database, policy: ReclaimPolicy, state: ApplyState, older_than: float
) -> list[Reclaimed]:
    out: list[Reclaimed] = []
    with db.transaction(isolation_level=BATCH_ISOLATION) as conn:
        for row in leasing.stale(conn, state, older_than=older_than, limit=policy.batch_size):
            token = mint_token()
            silent = "heartbeat" if state == ApplyState.RUNNING else "dispatch"
            if row.reclaim_count >= policy.max_reclaims:
                reason = (
                    f"abandoned: {silent} stale for over {older_than:g}s after "
                    f"{row.reclaim_count} reclaims (max {policy.max_reclaims})"
                )
                leasing.rotate(
                    conn,
                    row,
                    new_token=token,
                    to_state=ApplyState.FAILED,
                    event="abandoned",
                    reason=reason,
                    error=reason,
                )
                out.append(Reclaimed(row.apply_id, row.epoch, row.state, None))
                continue
            epoch = leasing.rotate(
                conn,
                row,
                new_token=token,
                to_state=ApplyState.DISPATCHED,
                event="reclaimed",
                reason=f"reclaimed from epoch {row.epoch}: {silent} stale over {older_than:g}s",
                reclaimed=True,
            )
            lease = Lease(row.apply_id, epoch, token)
            out.append(Reclaimed(row.apply_id, row.epoch, row.state, lease))
    return out
