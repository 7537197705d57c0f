"""The one error hierarchy of leasehold.

Every error leasehold raises on purpose derives from :class:`LeaseholdError`. Driver errors are
translated into :class:`StorageError` subclasses at the storage boundary (``raise ... from exc``),
so callers above ``storage`` never catch SQLAlchemy or driver exceptions.

It lives in ``storage`` because ``storage`` is the lowest layer and raises most of them; ``leases``
re-exports the lease errors under their public names.
"""

from __future__ import annotations

from functools import partial
from typing import Any


class LeaseholdError(Exception):
    """Base of every error leasehold raises on purpose."""


class InvalidInput(LeaseholdError, ValueError):
    """Input from outside (a message, a file, a CLI argument) is malformed. Nothing was written."""


class InvalidLease(InvalidInput):
    """A lease that is not even well formed (wrong types, bad token shape)."""


class ConfigurationError(LeaseholdError):
    """A setting is missing, malformed or contradicts another setting."""


class LeaseError(LeaseholdError):
    """A lease operation could not be carried out."""


class ApplyNotFound(LeaseError, LookupError):
    """No apply has this id."""

    def __init__(self, apply_id: int) -> None:
        super().__init__(f"apply {apply_id} does not exist")
        self.apply_id = apply_id

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the constructor's arguments, not from the message (pickle, copy, Celery).
        return (type(self), (self.apply_id,), self.__dict__)


class LeaseLost(LeaseError):
    """The lease is no longer current: it was rotated, released, or its apply left ``running``.

    Raised only when a successful read or write proves it, never for a connection error. The
    message carries epochs and states, never tokens.
    """

    def __init__(
        self,
        apply_id: int,
        epoch: int,
        *,
        current_epoch: int | None = None,
        state: str | None = None,
        reason: str | None = None,
    ) -> None:
        detail = reason or "the lease is no longer current"
        parts = [f"apply {apply_id}: lease epoch {epoch} lost: {detail}"]
        if current_epoch is not None:
            parts.append(f"current epoch {current_epoch}")
        if state is not None:
            parts.append(f"state {state}")
        super().__init__(", ".join(parts))
        self.apply_id = apply_id
        self.epoch = epoch
        self.current_epoch = current_epoch
        self.state = state
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild = partial(
            type(self),
            self.apply_id,
            self.epoch,
            current_epoch=self.current_epoch,
            state=self.state,
            reason=self.reason,
        )
        return (rebuild, (), self.__dict__)


class InvalidTransition(LeaseholdError):
    """The apply is not in a state from which the requested change is allowed."""

    def __init__(self, apply_id: int, state: str, wanted: str) -> None:
        super().__init__(f"apply {apply_id} is {state}: cannot {wanted}")
        self.apply_id = apply_id
        self.state = state
        self.wanted = wanted

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.apply_id, self.state, self.wanted), self.__dict__)


class EffectWindowBusy(LeaseError):
    """An earlier epoch's external call may still be in flight: its effect window is open for
    ``remaining`` more seconds (by the store's clock). Wait, then try again."""

    def __init__(self, apply_id: int, epoch: int, remaining: float) -> None:
        super().__init__(
            f"apply {apply_id}: an effect of epoch {epoch} may be in flight for {remaining:.2f}s"
        )
        self.apply_id = apply_id
        self.epoch = epoch
        self.remaining = remaining

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.apply_id, self.epoch, self.remaining), self.__dict__)


class RowNotFound(LeaseholdError, LookupError):
    """A row an owned write targets (an apply task, a control request) does not exist."""


class FenceClosed(LeaseholdError, RuntimeError):
    """A fenced handle was used after its transaction ended, or for a write its fence does not
    cover (ending an apply without holding its line): a programming error."""


class StorageError(LeaseholdError):
    """The database refused or failed an operation."""


class StorageUnavailable(StorageError):
    """The database could not be reached or the connection broke. Retry; it is not a lost lease."""


class StorageBusy(StorageError):
    """A lock wait timed out or a deadlock was broken. Retry the whole transaction."""


class SerializationFailure(StorageBusy):
    """PostgreSQL under REPEATABLE READ: the transaction waited for a row that another one then
    changed, and was rolled back. ``Database.attempts`` runs it again with a fresh snapshot."""


class StorageIntegrityError(StorageError):
    """A constraint was violated (a duplicate, a dangling reference)."""


class SchemaError(StorageError):
    """The database is foreign, or its schema is not at a revision this code knows."""
