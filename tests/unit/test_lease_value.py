"""The Lease value: JSON round trip, strict validation, and a repr that never leaks the token."""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import FrozenInstanceError
from typing import Any

import pytest

from leases import Lease, mint_token
from leases.reclaim import Reclaimed
from storage.errors import (
    ApplyNotFound,
    InvalidInput,
    InvalidLease,
    InvalidTransition,
    LeaseholdError,
    LeaseLost,
)

TOKEN = "0123456789abcdef0123456789abcdef"


def good() -> dict[str, Any]:
    return {"apply_id": 7, "epoch": 3, "token": TOKEN}


def test_json_round_trip() -> None:
    lease = Lease(7, 3, mint_token())
    wire = json.dumps(lease.to_json())
    assert json.loads(wire) == {"apply_id": 7, "epoch": 3, "token": lease.token}
    assert Lease.from_json(json.loads(wire)) == lease


def test_minted_tokens_have_the_lease_shape_and_differ() -> None:
    tokens = {mint_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert Lease(1, 1, token).token == token


def test_largest_ids_are_accepted() -> None:
    big, epoch = 2**63 - 1, 2**31 - 1  # BIGINT ids, INT epochs on every store
    lease = Lease.from_json({"apply_id": big, "epoch": epoch, "token": TOKEN})
    assert (lease.apply_id, lease.epoch) == (big, epoch)


def _with(**changes: Any) -> dict[str, Any]:
    data = good()
    for key, value in changes.items():
        if value is _DROP:
            del data[key]
        else:
            data[key] = value
    return data


_DROP = object()

BAD_PAYLOADS: list[tuple[str, object]] = [
    ("missing apply_id", _with(apply_id=_DROP)),
    ("missing epoch", _with(epoch=_DROP)),
    ("missing token", _with(token=_DROP)),
    ("empty object", {}),
    ("unknown key", {**good(), "owner": "w1"}),
    ("unknown key instead of token", {**_with(token=_DROP), "tok": TOKEN}),
    ("bool apply_id", _with(apply_id=True)),
    ("bool epoch", _with(epoch=True)),
    ("str apply_id", _with(apply_id="7")),
    ("str epoch", _with(epoch="3")),
    ("float epoch", _with(epoch=3.0)),
    ("null epoch", _with(epoch=None)),
    ("zero epoch", _with(epoch=0)),
    ("negative epoch", _with(epoch=-1)),
    ("zero apply_id", _with(apply_id=0)),
    ("negative apply_id", _with(apply_id=-7)),
    ("apply_id beyond BIGINT", _with(apply_id=2**63)),
    ("epoch beyond INT", _with(epoch=2**31)),
    ("epoch far beyond INT", _with(epoch=2**62)),
    ("token too short", _with(token=TOKEN[:-1])),
    ("token too long", _with(token=TOKEN + "0")),
    ("token empty", _with(token="")),
    ("token uppercase", _with(token=TOKEN.upper())),
    ("token one uppercase char", _with(token="A" + TOKEN[1:])),
    ("token non-hex", _with(token="g" + TOKEN[1:])),
    ("token with trailing newline", _with(token=TOKEN[:-1] + "\n")),
    ("token with spaces", _with(token=" " + TOKEN[1:])),
    ("token as int", _with(token=int(TOKEN, 16))),
    ("token as bytes", _with(token=TOKEN.encode())),
    ("token null", _with(token=None)),
    ("list", [7, 3, TOKEN]),
    ("JSON text instead of object", json.dumps(good())),
    ("null", None),
    ("int", 7),
]


@pytest.mark.parametrize(("why", "payload"), BAD_PAYLOADS, ids=[w for w, _ in BAD_PAYLOADS])
def test_from_json_rejects(why: str, payload: object) -> None:
    with pytest.raises(InvalidLease) as caught:
        Lease.from_json(payload)
    # One family for every malformed input; the message never echoes a token back.
    assert isinstance(caught.value, InvalidInput)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, LeaseholdError)
    assert TOKEN not in str(caught.value)
    assert TOKEN.upper() not in str(caught.value)


@pytest.mark.parametrize(
    ("apply_id", "epoch", "token"),
    [(0, 1, TOKEN), (1, 0, TOKEN), (1, -1, TOKEN), (True, 1, TOKEN), (1, 1, TOKEN.upper())],
)
def test_constructor_validates_too(apply_id: Any, epoch: Any, token: Any) -> None:
    with pytest.raises(InvalidLease):
        Lease(apply_id, epoch, token)


def test_lease_is_immutable() -> None:
    lease = Lease(1, 1, TOKEN)
    with pytest.raises(FrozenInstanceError):
        lease.epoch = 2  # type: ignore[misc]


def test_repr_and_str_show_epoch_and_at_most_a_short_prefix() -> None:
    lease = Lease(42, 9, mint_token())
    for text in (repr(lease), str(lease), f"{lease}", repr([lease]), repr({"l": lease})):
        assert lease.token not in text
        assert "epoch=9" in text
        assert "apply_id=42" in text
    # Whatever is shown of the token is a short prefix: at most 8 characters of it.
    shown = max(n for n in range(len(lease.token) + 1) if lease.token[:n] in repr(lease))
    assert 0 <= shown <= 8
    reclaimed = Reclaimed(42, 8, "running", lease)
    assert lease.token not in repr(reclaimed)


@pytest.mark.parametrize(
    "exc",
    [
        LeaseLost(3, 4, current_epoch=6, state="dispatched"),
        LeaseLost(3, 9, current_epoch=8, reason="never issued"),
        ApplyNotFound(5),
        InvalidTransition(3, "running", "dispatch"),
    ],
    ids=repr,
)
def test_errors_survive_pickle_and_copy(exc: LeaseholdError) -> None:
    """Celery's prefork pool pickles exceptions between processes; ``copy`` and ``pickle``
    must rebuild them from their fields, not call ``__init__`` with the message."""
    for again in (pickle.loads(pickle.dumps(exc)), copy.copy(exc), copy.deepcopy(exc)):
        assert type(again) is type(exc)
        assert str(again) == str(exc)
        assert again.args == exc.args
        assert vars(again) == vars(exc)
