"""What pull requests are still owed: the stopped or final state of an apply (an outbox).

Made *due* by the rotation that stops or ends an apply with a pull request, in its transaction
(``storage._leasing.rotate``); published after that commit, under the apply's then-current lease,
by the holder that stopped or ended it, or, if that one could not (GitHub down, the worker dead),
by a later reclaim pass. A publisher *claims* it (a compare-and-swap; a claim whose publisher
died expires), publishes, and *settles* it inside the fence of its record
(``storage.published.settle``); a failed attempt releases the claim and sets when the next one
may start. An apply resumed or retried since owes nothing to claim: its new holder publishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storage import _statements as statements
from storage.database import Database

# How long a claim keeps other publishers away: longer than a holder's own attempts at the final
# publication take (tasks/github/publisher.py), so that the pass does not race a live holder.
CLAIM_EXPIRY = 120.0


@dataclass(frozen=True, slots=True)
class Claimed:
    """A claimed publication: made under the apply's current lease (epoch, token)."""

    apply_id: int
    epoch: int
    token: str = field(repr=False)
    state: str
    attempts: int


def owed(db: Database, *, expiry: float = CLAIM_EXPIRY, limit: int = 100) -> list[int]:
    """Applies whose publication is due now and free to claim, oldest first."""
    with db.transaction() as conn:
        rows = conn.execute(statements.owed_publications(expiry=expiry, limit=limit))
        return [int(r.apply_id) for r in rows]


def claim(db: Database, apply_id: int, *, expiry: float = CLAIM_EXPIRY) -> Claimed | None:
    """Claim the apply's owed publication; None if nothing is owed now or another publisher
    has it."""
    with db.transaction() as conn:
        if conn.execute(statements.claim_publication(apply_id, expiry=expiry)).rowcount != 1:
            return None
        row = conn.execute(statements.publication_lease(apply_id)).one()
    return Claimed(apply_id, int(row.lease_epoch), str(row.lease_token), row.state, row.attempts)


def release(db: Database, apply_id: int, *, delay: float, error: str | None) -> None:
    """The attempt failed: the next may start ``delay`` seconds from now (store's clock)."""
    with db.transaction() as conn:
        conn.execute(statements.release_publication(apply_id, delay=delay, error=error))


def abandon(db: Database, apply_id: int, *, error: str) -> None:
    """GitHub refused it for good: nothing more is owed; the reason stays on record."""
    with db.transaction() as conn:
        conn.execute(statements.abandon_publication(apply_id, error=error))


def get(db: Database, apply_id: int) -> dict[str, Any] | None:
    """The apply's publication record (due_at, attempts, last_error, published_at, overdue)."""
    with db.transaction() as conn:
        row = conn.execute(statements.publication_row(apply_id)).mappings().one_or_none()
    return None if row is None else dict(row)


@dataclass(frozen=True, slots=True)
class Backlog:
    count: int
    oldest_due_at: Any  # a datetime in UTC, or None


def backlog(db: Database) -> Backlog:
    """How many publications are owed, and since when: for ``leasehold doctor``."""
    with db.transaction() as conn:
        count = conn.execute(statements.owed_publication_count()).scalar_one()
        oldest = conn.execute(statements.oldest_owed_publication()).scalar_one()
    return Backlog(int(count), oldest)
