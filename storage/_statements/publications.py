"""Publications: what a pull request is still owed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    ColumnElement,
    Insert,
    Select,
    Update,
    bindparam,
    func,
    literal,
    select,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite

from storage import clock
from storage.states import TERMINAL_APPLY_STATES, ApplyState
from storage.tables import applies, publications

_PUBLISHED_STATES = [ApplyState.STOPPED, *sorted(TERMINAL_APPLY_STATES)]


def publication_due(apply_id: int, *, dialect: str) -> Insert:
    """The apply stopped or ended: its pull request is owed that state. Run by those rotations,
    in their transaction, as one upsert (a fresh row, or the owed state reset on the apply's
    row); an apply without a pull request owes nothing (the insert selects no row)."""
    has_pull_request = (
        applies.c.repository.is_not(None)
        & applies.c.pull_request.is_not(None)
        & applies.c.head_sha.is_not(None)
    )
    # A WHERE clause always, which SQLite's parser needs before ON CONFLICT.
    source = select(applies.c.id, clock.now(), literal(None), literal(0), literal(None)).where(
        applies.c.id == apply_id, has_pull_request
    )
    columns = ["apply_id", "due_at", "claimed_at", "attempts", "last_error"]
    owed = {"due_at": clock.now(), "claimed_at": None, "attempts": 0, "last_error": None}
    if dialect in ("mysql", "mariadb"):
        return mysql.insert(publications).from_select(columns, source).on_duplicate_key_update(owed)
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        dialect_insert(publications)
        .from_select(columns, source)
        .on_conflict_do_update(index_elements=[publications.c.apply_id], set_=owed)
    )


def _publication_free(expiry: float) -> ColumnElement[bool]:
    """Due now, and nobody at work on it (never claimed, or the claim is ``expiry`` old)."""
    return (publications.c.due_at <= clock.now()) & (
        publications.c.claimed_at.is_(None)
        | (publications.c.claimed_at < clock.now_minus(bindparam("expiry", expiry)))
    )


def owed_publications(*, expiry: float, limit: int) -> Select[Any]:
    """Publications due now and free to claim, of applies still stopped or ended, oldest first.
    (One owed by an apply that was resumed since is left alone: its holder publishes.)"""
    return (
        select(publications.c.apply_id)
        .join(applies, applies.c.id == publications.c.apply_id)
        .where(_publication_free(expiry), applies.c.state.in_(_PUBLISHED_STATES))
        .order_by(publications.c.due_at)
        .limit(limit)
    )


def claim_publication(apply_id: int, *, expiry: float) -> Update:
    """Take an owed publication; zero rows: settled, not due yet, another publisher's, or its
    apply is running again."""
    still_published = (
        select(applies.c.id)
        .where(applies.c.id == apply_id, applies.c.state.in_(_PUBLISHED_STATES))
        .exists()
    )
    return (
        publications.update()
        .where(publications.c.apply_id == apply_id, _publication_free(expiry), still_published)
        .values(claimed_at=clock.now(), attempts=publications.c.attempts + 1)
    )


def publication_lease(apply_id: int) -> Select[Any]:
    """The lease a claimed publication is made under: the apply's current one."""
    return (
        select(
            applies.c.lease_epoch, applies.c.lease_token, applies.c.state, publications.c.attempts
        )
        .join(publications, publications.c.apply_id == applies.c.id)
        .where(applies.c.id == apply_id)
    )


def release_publication(apply_id: int, *, delay: float, error: str | None) -> Update:
    """An attempt failed: free the claim, and let the next one start ``delay`` seconds on."""
    return (
        publications.update()
        .where(publications.c.apply_id == apply_id, publications.c.due_at.is_not(None))
        .values(
            claimed_at=None,
            due_at=clock.now_plus(bindparam("delay", delay)),
            last_error=error,
        )
    )


def publication_settled(apply_id: int) -> Update:
    """Published (in the effect fence that recorded it): nothing more is owed."""
    return (
        publications.update()
        .where(publications.c.apply_id == apply_id)
        .values(due_at=None, claimed_at=None, last_error=None, published_at=clock.now())
    )


def abandon_publication(apply_id: int, *, error: str) -> Update:
    """GitHub refused it for good (a 4xx): owed no more, the reason kept."""
    return (
        publications.update()
        .where(publications.c.apply_id == apply_id)
        .values(due_at=None, claimed_at=None, last_error=error)
    )


def publication_row(apply_id: int) -> Select[Any]:
    return select(publications, clock.age_of(publications.c.due_at).label("overdue")).where(
        publications.c.apply_id == apply_id
    )


def _owed_by_stopped_or_ended() -> ColumnElement[bool]:
    """Owed, by an apply still stopped or ended (one running again is its holder's to publish)."""
    return publications.c.due_at.is_not(None) & applies.c.state.in_(_PUBLISHED_STATES)


def owed_publication_count() -> Select[Any]:
    return (
        select(func.count())
        .select_from(publications.join(applies, applies.c.id == publications.c.apply_id))
        .where(_owed_by_stopped_or_ended())
    )


def oldest_owed_publication() -> Select[Any]:
    return (
        select(func.min(publications.c.due_at))
        .select_from(publications.join(applies, applies.c.id == publications.c.apply_id))
        .where(_owed_by_stopped_or_ended())
    )
