"""The lease value: the right to act for one apply, carried in every worker message."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

from storage.errors import InvalidLease

TOKEN_BYTES: Final = 16  # 128 random bits: unguessable, so a lease cannot be forged
_TOKEN_RE: Final = re.compile(r"[0-9a-f]{32}")
_KEYS: Final = frozenset({"apply_id", "epoch", "token"})
_MAX_ID: Final = 2**63 - 1  # apply ids are BIGINT on every store
# Epochs are INT columns on every store: a larger one was never issued, and PostgreSQL would
# refuse it as a parameter (out of range) rather than find no row.
_MAX_EPOCH: Final = 2**31 - 1
_SHOWN: Final = 6  # token characters a repr may show


def mint_token() -> str:
    return secrets.token_hex(TOKEN_BYTES)


@dataclass(frozen=True, slots=True)
class Lease:
    apply_id: int
    epoch: int
    token: str

    def __post_init__(self) -> None:
        _check_int("apply_id", self.apply_id, minimum=1, maximum=_MAX_ID)
        _check_int("epoch", self.epoch, minimum=1, maximum=_MAX_EPOCH)
        if not isinstance(self.token, str) or not _TOKEN_RE.fullmatch(self.token):
            raise InvalidLease("lease token must be 32 lowercase hex characters")

    def to_json(self) -> dict[str, Any]:
        return {"apply_id": self.apply_id, "epoch": self.epoch, "token": self.token}

    @classmethod
    def from_json(cls, data: object) -> Lease:
        """Strictly validate a lease from a message: exact keys, exact types, token shape."""
        if not isinstance(data, dict):
            raise InvalidLease(f"lease must be a JSON object, not {type(data).__name__}")
        keys = set(data)
        if keys != _KEYS:
            missing = sorted(_KEYS - keys)
            unknown = sorted(str(k) for k in keys - _KEYS)
            raise InvalidLease(f"lease keys wrong: missing {missing}, unknown {unknown}")
        return cls(apply_id=data["apply_id"], epoch=data["epoch"], token=data["token"])

    @property
    def token_prefix(self) -> str:
        return self.token[:_SHOWN]

    def __repr__(self) -> str:
        # Never the whole token: reprs end up in logs, Flower and tracebacks.
        return f"Lease(apply_id={self.apply_id}, epoch={self.epoch}, token={self.token_prefix}…)"

    __str__ = __repr__


def _check_int(name: str, value: object, *, minimum: int, maximum: int) -> None:
    # bool is an int subclass; a JSON true must not pass for an id.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidLease(f"lease {name} must be an integer, not {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidLease(f"lease {name} out of range: {value}")
