"""The store's clock is UTC (DESIGN invariant 6): heartbeats, staleness and every ``*_at`` column
follow ``UTC_TIMESTAMP(6)``, so a daylight-saving change of a server that runs in local time moves
nothing. Proven on a private ``mariadbd`` whose global ``time_zone`` the tests move (never on the
shared server), with every leasehold session killed after each move, so that the pool reconnects
under the new zone as it would after any blip.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from leases import heartbeat, reclaim
from storage import open_database
from storage.database import Database
from storage.migrate import upgrade
from tests import support
from tests.contract.test_migrations import _migrate_to
from tests.servers import PrivateMariaDB, private_mariadb

pytestmark = pytest.mark.mysql

STALE_AFTER = 30.0
POLICY = support.reclaim_policy(stale_after=STALE_AFTER, dispatch_timeout=120, max_reclaims=3)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateMariaDB]:
    with private_mariadb(tmp_path / "store", time_zone="+01:00") as server:
        yield server


@pytest.fixture
def store(server: PrivateMariaDB) -> Iterator[Database]:
    db = open_database(server.create_database("leasehold"))
    try:
        upgrade(db)
        yield db
    finally:
        db.dispose()


def _move_clock(server: PrivateMariaDB, zone: str) -> None:
    """What a daylight-saving change does to ``NOW()`` on a server in local time; then every
    client session is cut, so that new ones start under the new zone."""
    server.execute(f"SET GLOBAL time_zone = '{zone}'")
    for (session,) in server.execute(
        "SELECT ID FROM information_schema.PROCESSLIST "
        "WHERE ID <> CONNECTION_ID() AND COMMAND <> 'Daemon' AND USER = 'root'"
    ):
        server.execute(f"KILL CONNECTION {int(session):d}")


def _local_minus_utc(server: PrivateMariaDB) -> float:
    """How far the server's local clock (NOW() in a session of its global zone) is from UTC."""
    ((seconds,),) = server.execute("SELECT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW())")
    return float(seconds)


def test_sessions_run_in_utc_and_timestamps_are_utc(
    server: PrivateMariaDB, store: Database
) -> None:
    assert _local_minus_utc(server) == 3600  # the server runs an hour ahead of UTC
    with store.transaction() as conn:
        assert conn.execute(text("SELECT @@session.time_zone")).scalar_one() == "+00:00"
    lease = support.running_lease(store)
    ((skew,),) = server.execute(
        f"SELECT TIMESTAMPDIFF(SECOND, heartbeat_at, UTC_TIMESTAMP()) FROM leasehold.applies "
        f"WHERE id = {lease.apply_id:d}"
    )
    assert 0 <= int(skew) < 5


def test_spring_forward_makes_no_heartbeat_stale(server: PrivateMariaDB, store: Database) -> None:
    lease = support.running_lease(store)
    heartbeat(store, lease)
    _move_clock(server, "+02:00")
    assert _local_minus_utc(server) == 7200  # NOW() jumped an hour forward
    before = support.snapshot(store)
    assert reclaim(store, POLICY) == []  # the pool reconnected under +02:00: still no reclaim
    assert support.snapshot(store) == before
    heartbeat(store, lease)


def test_fall_back_still_reclaims_a_dead_holder_in_time(
    server: PrivateMariaDB, store: Database
) -> None:
    lease = support.running_lease(store)
    heartbeat(store, lease)
    _move_clock(server, "-01:00")  # two hours back, the case
    assert _local_minus_utc(server) == -3600
    # The holder died right after that heartbeat; stale_after later (written, not slept):
    support.age_heartbeat(store, lease.apply_id, STALE_AFTER + 1)
    (done,) = reclaim(store, POLICY)
    assert done.apply_id == lease.apply_id
    assert done.from_state == "running"


def test_upgrade_moves_local_timestamps_to_utc(server: PrivateMariaDB) -> None:
    """Rows written by leasehold before revision 0004 hold the server's local time."""
    db = open_database(server.create_database("old"))
    try:
        with db.engine.begin() as conn:
            _migrate_to(conn, "0003")
        local = dt.datetime(2026, 3, 1, 13, 0, 0, 250000)
        with db.transaction() as conn:
            conn.execute(
                text(
                    "INSERT INTO applies (id, state, database_name, environment, engine, "
                    "lease_epoch, heartbeat_at, created_at, updated_at) "
                    "VALUES (1, 'running', 'd', 'e', 'sleep', 1, :t, :t, :t)"
                ),
                {"t": local},
            )
            conn.execute(text("UPDATE marks SET at = :t"), {"t": local})
        upgrade(db)
        utc = local - dt.timedelta(hours=1)
        with db.transaction() as conn:
            row = conn.execute(
                text("SELECT heartbeat_at, created_at, finished_at FROM applies")
            ).one()
            assert (row.heartbeat_at, row.created_at, row.finished_at) == (utc, utc, None)
            assert conn.execute(text("SELECT at FROM marks")).scalar_one() == utc
    finally:
        db.dispose()
