"""Taking turns: at most one apply per (database, environment) is dispatched or running.

Submit queues the new apply in its line and, when the line was free, dispatches it in the same
transaction. Each apply's end dispatches the next of its line in the transaction that ends it
(``storage.fenced.finish``, ``leases.control``); an apply that reclaim fails as abandoned is
followed by :func:`dispatch_waiting`, which every reclaim pass runs and which also heals any line
whose waiting head was never dispatched (an older leasehold's ``pending`` applies).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from leases.lease import Lease, mint_token
from storage import _lines as lines
from storage import applies
from storage._lines import Line, Promoted
from storage.applies import NewApply
from storage.database import Database
from storage.states import WAITING_STATES

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Submitted:
    apply_id: int
    created: bool  # False: an earlier submission with the same request_id
    lease: Lease | None  # to send once committed: the new apply's, if its line was free


def submit(db: Database, new: NewApply) -> Submitted:
    """Insert the apply and its tasks and take the line's turn if it is free, in one transaction.

    A repeated ``request_id`` returns the same apply and dispatches nothing.
    """
    token = mint_token()
    created = applies.create(db, new, turn_token=token)
    lease = None if created.promoted is None else _lease(created.promoted, token)
    return Submitted(created.apply_id, created.created, lease)


def dispatch_waiting(db: Database) -> list[Lease]:
    """Dispatch the waiting head of every line that has one (a reclaim pass runs this after its
    batches). Lines whose head is running, dispatched or stopped are only read."""
    with db.transaction() as conn:
        candidates = lines.waiting(conn)
    sent: list[Lease] = []
    for line in candidates:
        lease = _promote_if_waiting(db, line)
        if lease is not None:
            log.info("apply %s: dispatched, its turn on %s", lease.apply_id, line)
            sent.append(lease)
    return sent


def _promote_if_waiting(db: Database, line: Line) -> Lease | None:
    with db.transaction() as conn:
        first = lines.head(conn, line)
    if first is None or first.state not in WAITING_STATES:
        return None  # the common case: an apply is running; no lock taken
    token = mint_token()
    for txn in db.attempts():
        with txn as conn:
            lines.lock(conn, line)
            promoted = lines.promote(conn, line, token)
    return None if promoted is None else _lease(promoted, token)


def _lease(promoted: Promoted, token: str) -> Lease:
    return Lease(promoted.apply_id, promoted.epoch, token)
