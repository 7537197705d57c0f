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
