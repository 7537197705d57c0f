"""Lines under races, forced rather than hoped for (issue 7), with the method of
``test_races.py``: one connection holds its transaction open (the line's lock, or an apply's
finishing fence) while others act, and the test proves they wait before letting it commit.

Then the same transitions hammered by threads that start together: two submits, a stop of the
running apply, a cancel of the next one, reclaim passes after an abandoned apply. Whatever the
order, at most one apply of the line is dispatched or running, and every request ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import pytest

import leases
from leases import Lease, Submitted, fence, mint_token, redeem
from storage import _lines as lines
from storage import applies, control, fenced
from storage._lines import Line
from storage.applies import NewApply, NewTask
from storage.database import Database
from storage.errors import LeaseLost
from storage.states import ApplyState, ControlState
from tasks import service
from tests import support
from tests.celery_fixtures import SentLeases
from tests.races import ISOLATIONS, Spawn, Tap, holder_id, prove_blocked

OpenDb = Callable[..., Database]
THREADS = 16


def new(database: str) -> NewApply:
    return NewApply(
        database_name=database,
        environment="production",
        engine="sleep",
        tasks=[NewTask("orders", "ALTER TABLE orders ADD c INT")],
    )


def line_states(db: Database, database: str) -> dict[int, str]:
    """Every apply of the test's line (it is the only one on that database) and its state."""
    return {
        int(r["id"]): str(r["state"])
        for r in applies.lease_table(db, limit=10_000)
        if r["database_name"] == database
    }


def assert_one_turn(db: Database, database: str) -> None:
    """At most one apply of the line is dispatched or running, and it is the oldest unfinished."""
    found = line_states(db, database)
    active = [i for i, s in found.items() if s in ("dispatched", "running")]
    assert len(active) <= 1, found
    unfinished = [i for i, s in found.items() if not ApplyState(s).terminal]
    if active:
        assert active == [min(unfinished)], found


def running_with_next(db: Database) -> tuple[str, Lease, int]:
    """A running apply with one queued behind it: (database, the running lease, the next id)."""
    database = support.new_database()
    first = leases.submit(db, new(database))
    assert first.lease is not None
    redeem(db, first.lease, "worker-1")
    return database, first.lease, leases.submit(db, new(database)).apply_id


# --- forced interleavings -------------------------------------------------------------------------


@ISOLATIONS
def test_two_submits_wait_for_the_line_and_one_takes_the_turn(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    database = support.new_database()
    line = Line(database, "production")
    with db.transaction() as conn:
        lines.lock(conn, line)  # makes the line's row
    holding = open_db(isolation_level=isolation)
    submitters = [open_db(isolation_level=isolation) for _ in range(2)]
    taps = [Tap(s) for s in submitters]
    racers = [
        spawn(f"submit-{i}", partial(leases.submit, s, new(database)))
        for i, s in enumerate(submitters)
    ]
    with holding.transaction() as conn:
        holder = holder_id(holding, conn)
        lines.lock(conn, line)
        for racer, tap in zip(racers, taps, strict=True):
            racer.start()
            prove_blocked(db, racer, tap, holder=holder, what=racer.name, table="apply_lines")
    results: list[Submitted] = [r.result() for r in racers]
    winner = [r for r in results if r.lease is not None]
    assert len(winner) == 1, results
    (loser,) = [r for r in results if r.lease is None]
    assert winner[0].apply_id < loser.apply_id  # the first to hold the line inserted first
    assert line_states(db, database) == {winner[0].apply_id: "dispatched", loser.apply_id: "queued"}


@ISOLATIONS
def test_a_submit_waits_for_the_finishing_apply_of_its_line(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    database, running, second = running_with_next(db)
    finishing, submitting = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(submitting)
    submit = spawn("submit", lambda: leases.submit(submitting, new(database)))
    token = mint_token()
    with fence(finishing, running, finishing=True) as fx:
        holder = holder_id(finishing, support.fence_connection(fx))
        done = fenced.finish(
            fx,
            new_token=mint_token(),
            successor_token=token,
            to_state=ApplyState.COMPLETED,
            event="completed",
            reason="tests",
        )
        submit.start()
        prove_blocked(db, submit, tap, holder=holder, what="the submit", table="apply_lines")
    third: Submitted = submit.result()
    assert third.lease is None  # the second apply took the turn in the finishing transaction
    assert done.successor is not None
    assert done.successor.apply_id == second
    assert line_states(db, database) == {
        running.apply_id: "completed",
        second: "dispatched",
        third.apply_id: "queued",
    }
    redeem(db, Lease(second, done.successor.epoch, token), "worker-2")


@ISOLATIONS
def test_a_cancel_of_the_next_apply_waits_for_the_finishing_one_then_passes_the_turn_on(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """The end of the running apply dispatches the next one; a cancel of that next one, asked
    meanwhile, waits and then cancels it as dispatched: the turn passes to the third, and the
    lease the finishing transaction minted for the second is dead."""
    database, running, second = running_with_next(db)
    third = leases.submit(db, new(database)).apply_id
    finishing, controlling = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(controlling)
    sent = SentLeases()
    cancel = spawn(
        "cancel", lambda: service.control_apply(controlling, second, "cancel", "ops", sent)
    )
    token = mint_token()
    with fence(finishing, running, finishing=True) as fx:
        holder = holder_id(finishing, support.fence_connection(fx))
        done = fenced.finish(
            fx,
            new_token=mint_token(),
            successor_token=token,
            to_state=ApplyState.COMPLETED,
            event="completed",
            reason="tests",
        )
        cancel.start()
        # The request's foreign key waits for the second apply's row, which the finishing
        # transaction holds since it dispatched it.
        prove_blocked(db, cancel, tap, holder=holder, what="the cancel")
    answer: dict[str, Any] = cancel.result()
    assert (answer["request_state"], answer["apply_state"]) == ("completed", "cancelled")
    assert done.successor is not None
    assert [(lease.apply_id, lease.epoch) for lease in sent.leases] == [(third, 1)]
    assert line_states(db, database) == {
        running.apply_id: "completed",
        second: "cancelled",
        third: "dispatched",
    }
    with pytest.raises(LeaseLost):
        redeem(db, Lease(second, done.successor.epoch, token), "late-worker")


@ISOLATIONS
def test_a_stop_asked_while_the_apply_finishes_still_ends(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """The stop's request waits for the finishing transaction, then finds the apply completed and
    fails at once, saying so: it does not stay pending."""
    database, running, _ = running_with_next(db)
    finishing, controlling = open_db(isolation_level=isolation), open_db(isolation_level=isolation)
    tap = Tap(controlling)
    stop = spawn(
        "stop", lambda: service.control_apply(controlling, running.apply_id, "stop", "ops", print)
    )
    with fence(finishing, running, finishing=True) as fx:
        holder = holder_id(finishing, support.fence_connection(fx))
        fenced.finish(
            fx,
            new_token=mint_token(),
            successor_token=mint_token(),
            to_state=ApplyState.COMPLETED,
            event="completed",
            reason="tests",
        )
        stop.start()
        prove_blocked(db, stop, tap, holder=holder, what="the stop")
    answer: dict[str, Any] = stop.result()
    assert (answer["request_state"], answer["apply_state"]) == ("failed", "completed")
    assert answer["error"] == "apply is completed: nothing to stop"
    assert control.pending(db, running.apply_id) == []
    assert_one_turn(db, database)


# --- threads starting together --------------------------------------------------------------------


def _together(spawn: Spawn, fns: Sequence[Callable[[], object]]) -> list[Any]:
    barrier = threading.Barrier(len(fns))

    def after_barrier(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            barrier.wait(timeout=30)
            return fn()

        return run

    racers = [spawn(f"racer-{i}", after_barrier(fn)) for i, fn in enumerate(fns)]
    for racer in racers:
        racer.start()
    return [racer.result() for racer in racers]


@ISOLATIONS
def test_sixteen_submits_at_once_one_takes_the_turn(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    database = support.new_database()
    dbs = [open_db(isolation_level=isolation) for _ in range(THREADS)]
    results: list[Submitted] = _together(
        spawn, [partial(leases.submit, d, new(database)) for d in dbs]
    )
    dispatched = [r.apply_id for r in results if r.lease is not None]
    assert len(dispatched) == 1
    assert dispatched == [min(r.apply_id for r in results)]
    states = line_states(db, database)
    assert sorted(states.values()) == ["dispatched"] + ["queued"] * (THREADS - 1)


@ISOLATIONS
def test_sweeps_and_submits_at_once_dispatch_a_waiting_head_once(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    """A line whose head waits (left by an older leasehold): sweeps and new submits race to
    dispatch it; exactly one lease is minted for the line."""
    database = support.new_database()
    head = applies.create(db, new(database)).apply_id  # queued, nobody dispatched it
    dbs = [open_db(isolation_level=isolation) for _ in range(THREADS)]
    half = THREADS // 2
    results = _together(
        spawn,
        [partial(leases.dispatch_waiting, d) for d in dbs[:half]]
        + [partial(leases.submit, d, new(database)) for d in dbs[half:]],
    )
    minted = [lease for swept in results[:half] for lease in swept]
    minted += [r.lease for r in results[half:] if r.lease is not None]
    assert [(lease.apply_id, lease.epoch) for lease in minted] == [(head, 1)]
    assert_one_turn(db, database)


@ISOLATIONS
def test_reclaim_passes_at_once_after_an_abandoned_apply_dispatch_the_next_once(
    db: Database, open_db: OpenDb, spawn: Spawn, isolation: str | None
) -> None:
    database, running, second = running_with_next(db)
    stop = support.insert_control_request(db, running.apply_id, action="stop")
    support.age_heartbeat(db, running.apply_id, 120)
    dbs = [open_db(isolation_level=isolation) for _ in range(4)]
    sent = [SentLeases() for _ in dbs]
    settings = support.settings(str(db.engine.url), stale_after=30.0, max_reclaims=0)
    rotated = _together(
        spawn,
        [partial(service.reclaim_stale, d, settings, s) for d, s in zip(dbs, sent, strict=True)],
    )
    assert sum(rotated) == 1  # one pass abandoned it
    minted = [(lease.apply_id, lease.epoch) for s in sent for lease in s.leases]
    assert minted == [(second, 1)]
    assert line_states(db, database) == {running.apply_id: "failed", second: "dispatched"}
    assert control.get(db, stop).state == ControlState.FAILED
