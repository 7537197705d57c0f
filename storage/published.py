"""External effects of a lease (GitHub calls): the effect window, and the fence of their records.

An effect is made in three steps, and no lock is held while its call is in flight, so that
neither the runner's own writes nor a rotation (stop, cancel, reclaim: the brake) ever waits for
GitHub:

1. :func:`open_window`: one compare-and-swap on the apply row proves the lease current and opens
   its *effect window*, ``seconds`` long by the store's clock. It fails with ``LeaseLost`` once
   the lease moved on, and with ``EffectWindowBusy`` while the window of another (earlier) epoch
   is still open.
2. The call, made by the caller, bounded by a hard timeout that ends inside the window, and
   started only if the caller's own deadline (taken before step 1) has not passed.
3. :func:`effect_fence`: a transaction that proves the lease current again and locks the row,
   in which the call's answer is recorded; then :func:`close_window` (by the epoch alone: a
   holder whose lease moved on while its call was in flight records nothing, but still says
   that its call is over).

So the calls of two epochs never overlap: the first call of a new holder waits until every
window of its predecessors closed or ran out. A rotation may commit while a call is in flight;
what it can no longer do is let a later epoch's call start before that one is over. (A call that
timed out on our side may still be applied by GitHub later: the lock-delay after a reclaim and
the full-state bodies cover that, tasks/github/publisher.py.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, final

from sqlalchemy import Connection, RowMapping

from storage import _leasing as leasing
from storage import _statements as statements
from storage.database import Database
from storage.errors import ApplyNotFound, EffectWindowBusy, FenceClosed, LeaseLost


def open_window(db: Database, apply_id: int, *, epoch: int, token: str, seconds: float) -> None:
    """Open or extend the effect window of the lease (apply_id, epoch, token)."""
    with db.transaction() as conn:
        opened = conn.execute(
            statements.open_effect_window(apply_id, epoch=epoch, token=token, seconds=seconds)
        )
        if opened.rowcount == 1:
            return
        row = conn.execute(statements.effect_window_row(apply_id)).one_or_none()
    if row is None:
        raise ApplyNotFound(apply_id)
    if row.lease_epoch != epoch or row.lease_token != token:
        raise LeaseLost(apply_id, epoch, current_epoch=row.lease_epoch)
    raise EffectWindowBusy(apply_id, int(row.effect_epoch), max(0.0, float(row.remaining or 0)))


def close_window(db: Database, apply_id: int, *, epoch: int) -> None:
    """The epoch's calls are over (answered): close its window, even if the lease moved on
    meanwhile (a finishing rotation while the last running edit was in flight), so that the
    next epoch's first call need not wait for it to run out. Only a call left without an
    answer keeps its window open to its end."""
    with db.transaction() as conn:
        conn.execute(statements.close_effect_window(apply_id, epoch=epoch))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What an effect renders and whom it addresses, read in one transaction."""

    apply: RowMapping
    tasks: list[RowMapping]
    comment: RowMapping | None  # the record of the apply's progress comment
    check: RowMapping | None  # the record of its check run


def snapshot(db: Database, apply_id: int, *, comment_kind: str) -> Snapshot:
    with db.transaction() as conn:
        apply = conn.execute(statements.apply_row(apply_id)).mappings().one_or_none()
        if apply is None:
            raise ApplyNotFound(apply_id)
        tasks = list(conn.execute(statements.apply_task_rows(apply_id)).mappings())
        comment = (
            conn.execute(statements.comment_row(apply_id, comment_kind)).mappings().one_or_none()
        )
        check = conn.execute(statements.check_row(apply_id)).mappings().one_or_none()
    return Snapshot(apply, tasks, comment, check)


@final
class EffectFenced:
    """An open transaction in which the lease was proven current (in any state of its apply)
    and the apply row is locked: where an effect's answer is recorded."""

    __slots__ = ("_conn", "_open", "apply_id", "epoch")

    def __init__(self, conn: Connection, apply_id: int, epoch: int, *, _proof: object) -> None:
        if _proof is not _PROOF:
            raise FenceClosed("an EffectFenced handle is only made by effect_fence()")
        self._conn = conn
        self._open = True
        self.apply_id = apply_id
        self.epoch = epoch

    def _connection(self) -> Connection:
        if not self._open:
            raise FenceClosed(f"the effect fence of apply {self.apply_id} is closed")
        return self._conn

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"EffectFenced(apply_id={self.apply_id}, epoch={self.epoch}, {state})"


_PROOF: Final = object()


@contextmanager
def effect_fence(db: Database, apply_id: int, epoch: int, token: str) -> Iterator[EffectFenced]:
    with db.transaction() as conn:
        found = conn.execute(statements.effect_fence(apply_id, token)).scalar_one_or_none()
        if found is None:
            raise leasing.explain_mismatch(conn, apply_id, epoch, token, wanted="publish")
        if found != epoch:
            raise LeaseLost(apply_id, epoch, current_epoch=found, reason="epoch does not match")
        handle = EffectFenced(conn, apply_id, epoch, _proof=_PROOF)
        try:
            yield handle
        finally:
            handle._open = False


def record_comment(
    fx: EffectFenced, *, kind: str, github_comment_id: int, body_sha256: str
) -> None:
    """Record a comment creation or edit (GitHub's answer)."""
    _record(
        fx,
        statements.record_comment(
            fx.apply_id,
            kind=kind,
            epoch=fx.epoch,
            github_comment_id=github_comment_id,
            body_sha256=body_sha256,
        ),
    )


def record_check(
    fx: EffectFenced, *, check_run_id: int, status: str, conclusion: str | None = None
) -> None:
    """Record a check run's creation or update (GitHub's answer)."""
    _record(
        fx,
        statements.record_check(
            fx.apply_id,
            epoch=fx.epoch,
            check_run_id=check_run_id,
            status=status,
            conclusion=conclusion,
        ),
    )


def settle(fx: EffectFenced) -> None:
    """The stopped or final state is published: the pull request is owed nothing more. Fenced,
    so that a publication made for a lease that has moved on (a resume, a retry) settles
    nothing."""
    fx._connection().execute(statements.publication_settled(fx.apply_id))


def _record(fx: EffectFenced, upsert: statements.Upsert) -> None:
    # Update-then-insert is race-free here: the fence's row lock serializes every writer of
    # this apply, so nobody inserts the row between the two.
    conn = fx._connection()
    if conn.execute(upsert.update).rowcount == 0:
        conn.execute(upsert.insert)
