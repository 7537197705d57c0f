"""A model of the lease protocol, and a hypothesis state machine that runs it against a real store
(``tests/contract/test_lease_model.py`` runs it on SQLite and MariaDB).

The model knows, for each apply, what the store must hold: its state, epoch, current token (when
the model saw it minted), owner, and whether its heartbeat is older than ``stale_after`` by the
database clock. Simulated workers each hold the last lease they obtained (redeemed, or forged),
possibly long stale, and act with it: redeem, heartbeat, fenced writes, hand back, stop, finish.
Every operation's outcome is predicted from the model first (accepted or refused), and a refused
operation must change nothing in the store. After every step the invariants compare the model
with the store and check the history rows alone (``LeaseModel`` documents each).

Time is the database's and never waited for: "advance the clock" moves ``heartbeat_at`` into the
past (``support.age_heartbeat``), by far more than ``stale_after``, which is far longer than any
example runs.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlalchemy import Connection, event, select

import leases
from leases import Lease, Reclaimed, ReclaimPolicy, mint_token
from storage import fenced
from storage.database import Database
from storage.errors import InvalidTransition, LeaseLost
from storage.states import TERMINAL_APPLY_STATES, WAITING_STATES, ApplyState
from storage.tables import applies, apply_logs, apply_tasks
from tests import support
from tests.races import (
    JOIN,
    POLL,
    SETTLE,
    Tap,
    Worker,
    in_driver_call,
    raw_connection_id,
    waits_for,
)

WORKERS: Final = ("w1", "w2", "w3")
# Applies and their lines: two share a line (taking turns), one has a line of its own.
LINES: Final = ("a", "a", "b")
TASKS_PER_APPLY: Final = 2
STALE_AFTER: Final = 3600.0  # far longer than any example runs, so nothing goes stale by itself
AGE: Final = 2 * STALE_AFTER  # how far "advance the clock" moves a heartbeat into the past
MAX_RECLAIMS: Final = 4
WRITE_EVENT: Final = "model-write"


def policy() -> ReclaimPolicy:
    return support.reclaim_policy(
        stale_after=STALE_AFTER, dispatch_timeout=STALE_AFTER, max_reclaims=MAX_RECLAIMS
    )


@dataclass
class ModelApply:
    apply_id: int
    line: str
    task_ids: list[int]
    state: ApplyState = ApplyState.QUEUED
    epoch: int = 0
    token: str | None = None  # the current token, when the model saw it minted
    owner: str | None = None
    aged: bool = False  # heartbeat_at older than stale_after by the database clock
    reclaims: int = 0
    writes: list[tuple[int, str]] = field(default_factory=list)  # accepted (epoch, marker)
    tasks: dict[int, tuple[int, int]] = field(default_factory=dict)  # id: (progress, epoch)

    @property
    def lease(self) -> Lease | None:
        if self.token is None or self.epoch < 1:
            return None
        return Lease(self.apply_id, self.epoch, self.token)

    def rotated(self, state: ApplyState, token: str | None) -> None:
        """A rotation: one epoch more, no owner, heartbeat set to now."""
        self.state, self.epoch, self.token = state, self.epoch + 1, token
        self.owner, self.aged = None, False


@dataclass
class SimWorker:
    name: str
    lease: Lease | None = None  # the last lease this worker obtained, possibly stale
    paused: bool = False  # SIGSTOPped: it acts again only once resumed


def _is_fence(statement: str) -> bool:
    """The fence's SELECT (``statements.fence``), whatever its conditions and lock clause."""
    return statement.lstrip().startswith("SELECT applies.lease_epoch")


class RotateBeforeNextStatement:
    """Inside a fence on ``fencing``: once the fence's SELECT ran on this thread, the moment this
    thread is about to run its next statement, start ``rotation`` on another thread and hold this
    one until the rotation is blocked by this thread's open transaction, or has finished.

    With the real fence the next statement is the owned write, in the transaction that holds the
    apply row (MySQL) or the write lock (SQLite): the rotation waits, or (reclaim, ``SKIP
    LOCKED``) passes the row by. A fence that commits its check before its write (check-then-act)
    runs its next statement in a new transaction (SQLite: its ``BEGIN IMMEDIATE``) with nothing
    held, so the rotation commits between the check and the write. Nothing is timed: the wait
    ends on one of the two states, each read from the server or the driver."""

    def __init__(self, fencing: Database, observer: Database, tap: Tap, rotation: Worker[Any]):
        self.fencing = fencing
        self.observer = observer
        self.tap = tap
        self.rotation = rotation
        self.outcome: str | None = None
        self._thread = threading.get_ident()
        self._armed = False

    def __enter__(self) -> RotateBeforeNextStatement:
        event.listen(self.fencing.engine, "after_cursor_execute", self._after)
        event.listen(self.fencing.engine, "before_cursor_execute", self._before)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.fencing.engine, "after_cursor_execute", self._after)
        event.remove(self.fencing.engine, "before_cursor_execute", self._before)

    @property
    def started(self) -> bool:
        return self.rotation.thread.ident is not None

    def _after(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if threading.get_ident() == self._thread and _is_fence(statement):
            self._armed = True

    def _before(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if threading.get_ident() != self._thread or not self._armed or self.started:
            return
        self.rotation.start()
        self.outcome = self._settle(conn)

    def _blocked_by(self, conn: Connection) -> bool:
        if self.observer.is_sqlite:
            raw = conn.connection.dbapi_connection
            holding = bool(getattr(raw, "in_transaction", False))
            return holding and in_driver_call(self.rotation.thread, "BEGIN IMMEDIATE")
        holder = raw_connection_id(conn)
        return waits_for(
            self.observer, holder, self.tap.connection_ids(self.rotation.thread), "applies"
        )

    def _settle(self, conn: Connection) -> str:
        deadline = time.monotonic() + POLL
        while True:
            if not self.rotation.thread.is_alive():
                return "finished"
            if self._blocked_by(conn):
                if self.rotation.finished_within(SETTLE):
                    return "finished although it was seen blocked"
                return "blocked"
            if time.monotonic() > deadline:
                return f"neither blocked nor finished after {POLL:g}s"
            time.sleep(0.005)  # paces the poll; the states above decide


class LeaseModel(RuleBasedStateMachine):
    """Rules act as workers, a beat and an operator would; invariants, checked after every step
    against the store:

    - *the store is the model*: each apply's state, epoch, owner and (when the model saw it
      minted) token are what the model predicts; every operation was accepted or refused exactly
      as predicted, and a refused one changed no row of any table;
    - *every accepted write came from the current holder*: the owned writes in the store are
      exactly the ones the model accepted, each stamped with the epoch of the lease that made it,
      which was current (the model's and the store's) when it committed;
    - *epochs are monotone*: an apply's epoch never decreases, and its log's epochs never
      decrease in id order (a write that committed after a rotation, with the old epoch, breaks
      this: the check-then-act fence does);
    - *no apply is lost*: every apply is queued, dispatched, running, stopped or terminal; a
      dispatched or running one has exactly one current lease, which was sent in a message (so a
      worker can redeem it, or reclaim rotate it); at most one apply per line is at work.
    """

    def __init__(self, db: Database, fencing: Database, rotating: Database, tap: Tap) -> None:
        super().__init__()
        self.db = db
        self.fencing = fencing  # the slow writer's own engine, which the interleaving hooks
        self.rotating = rotating  # the concurrent reclaim's, whose lock waits ``tap`` tells
        self.tap = tap
        self.policy = policy()
        self.applies: list[ModelApply] = []
        self.workers = {name: SimWorker(name) for name in WORKERS}
        self.messages: list[Lease] = []  # every lease ever sent to a worker
        self.delivered = 0  # messages[:delivered] were delivered once
        self.counter = itertools.count(1)
        self.highest_epoch: dict[int, int] = {}

    # --- set-up ----------------------------------------------------------------------------------

    @initialize()
    def create_applies(self) -> None:
        support.wipe(self.db)
        databases = {line: support.new_database() for line in sorted(set(LINES))}
        for line in LINES:
            apply_id = support.new_apply(self.db, tasks=TASKS_PER_APPLY, database=databases[line])
            tasks = support.task_ids(self.db, apply_id)
            model = ModelApply(apply_id, line, tasks, tasks={t: (0, 0) for t in tasks})
            self.applies.append(model)
        self.highest_epoch = {a.apply_id: 0 for a in self.applies}
        # Task rows start as the store made them: take their progress and epoch from there.
        for a in self.applies:
            for task_id, progress, epoch in self._task_rows(a.apply_id):
                a.tasks[task_id] = (progress, epoch)
        # As a submit to a free line does: each line's first apply is dispatched at once.
        for line in sorted(set(LINES)):
            head = self._head(line)
            assert head is not None
            self._dispatch(head)

    # --- helpers ---------------------------------------------------------------------------------

    def _apply(self, apply_id: int) -> ModelApply:
        return next(a for a in self.applies if a.apply_id == apply_id)

    def _pick(self, index: int) -> ModelApply:
        return self.applies[index % len(self.applies)]

    def _head(self, line: str) -> ModelApply | None:
        """The apply whose turn it is: the one at work, else the first unfinished by id."""
        members = [a for a in self.applies if a.line == line and a.state not in TERMINAL]
        at_work = [a for a in members if a.state in AT_WORK]
        if at_work:
            return at_work[0]
        return min(members, key=lambda a: a.apply_id) if members else None

    def _holds_current(self, lease: Lease | None) -> bool:
        """The fence's admission: the current lease of a running apply."""
        if lease is None:
            return False
        a = self._apply(lease.apply_id)
        return a.state == ApplyState.RUNNING and a.lease == lease

    def _actors(self) -> list[SimWorker]:
        """The workers that can act: not paused, holding a lease (however stale)."""
        return [w for w in self.workers.values() if w.lease is not None and not w.paused]

    def _actor(self, who: int) -> tuple[SimWorker, Lease]:
        actors = self._actors()
        worker = actors[who % len(actors)]
        assert worker.lease is not None
        return worker, worker.lease

    def _send(self, lease: Lease) -> None:
        self.messages.append(lease)

    def _refused(self, error: type[Exception], action: Callable[[], object]) -> None:
        """``action`` must raise ``error`` and change nothing."""
        before = support.snapshot(self.db)
        try:
            action()
        except error:
            pass
        else:
            raise AssertionError(f"accepted, but the model says it must raise {error.__name__}")
        assert support.snapshot(self.db) == before, "a refused operation changed the store"

    def _task_rows(self, apply_id: int) -> list[tuple[int, int, int]]:
        with self.db.transaction() as conn:
            rows = conn.execute(
                select(apply_tasks.c.id, apply_tasks.c.progress, apply_tasks.c.lease_epoch)
                .where(apply_tasks.c.apply_id == apply_id)
                .order_by(apply_tasks.c.id)
            )
            return [(int(r.id), int(r.progress), int(r.lease_epoch)) for r in rows]

    def _promote_successor(self, line: str, token: str) -> Lease | None:
        head = self._head(line)
        if head is None or head.state not in WAITING_STATES:
            return None
        head.rotated(ApplyState.DISPATCHED, token)
        assert head.lease is not None
        return head.lease

    def _owned_write(self, worker: SimWorker, kind: str, fencing: Database) -> None:
        """One owned write with the worker's lease, on ``fencing``; accepted iff it holds the
        current lease of a running apply."""
        lease = worker.lease
        assert lease is not None
        a = self._apply(lease.apply_id)
        marker = f"{worker.name}-{next(self.counter)}"
        task_id = a.task_ids[0] if kind == "log" else a.task_ids[-1]
        progress = next(self.counter) % 101

        def write() -> None:
            with leases.fence(fencing, lease) as fx:
                if kind == "log":
                    fenced.append_log(fx, WRITE_EVENT, marker)
                else:
                    fenced.update_task(fx, task_id, progress=progress)

        if not self._holds_current(lease):
            self._refused(LeaseLost, write)
            return
        write()
        if kind == "log":
            a.writes.append((lease.epoch, marker))
        else:
            a.tasks[task_id] = (progress, lease.epoch)

    def _heartbeat(self, worker: SimWorker) -> None:
        lease = worker.lease
        assert lease is not None
        if not self._holds_current(lease):
            self._refused(LeaseLost, lambda: leases.heartbeat(self.db, lease))
            return
        leases.heartbeat(self.db, lease)
        self._apply(lease.apply_id).aged = False

    def _predict_reclaim(self) -> set[tuple[int, int, str, bool]]:
        """(apply_id, previous epoch, from state, abandoned) of every apply a pass takes over."""
        return {
            (a.apply_id, a.epoch, str(a.state), a.reclaims >= MAX_RECLAIMS)
            for a in self.applies
            if a.aged and a.state in AT_WORK
        }

    def _apply_reclaimed(self, done: list[Reclaimed]) -> None:
        for r in done:
            a = self._apply(r.apply_id)
            if r.lease is None:
                a.rotated(ApplyState.FAILED, None)
            else:
                a.rotated(ApplyState.DISPATCHED, r.lease.token)
                a.reclaims += 1
                assert r.lease == a.lease, f"reclaim minted {r.lease}, the model {a.lease}"
                self._send(r.lease)

    def _sweep(self) -> None:
        """The end of every reclaim pass: dispatch the waiting head of every line."""
        expected = {
            head.apply_id
            for line in sorted(set(LINES))
            if (head := self._head(line)) is not None and head.state in WAITING_STATES
        }
        sent = leases.dispatch_waiting(self.db)
        assert {lease.apply_id for lease in sent} == expected, (sent, expected)
        for lease in sent:
            a = self._apply(lease.apply_id)
            a.rotated(ApplyState.DISPATCHED, lease.token)
            assert lease == a.lease, f"the sweep minted {lease}, the model {a.lease}"
            self._send(lease)

    # --- rules: the operator and the beat --------------------------------------------------------

    @rule(index=st.integers(0, len(LINES) - 1))
    def dispatch(self, index: int) -> None:
        """Dispatch (first dispatch or resume): only an unowned apply whose turn it is."""
        self._dispatch(self._pick(index))

    def _dispatch(self, a: ModelApply) -> None:
        allowed = a.state in (*WAITING_STATES, ApplyState.STOPPED) and self._head(a.line) is a
        if not allowed:
            self._refused(InvalidTransition, lambda: leases.dispatch(self.db, a.apply_id))
            return
        lease = leases.dispatch(self.db, a.apply_id)
        a.rotated(ApplyState.DISPATCHED, lease.token)
        assert lease == a.lease, f"dispatch minted {lease}, the model {a.lease}"
        self._send(lease)

    @rule(passes=st.integers(1, 2))
    def reclaim(self, passes: int) -> None:
        """A reclaim pass (the beat): stale running and stuck dispatched applies are rotated,
        or failed as abandoned after ``MAX_RECLAIMS``; then the lines' waiting heads are
        dispatched. Two passes: a second beat right after the first, which finds nothing."""
        for _ in range(passes):
            self._reclaim_pass()

    def _reclaim_pass(self) -> None:
        expected = self._predict_reclaim()
        done = leases.reclaim(self.db, self.policy)
        got = {(r.apply_id, r.previous_epoch, r.from_state, r.lease is None) for r in done}
        assert got == expected, f"reclaim took {got}, the model expected {expected}"
        self._apply_reclaimed(done)
        self._sweep()

    @rule(everyone=st.booleans(), index=st.integers(0, len(LINES) - 1))
    def advance_clock(self, everyone: bool, index: int) -> None:
        """The database clock moves past ``stale_after``: for every apply, or for one whose
        holder is slow. (Moving heartbeat_at back is the same, by the database's clock.)"""
        chosen = self.applies if everyone else [self._pick(index)]
        for a in chosen:
            support.age_heartbeat(self.db, a.apply_id, AGE)
            a.aged = True

    # --- rules: workers --------------------------------------------------------------------------

    @precondition(lambda self: self.delivered < len(self.messages))
    @rule(name=st.sampled_from(WORKERS))
    def deliver(self, name: str) -> None:
        """The broker delivers the oldest message not yet delivered to a worker, which redeems
        it (refused if the lease moved on meanwhile)."""
        if not self.workers[name].paused:
            self.delivered += 1
            self._redeem(self.workers[name], self.messages[self.delivered - 1])

    @precondition(lambda self: bool(self.messages))
    @rule(name=st.sampled_from(WORKERS), back=st.integers(0, 10_000))
    def redeliver(self, name: str, back: int) -> None:
        """The broker delivers a message again (a duplicate, or a stale one from long ago)."""
        if not self.workers[name].paused:
            self._redeem(self.workers[name], self.messages[-1 - back % len(self.messages)])

    def _redeem(self, worker: SimWorker, lease: Lease) -> None:
        """A refused redemption leaves the worker as it was: it ends quietly, writing nothing."""
        a = self._apply(lease.apply_id)
        if not (a.state == ApplyState.DISPATCHED and a.owner is None and a.lease == lease):
            self._refused(LeaseLost, lambda: leases.redeem(self.db, lease, worker.name))
            return
        leases.redeem(self.db, lease, worker.name)
        a.state, a.owner, a.aged = ApplyState.RUNNING, worker.name, False
        worker.lease = lease

    @rule(
        name=st.sampled_from(WORKERS),
        index=st.integers(0, len(LINES) - 1),
        back=st.booleans(),
        kind=st.sampled_from(["log", "task"]),
    )
    def forge(self, name: str, index: int, back: bool, kind: str) -> None:
        """A worker acts on a lease never issued, without redeeming it: a corrupted or forged
        message with an epoch the apply has (its current one, or the one before) and a token
        nobody minted. It heartbeats and writes with it (refused), and keeps it."""
        worker = self.workers[name]
        if worker.paused:
            return
        # Running applies first: there the epoch is all a fence without its token would check.
        ranked = sorted(self.applies, key=lambda a: (a.state != ApplyState.RUNNING, a.apply_id))
        a = ranked[index % len(ranked)]
        epoch = a.epoch - 1 if back else a.epoch
        if epoch < 1:
            return
        worker.lease = Lease(a.apply_id, epoch, mint_token())
        self._heartbeat(worker)
        self._owned_write(worker, kind, self.db)

    @precondition(lambda self: bool(self._actors()))
    @rule(who=st.integers(0, len(WORKERS) - 1))
    def heartbeat(self, who: int) -> None:
        self._heartbeat(self._actor(who)[0])

    @precondition(lambda self: bool(self._actors()))
    @rule(who=st.integers(0, len(WORKERS) - 1), kind=st.sampled_from(["log", "task"]))
    def write(self, who: int, kind: str) -> None:
        """A fenced owned write: a log line, or an apply task's progress."""
        self._owned_write(self._actor(who)[0], kind, self.db)

    @precondition(lambda self: bool(self._actors()))
    @rule(who=st.integers(0, len(WORKERS) - 1), kind=st.sampled_from(["log", "task"]))
    def slow_write(self, who: int, kind: str) -> None:
        """The worker is slow: its apply's heartbeat goes stale, and a reclaim pass runs on
        another connection between its fence's check and its write. The write is accepted iff
        the worker held the current lease, and then the reclaim must not commit before it: it
        waits (SQLite) or passes the locked row by (MariaDB), and rotates it afterwards or on a
        later pass."""
        worker, lease = self._actor(who)
        a = self._apply(lease.apply_id)
        support.age_heartbeat(self.db, a.apply_id, AGE)
        a.aged = True
        if not self._holds_current(lease):
            # Refused at the fence's check: nothing to interleave with; the pass runs after it.
            self._owned_write(worker, kind, self.db)
            self._reclaim_pass()
            return
        expected = self._predict_reclaim()
        rotation: Worker[list[Reclaimed]] = Worker(
            "reclaim", lambda: leases.reclaim(self.rotating, self.policy)
        )
        hook = RotateBeforeNextStatement(self.fencing, self.db, self.tap, rotation)
        try:
            with hook:
                self._owned_write(worker, kind, self.fencing)
        finally:
            if not hook.started:
                rotation.start()  # so that no thread is left behind, whatever happened
            done = rotation.result(JOIN)
        outcomes = ["blocked", "finished"]
        if not self.db.is_sqlite:
            # The pass skips the held row (SKIP LOCKED), and under load InnoDB was once seen to
            # list it in a lock wait for an instant on its way to skipping: what decides is
            # what it took, below, not whether the poll caught that instant.
            outcomes.append("finished although it was seen blocked")
        assert hook.outcome in outcomes, hook.outcome
        got = {(r.apply_id, r.previous_epoch, r.from_state, r.lease is None) for r in done}
        # MariaDB's reclaim skips the row the fence held (SKIP LOCKED); SQLite's waited for it.
        allowed = [expected]
        if not self.db.is_sqlite:
            allowed.append({e for e in expected if e[0] != a.apply_id})
        assert got in allowed, f"reclaim took {got}, the model expected one of {allowed}"
        self._apply_reclaimed(done)

    @rule(name=st.sampled_from(WORKERS))
    def pause(self, name: str) -> None:
        """SIGSTOP: the worker keeps its lease object and does nothing until resumed."""
        self.workers[name].paused = True

    @rule(name=st.sampled_from(WORKERS), kind=st.sampled_from(["log", "task"]))
    def resume(self, name: str, kind: str) -> None:
        """SIGCONT: the worker's heartbeat fires and its main loop makes the write it was about
        to make, both with the lease it held when paused, however stale."""
        worker = self.workers[name]
        if not worker.paused:
            return
        worker.paused = False
        if worker.lease is not None:
            self._heartbeat(worker)
            self._owned_write(worker, kind, self.db)

    @precondition(lambda self: bool(self._actors()))
    @rule(who=st.integers(0, len(WORKERS) - 1))
    def hand_back(self, who: int) -> None:
        """A warm shutdown: the holder hands its apply back as the last write of its fence."""
        lease = self._actor(who)[1]
        if not self._holds_current(lease):
            self._refused(
                LeaseLost, lambda: support.hand_back(self.db, lease, reason="model hand back")
            )
            return
        new = support.hand_back(self.db, lease, reason="model hand back")
        a = self._apply(lease.apply_id)
        a.rotated(ApplyState.DISPATCHED, new.token)
        assert new == a.lease, f"hand back minted {new}, the model {a.lease}"
        self._send(new)

    @precondition(lambda self: bool(self._actors()))
    @rule(who=st.integers(0, len(WORKERS) - 1))
    def stop(self, who: int) -> None:
        """The holder stops at a safe point (a stop request); the apply keeps its turn."""
        lease = self._actor(who)[1]

        def stop() -> int:
            return support.release(self.db, lease, reason="model stop")

        if not self._holds_current(lease):
            self._refused(LeaseLost, stop)
            return
        epoch = stop()
        a = self._apply(lease.apply_id)
        a.rotated(ApplyState.STOPPED, None)
        assert epoch == a.epoch

    @precondition(lambda self: bool(self._actors()))
    @rule(
        who=st.integers(0, len(WORKERS) - 1),
        end=st.sampled_from([ApplyState.COMPLETED, ApplyState.FAILED]),
    )
    def finish(self, who: int, end: ApplyState) -> None:
        """The holder ends the apply, passing its line's turn on in the same transaction."""
        lease = self._actor(who)[1]
        successor_token = mint_token()

        def finish() -> fenced.Finished:
            with leases.fence(self.db, lease, finishing=True) as fx:
                return fenced.finish(
                    fx,
                    new_token=mint_token(),
                    successor_token=successor_token,
                    to_state=end,
                    event="model-finish",
                    reason="model finish",
                )

        if not self._holds_current(lease):
            self._refused(LeaseLost, finish)
            return
        done = finish()
        a = self._apply(lease.apply_id)
        a.rotated(end, None)
        assert done.epoch == a.epoch
        successor = self._promote_successor(a.line, successor_token)
        got = None
        if done.successor is not None:
            got = Lease(done.successor.apply_id, done.successor.epoch, successor_token)
        assert got == successor, f"finish dispatched {got}, the model expected {successor}"
        if successor is not None:
            self._send(successor)

    # --- invariants ------------------------------------------------------------------------------

    @invariant()
    def the_store_is_the_model(self) -> None:
        with self.db.transaction() as conn:
            rows = {
                int(r.id): r
                for r in conn.execute(
                    select(
                        applies.c.id,
                        applies.c.state,
                        applies.c.lease_epoch,
                        applies.c.lease_token,
                        applies.c.lease_owner,
                    )
                )
            }
        assert set(rows) == {a.apply_id for a in self.applies}
        for a in self.applies:
            r = rows[a.apply_id]
            stored = (str(r.state), int(r.lease_epoch), r.lease_owner)
            assert stored == (str(a.state), a.epoch, a.owner), (a.apply_id, stored, a)
            if a.token is not None:
                assert r.lease_token == a.token, f"apply {a.apply_id}: another token is current"
            # Epochs are monotone: never below the highest the store ever showed.
            assert int(r.lease_epoch) >= self.highest_epoch[a.apply_id]
            self.highest_epoch[a.apply_id] = int(r.lease_epoch)
            # No apply is lost: a known state; at work means exactly one current lease, sent.
            assert a.state in KNOWN, a
            if a.state in AT_WORK:
                assert r.lease_token is not None, a
                assert a.lease is not None, a
                assert a.lease in self.messages, f"apply {a.apply_id}: its lease was never sent"
                assert (a.owner is None) == (a.state == ApplyState.DISPATCHED), a
        for line in set(LINES):
            at_work = [a.apply_id for a in self.applies if a.line == line and a.state in AT_WORK]
            assert len(at_work) <= 1, f"line {line}: {at_work} at work at once"

    @invariant()
    def every_accepted_write_came_from_the_current_holder(self) -> None:
        with self.db.transaction() as conn:
            logs = conn.execute(
                select(
                    apply_logs.c.apply_id,
                    apply_logs.c.lease_epoch,
                    apply_logs.c.event,
                    apply_logs.c.message,
                ).order_by(apply_logs.c.id)
            ).all()
        for a in self.applies:
            mine = [r for r in logs if r.apply_id == a.apply_id]
            epochs = [int(r.lease_epoch) for r in mine]
            assert epochs == sorted(epochs), (
                f"apply {a.apply_id}: log epochs decrease in id order: "
                f"{[(int(r.lease_epoch), r.event) for r in mine]}"
            )
            written = [(int(r.lease_epoch), str(r.message)) for r in mine if r.event == WRITE_EVENT]
            assert written == a.writes, (
                f"apply {a.apply_id}: owned writes {written}, accepted by the model {a.writes}"
            )
            tasks = {t: (p, e) for t, p, e in self._task_rows(a.apply_id)}
            assert tasks == a.tasks, f"apply {a.apply_id}: tasks {tasks}, the model {a.tasks}"


TERMINAL: Final = frozenset(TERMINAL_APPLY_STATES)
AT_WORK: Final = frozenset({ApplyState.DISPATCHED, ApplyState.RUNNING})
KNOWN: Final = frozenset({*WAITING_STATES, *AT_WORK, ApplyState.STOPPED, *TERMINAL_APPLY_STATES})
