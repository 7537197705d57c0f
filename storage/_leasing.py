"""Lease row operations on an open connection. Each is one statement whose precondition is in its
WHERE clause; zero matched rows is turned into a named error by :func:`explain_mismatch`.

These take a ``Connection`` so that a caller can compose them into one transaction (reclaim
rotates and logs together). Minting tokens and deciding *when* to rotate is ``leases``' job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import Connection

from storage import _statements as statements
from storage.errors import ApplyNotFound, InvalidTransition, LeaseLost, StorageIntegrityError
from storage.states import ApplyState


@dataclass(frozen=True, slots=True)
class LeaseRow:
    apply_id: int
    state: str
    epoch: int
    token: str | None = field(repr=False)  # never a whole token in a repr or a log
    owner: str | None = None
    reclaim_count: int = 0


def read(conn: Connection, apply_id: int) -> LeaseRow:
    row = conn.execute(statements.read_lease_row(apply_id)).one_or_none()
    if row is None:
        raise ApplyNotFound(apply_id)
    return LeaseRow(row.id, row.state, row.lease_epoch, row.lease_token)


def lock(conn: Connection, apply_id: int) -> LeaseRow:
    """Lock the apply row until the transaction ends and return its lease columns."""
    row = conn.execute(statements.lock_apply(apply_id)).one_or_none()
    if row is None:
        raise ApplyNotFound(apply_id)
    return LeaseRow(row.id, row.state, row.lease_epoch, row.lease_token, row.lease_owner)


def explain_mismatch(
    conn: Connection, apply_id: int, epoch: int, token: str | None, *, wanted: str
) -> Exception:
    """Why a lease-predicated statement matched no row: the apply is gone, the lease moved on, or
    the apply is not in a state that allows ``wanted``."""
    try:
        row = read(conn, apply_id)
    except ApplyNotFound as exc:
        return exc
    if row.epoch != epoch or row.token != token:
        return LeaseLost(apply_id, epoch, current_epoch=row.epoch, state=row.state)
    return LeaseLost(
        apply_id, epoch, state=row.state, reason=f"the apply is {row.state}, cannot {wanted}"
    )


def fence(conn: Connection, apply_id: int, epoch: int, token: str) -> None:
    """Prove (apply_id, epoch, token) is the current lease of a running apply and lock its row."""
    found = conn.execute(statements.fence(apply_id, token)).scalar_one_or_none()
    if found is None:
        raise explain_mismatch(conn, apply_id, epoch, token, wanted="write")
    if found != epoch:
        # Same token, other epoch: only a forged lease gets here, since tokens are never reused.
        raise LeaseLost(apply_id, epoch, current_epoch=found, reason="epoch does not match")


def rotate(
    conn: Connection,
    row: LeaseRow,
    *,
    new_token: str,
    to_state: str,
    event: str,
    reason: str,
    from_states: Iterable[str] | None = None,
    reclaimed: bool = False,
    error: str | None = None,
) -> int:
    """Compare-and-swap the lease from ``row``'s (epoch, token) to ``new_token`` and log the
    rotation at the new epoch, both in the caller's transaction. Returns the new epoch.

    ``from_states`` defaults to ``row.state``: the apply must still be in the state the caller saw.
    A rotation to a terminal state also fails the apply's control requests still pending (every
    request ends: complete the one being acted on before calling this) and makes its completion
    notification due (``storage.notifications``); a rotation to a terminal state or to stopped
    makes the publication of that state on its pull request due (``storage.publications``); all
    in the same transaction.
    """
    allowed = [row.state] if from_states is None else list(from_states)
    result = conn.execute(
        statements.rotate(
            row.apply_id,
            old_epoch=row.epoch,
            old_token=row.token,
            new_token=new_token,
            from_states=allowed,
            to_state=to_state,
            reclaimed=reclaimed,
            error=error,
        )
    )
    if result.rowcount != 1:
        now = read(conn, row.apply_id)
        if now.epoch != row.epoch or now.token != row.token:
            raise LeaseLost(row.apply_id, row.epoch, current_epoch=now.epoch, state=now.state)
        raise InvalidTransition(row.apply_id, now.state, f"move to {to_state}")
    epoch = row.epoch + 1
    if ApplyState(to_state).terminal:
        conn.execute(statements.fail_pending_control_requests(row.apply_id, apply_state=to_state))
        conn.execute(statements.notification_due(row.apply_id))
    if ApplyState(to_state).terminal or to_state == ApplyState.STOPPED:
        conn.execute(statements.publication_due(row.apply_id, dialect=conn.dialect.name))
    level = "error" if to_state == "failed" else "info"
    append_log(
        conn,
        row.apply_id,
        epoch=epoch,
        level=level,
        event=event,
        message=f"epoch {epoch}: {reason}",
    )
    return epoch


def redeem(conn: Connection, apply_id: int, *, epoch: int, token: str, owner: str) -> None:
    """Claim a dispatched lease that nobody has claimed yet.

    Raises ``LeaseLost`` for a duplicate message (already redeemed), a stale one (rotated since)
    or a lease that was never issued; nothing is written in any of these cases.
    """
    result = conn.execute(statements.redeem(apply_id, epoch=epoch, token=token, owner=owner))
    if result.rowcount == 1:
        return
    row = read(conn, apply_id)
    if epoch > row.epoch:
        raise LeaseLost(apply_id, epoch, current_epoch=row.epoch, reason="never issued")
    if row.epoch != epoch or row.token != token:
        raise LeaseLost(apply_id, epoch, current_epoch=row.epoch, state=row.state)
    reason = "already redeemed" if row.state == "running" else f"the apply is {row.state}"
    raise LeaseLost(apply_id, epoch, state=row.state, reason=reason)


def heartbeat(conn: Connection, apply_id: int, *, epoch: int, token: str) -> None:
    result = conn.execute(statements.heartbeat(apply_id, epoch=epoch, token=token))
    if result.rowcount != 1:
        raise explain_mismatch(conn, apply_id, epoch, token, wanted="heartbeat")


@dataclass(frozen=True, slots=True)
class Renewed:
    """What one batched heartbeat found, by apply id."""

    renewed: frozenset[int]
    lost: dict[int, LeaseLost]
    busy: frozenset[int]  # locked by another transaction now: neither renewed nor lost


def renew_held(conn: Connection, held: Iterable[tuple[int, int, str]]) -> Renewed:
    """Renew every lease in ``held`` ((apply id, epoch, token) each) that is still current, in
    two statements whatever their number: lock and read the rows, then renew those that match.

    A lease is lost only when its row, read under the lock, proves it (another epoch or token, a
    state other than running, or no row); a row locked by another transaction is skipped.
    """
    wanted = {apply_id: (epoch, token) for apply_id, epoch, token in held}
    rows = {r.id: r for r in conn.execute(statements.lock_held(wanted))}
    current: list[tuple[int, int, str]] = []
    lost: dict[int, LeaseLost] = {}
    busy: set[int] = set()
    missing, exist = set(wanted) - set(rows), set()
    if missing:  # skipped because locked, or gone: one plain read tells which
        exist = {r.id for r in conn.execute(statements.existing_apply_ids(missing))}
    for apply_id, (epoch, token) in wanted.items():
        row = rows.get(apply_id)
        if row is None:
            if apply_id in exist:
                busy.add(apply_id)
            else:
                lost[apply_id] = LeaseLost(apply_id, epoch, reason="the apply does not exist")
        elif row.lease_epoch != epoch or row.lease_token != token:
            lost[apply_id] = LeaseLost(
                apply_id, epoch, current_epoch=row.lease_epoch, state=row.state
            )
        elif row.state != ApplyState.RUNNING:
            lost[apply_id] = LeaseLost(
                apply_id,
                epoch,
                state=row.state,
                reason=f"the apply is {row.state}, cannot heartbeat",
            )
        else:
            current.append((apply_id, epoch, token))
    if current:
        renewed = conn.execute(statements.renew_held(current)).rowcount
        if renewed != len(current):
            # The rows are locked by this transaction: nothing can have moved them.
            raise StorageIntegrityError(
                f"a batched heartbeat renewed {renewed} of {len(current)} locked leases"
            )
    return Renewed(frozenset(a for a, _, _ in current), lost, frozenset(busy))


def check(conn: Connection, apply_id: int, *, epoch: int, token: str) -> LeaseRow:
    row = read(conn, apply_id)
    if row.epoch != epoch or row.token != token:
        raise LeaseLost(apply_id, epoch, current_epoch=row.epoch, state=row.state)
    if row.state != "running":
        raise LeaseLost(apply_id, epoch, state=row.state, reason=f"the apply is {row.state}")
    return row


def stale(conn: Connection, state: str, *, older_than: float, limit: int) -> list[LeaseRow]:
    rows = conn.execute(statements.stale_candidates(state, older_than=older_than, limit=limit))
    return [
        LeaseRow(r.id, r.state, r.lease_epoch, r.lease_token, reclaim_count=r.reclaim_count)
        for r in rows
    ]


def owe_dispatch(conn: Connection, apply_id: int, *, epoch: int) -> bool:
    """Record that ``run_apply`` for ``epoch`` is still owed; False if that lease is no longer
    the apply's current, unredeemed one (nothing is owed then)."""
    return bool(conn.execute(statements.owe_dispatch(apply_id, epoch=epoch)).rowcount == 1)


def owed_dispatches(conn: Connection, *, limit: int) -> list[LeaseRow]:
    rows = conn.execute(statements.owed_dispatches(limit))
    return [LeaseRow(r.id, ApplyState.DISPATCHED, r.lease_epoch, r.lease_token) for r in rows]


def dispatch_sent(conn: Connection, apply_id: int, *, epoch: int) -> None:
    conn.execute(statements.dispatch_sent(apply_id, epoch=epoch))


def rotation_event(conn: Connection, apply_id: int, epoch: int) -> str:
    """The event logged by the rotation that minted ``epoch`` (its first log line)."""
    event = conn.execute(statements.rotation_event(apply_id, epoch)).scalar_one_or_none()
    return str(event) if event is not None else "unknown"


def append_log(
    conn: Connection, apply_id: int, *, epoch: int, level: str, event: str, message: str
) -> None:
    """A log line written by a lease transition (the caller holds the apply row lock)."""
    conn.execute(
        statements.append_log(apply_id, epoch=epoch, level=level, event=event, message=message)
    )
