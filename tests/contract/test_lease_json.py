"""The lease value against a real store: a dispatched lease round-trips through JSON, and LeaseLost
messages never carry a token (SQLite and MariaDB)."""

from __future__ import annotations

import json
import traceback
from typing import Any

import pytest

from leases import Lease, dispatch, fence, heartbeat, mint_token, redeem
from storage.database import Database
from storage.errors import LeaseLost
from tests import support
from tests.support import hand_back

TOKEN = "0123456789abcdef0123456789abcdef"


def good() -> dict[str, Any]:
    return {"apply_id": 7, "epoch": 3, "token": TOKEN}


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


def _lease_lost_texts(exc: LeaseLost) -> list[str]:
    return [str(exc), repr(exc), *map(str, exc.args), "".join(traceback.format_exception(exc))]


def test_lease_lost_messages_never_carry_a_token(db: Database) -> None:
    lease = support.running_lease(db)
    new = hand_back(db, lease, reason="tests")
    tokens = {lease.token, new.token}
    caught: list[LeaseLost] = []

    def expect_lost(action: Any) -> None:
        with pytest.raises(LeaseLost) as info:
            action()
        caught.append(info.value)

    def fenced_write(stale: Lease) -> None:
        with fence(db, stale):
            pass

    expect_lost(lambda: heartbeat(db, lease))
    expect_lost(lambda: fenced_write(lease))
    expect_lost(lambda: redeem(db, lease, "worker-2"))
    redeem(db, new, "worker-2")
    expect_lost(lambda: redeem(db, new, "worker-3"))  # already redeemed
    forged = Lease(lease.apply_id, new.epoch, mint_token())
    tokens.add(forged.token)
    expect_lost(lambda: fenced_write(forged))
    expect_lost(lambda: heartbeat(db, forged))
    expect_lost(lambda: redeem(db, Lease(lease.apply_id, new.epoch + 5, mint_token()), "w"))

    assert len(caught) == 7
    for exc in caught:
        assert exc.apply_id == lease.apply_id
        for text in _lease_lost_texts(exc):
            for token in tokens:
                assert token not in text
                assert token[:8] not in text


def test_dispatched_lease_round_trips_through_json(db: Database) -> None:
    lease = dispatch(db, support.new_apply(db))
    again = Lease.from_json(json.loads(json.dumps(lease.to_json())))
    redeem(db, again, "worker-1")
    assert support.lease_of(db, lease.apply_id)[:2] == ("running", lease.epoch)
