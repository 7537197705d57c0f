"""The fence: every owned write of a running apply happens inside one."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from leases.lease import Lease
from storage.database import Database
from storage.fenced import Fenced, fenced_transaction


@contextmanager
def fence(
    db: Database,
    lease: Lease,
    *,
    finishing: bool = False,
    apply_row: Mapping[Any, Any] | None = None,
) -> Iterator[Fenced]:
    """A transaction that holds ``lease``'s apply row locked from its first statement to commit.

    Raises ``LeaseLost`` (nothing written) if the lease is not current, ``ApplyNotFound`` if the
    apply does not exist. Pass the handle to the owned writes in ``storage.fenced``. External
    calls are never made inside it (a rotation would wait for them): they have a fence of their
    own, ``leases.effects``.

    ``finishing``: the block may end the apply (``storage.fenced.finish``), passing its line's
    turn to the next apply, so the line is locked before the fence. ``apply_row``: the apply's
    row as the caller read it, whose line it is (one read fewer).
    """
    with fenced_transaction(
        db, lease.apply_id, lease.epoch, lease.token, finishing=finishing, apply_row=apply_row
    ) as fx:
        yield fx
