"""The fence of external effects (GitHub calls), in terms of a ``Lease``: the effect window that
keeps two epochs' calls from overlapping without holding any lock during a call
(``storage.published``), and the claim of an owed publication (``storage.publications``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from leases.lease import Lease
from storage import publications, published
from storage.database import Database
from storage.published import EffectFenced


def open_window(db: Database, lease: Lease, seconds: float) -> None:
    """Open or extend ``lease``'s effect window. Raises ``LeaseLost`` once the lease moved on,
    ``EffectWindowBusy`` while an earlier epoch's window is still open."""
    published.open_window(db, lease.apply_id, epoch=lease.epoch, token=lease.token, seconds=seconds)


def close_window(db: Database, lease: Lease) -> None:
    """``lease``'s calls are over (answered), whether or not it is still current."""
    published.close_window(db, lease.apply_id, epoch=lease.epoch)


@contextmanager
def effect_fence(db: Database, lease: Lease) -> Iterator[EffectFenced]:
    """A transaction in which ``lease`` is proven current, whatever its apply's state, to record
    an effect's answer in. Raises ``LeaseLost`` (nothing written) if it is not."""
    with published.effect_fence(db, lease.apply_id, lease.epoch, lease.token) as fx:
        yield fx


@dataclass(frozen=True, slots=True)
class OwedPublication:
    lease: Lease  # the apply's current lease, under which the publication is made
    state: str  # what is owed: stopped, completed, failed or cancelled
    attempts: int  # including this one


def claim_publication(db: Database, apply_id: int) -> OwedPublication | None:
    """Claim what the apply's pull request is owed; None if nothing is, or another publisher
    is at it."""
    claimed = publications.claim(db, apply_id)
    if claimed is None:
        return None
    return OwedPublication(
        Lease(apply_id, claimed.epoch, claimed.token), claimed.state, claimed.attempts
    )
