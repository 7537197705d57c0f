"""``leasehold audit``: an independent check of the stored history, from the rows alone.

Read-only: it runs selects and nothing else, so an operator may run it against a production store
while workers run. Each batch of applies is read in one transaction (REPEATABLE READ on MySQL and
MariaDB, so the applies, logs, tasks and effect records of a batch come from one snapshot; SQLite
serializes transactions anyway), so an apply that moves on meanwhile is never half-read. Applies
are streamed in id order, ``batch_size`` at a time, with one query per table per batch.

The checks, per apply (``Violation.check`` names them):

``log_epochs``
    ``apply_logs.lease_epoch`` never decreases in id order, and is never above the apply's epoch.
``terminal_event``
    The terminal events are ``completed``, ``failed``, ``abandoned`` (reclaim gave up: the apply
    failed) and ``cancelled``: the events of the rotations to a terminal state. The log is split
    at every ``retried`` event (a retry reopens a failed apply: ``leases.control``). Each part
    before a ``retried`` holds exactly one terminal event, ``failed`` or ``abandoned`` (only a
    failed apply is retried). The last part holds exactly one terminal event, matching the state,
    if the apply is terminal (completed, failed, cancelled), and none otherwise.
``task_completions``
    Each apply task was recorded completed at most once: ``task_completed`` and ``task_skipped``
    log lines are counted per task (their message names it: ``task 2/3: orders``). A retry keeps
    completed tasks, so this holds across retries too.
``task_epochs``
    ``apply_tasks.lease_epoch`` is never above the apply's epoch.
``effect_epochs``
    ``apply_comments.last_epoch`` and ``checks.last_epoch`` are never above the apply's epoch, and
    a check run recorded ``completed`` has a conclusion. The store keeps only the *last* epoch of
    a comment or check run, so "never decreases" is checked here only as "never above the apply's
    epoch" (a stale holder's record would carry an epoch below it, which rows alone cannot tell
    from a current one). The order of successive edits is kept at GitHub, in the epochs of the
    comment's hidden markers, and is checked there (the GitHub stand-in's invariants).
``state_vs_tasks``
    The apply's state agrees with its tasks. A run completes tasks in position order, so by
    position the task states read: completed ones, then at most one running (a holder died in it)
    or failed one, then only pending ones or only cancelled ones. Besides: a completed apply has
    every task completed; a cancelled one has none pending, running or failed; a failed one has an
    error or a failed task (an apply that reclaim abandoned keeps its running and pending tasks);
    a failed task belongs to a failed apply (a retry puts it back to pending), and a cancelled
    task to a cancelled or failed one.
``control_requesters``
    Every control request of the apply records who asked for it (``requested_by`` neither NULL
    nor blank): a stop or cancel nobody can be asked about is a gap in the history. The message
    names the request: ``control request 40 (stop) records no requester``.

``audit(db)`` returns the violations (``[]`` when the history is clean); ``run(db)`` also counts
the applies audited. The CLI's ``--json`` prints ``[Violation.as_json(), ...]``: a list of
``{"apply_id": int, "check": str, "message": str}``, empty when clean. ``str(violation)`` is the
one-line form, ``apply 12: log epoch 3 after 5 (log ids 40, 41)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from storage import _statements as statements
from storage.database import Database
from storage.errors import ApplyNotFound
from storage.states import ApplyState, TaskState

BATCH_SIZE: Final = 500
# The events of the rotations to a terminal state (storage._leasing.rotate's callers), and the
# state each one ends in.
TERMINAL_EVENTS: Final = {
    "completed": ApplyState.COMPLETED,
    "failed": ApplyState.FAILED,
    "abandoned": ApplyState.FAILED,
    "cancelled": ApplyState.CANCELLED,
}
REOPEN_EVENT: Final = "retried"
COMPLETION_EVENTS: Final = statements.AUDIT_COMPLETION_EVENTS

# Task states by position, one letter each: completed ones, at most one running or failed, then
# only pending or only cancelled ones.
_LETTERS: Final[dict[str, str]] = {
    TaskState.COMPLETED: "C",
    TaskState.RUNNING: "R",
    TaskState.FAILED: "F",
    TaskState.PENDING: "P",
    TaskState.CANCELLED: "X",
}
_TASK_ORDER: Final = re.compile(r"C*[RF]?(?:P*|X*)")


@dataclass(frozen=True, slots=True)
class Violation:
    apply_id: int
    check: str
    message: str

    def __str__(self) -> str:
        return f"apply {self.apply_id}: {self.message}"

    def as_json(self) -> dict[str, Any]:
        return {"apply_id": self.apply_id, "check": self.check, "message": self.message}


@dataclass(frozen=True, slots=True)
class Report:
    applies: int  # how many applies were audited
    violations: list[Violation]


def audit(db: Database, apply_id: int | None = None) -> list[Violation]:
    """The violations of the stored history: of every apply, or of ``apply_id`` only
    (``ApplyNotFound`` if there is none). Empty when the history is clean."""
    return run(db, apply_id).violations


def run(db: Database, apply_id: int | None = None, *, batch_size: int = BATCH_SIZE) -> Report:
    """The violations and how many applies were audited: ``batch_size`` applies per transaction."""
    count = 0
    found: list[Violation] = []
    for audited, violations in _batches(db, apply_id, batch_size):
        count += audited
        found.extend(violations)
    if apply_id is not None and count == 0:
        raise ApplyNotFound(apply_id)
    return Report(count, found)


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Apply:
    id: int
    state: str  # as stored: a corrupt row may hold a state no leasehold writes
    epoch: int
    error: str | None


def _batches(
    db: Database, apply_id: int | None, batch_size: int
) -> Iterator[tuple[int, list[Violation]]]:
    after = 0
    while True:
        # REPEATABLE READ: one snapshot for the whole batch (ignored on SQLite, which serializes).
        with db.transaction(isolation_level="REPEATABLE READ") as conn:
            select = (
                statements.audit_one_apply(apply_id)
                if apply_id is not None
                else statements.audit_applies(after_id=after, limit=batch_size)
            )
            batch = [
                _Apply(int(r.id), str(r.state), int(r.lease_epoch), r.error)
                for r in conn.execute(select)
            ]
            if not batch:
                return
            first, last = batch[0].id, batch[-1].id
            checkers = {a.id: _Checker(a) for a in batch}
            # Streamed: a batch's log may be long, and each row is looked at once.
            logs = statements.audit_logs(first, last).execution_options(yield_per=2000)
            for r in conn.execute(logs):
                if r.apply_id in checkers:
                    checkers[r.apply_id].log(int(r.id), int(r.lease_epoch), r.event, r.message)
            for r in conn.execute(statements.audit_tasks(first, last)):
                if r.apply_id in checkers:
                    checkers[r.apply_id].task(
                        int(r.position), r.table_name, str(r.state), int(r.lease_epoch)
                    )
            for r in conn.execute(statements.audit_comments(first, last)):
                if r.apply_id in checkers:
                    checkers[r.apply_id].effect(f"comment {r.kind}", int(r.last_epoch))
            for r in conn.execute(statements.audit_checks(first, last)):
                if r.apply_id in checkers:
                    checkers[r.apply_id].effect("check run", int(r.last_epoch))
                    if r.status == "completed" and r.conclusion is None:
                        checkers[r.apply_id].add(
                            "effect_epochs", "check run completed without a conclusion"
                        )
            for r in conn.execute(statements.audit_anonymous_control_requests(first, last)):
                if r.apply_id in checkers:
                    checkers[r.apply_id].add(
                        "control_requesters",
                        f"control request {r.id} ({r.action}) records no requester",
                    )
        yield len(batch), [v for c in checkers.values() for v in c.finish()]
        if apply_id is not None or len(batch) < batch_size:
            return
        after = last


# --- the checks ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Task:
    position: int
    table_name: str
    state: str  # as stored
    epoch: int

    def __str__(self) -> str:
        return f"task {self.position + 1} ({self.table_name})"


@dataclass
class _Checker:
    """The checks of one apply, fed its log in id order and its tasks in position order."""

    apply: _Apply
    found: list[Violation] = field(default_factory=list)
    tasks: list[_Task] = field(default_factory=list)
    top_epoch: int | None = None
    top_log_id: int = 0
    terminals: list[tuple[int, str]] = field(default_factory=list)  # since the last retry
    retried: bool = False
    completions: dict[str, list[int]] = field(default_factory=dict)

    def add(self, check: str, message: str) -> None:
        self.found.append(Violation(self.apply.id, check, message))

    def log(self, log_id: int, epoch: int, event: str, message: str | None) -> None:
        if self.top_epoch is not None and epoch < self.top_epoch:
            self.add(
                "log_epochs",
                f"log epoch {epoch} after {self.top_epoch} (log ids {self.top_log_id}, {log_id})",
            )
        elif self.top_epoch is None or epoch > self.top_epoch:
            self.top_epoch, self.top_log_id = epoch, log_id
        if epoch > self.apply.epoch:
            self.add(
                "log_epochs",
                f"log epoch {epoch} above the apply's {self.apply.epoch} (log id {log_id})",
            )
        if event in TERMINAL_EVENTS:
            self.terminals.append((log_id, event))
        elif event == REOPEN_EVENT:
            self._reopened(log_id)
        elif event in COMPLETION_EVENTS:
            self.completions.setdefault(message or "", []).append(log_id)

    def _reopened(self, log_id: int) -> None:
        failed = [t for t in self.terminals if TERMINAL_EVENTS[t[1]] == ApplyState.FAILED]
        if len(self.terminals) != 1 or not failed:
            self.add(
                "terminal_event",
                f"retried (log id {log_id}) after {_terminal_list(self.terminals)}: "
                "only an apply that failed once can be retried",
            )
        self.terminals = []
        self.retried = True

    def task(self, position: int, table_name: str, state: str, epoch: int) -> None:
        task = _Task(position, table_name, state, epoch)
        self.tasks.append(task)
        if state not in _LETTERS:
            self.add("state_vs_tasks", f"{task} has an unknown state {state!r}")
        if epoch > self.apply.epoch:
            self.add("task_epochs", f"{task} epoch {epoch} above the apply's {self.apply.epoch}")

    def effect(self, what: str, epoch: int) -> None:
        if epoch > self.apply.epoch:
            self.add("effect_epochs", f"{what} epoch {epoch} above the apply's {self.apply.epoch}")

    def finish(self) -> list[Violation]:
        if self.apply.state in set(ApplyState):
            self._terminal(ApplyState(self.apply.state))
            self._state_vs_tasks(ApplyState(self.apply.state))
        else:
            self.add("state_vs_tasks", f"has an unknown state {self.apply.state!r}")
        for label, ids in self.completions.items():
            if len(ids) > 1:
                self.add(
                    "task_completions",
                    f"{label or '(unnamed task)'} recorded completed {len(ids)} times "
                    f"(log ids {', '.join(map(str, ids))})",
                )
        return self.found

    def _terminal(self, state: ApplyState) -> None:
        if not state.terminal:
            if self.terminals:
                self.add(
                    "terminal_event",
                    f"is {state} but its log has {_terminal_list(self.terminals)}{self._since}",
                )
            return
        if len(self.terminals) != 1:
            self.add(
                "terminal_event",
                f"is {state} with {_terminal_list(self.terminals)}{self._since} "
                "(exactly one expected)",
            )
            return
        log_id, event = self.terminals[0]
        if TERMINAL_EVENTS[event] != state:
            self.add(
                "terminal_event", f"is {state} but its terminal event is {event} (log id {log_id})"
            )

    @property
    def _since(self) -> str:
        return " since its last retry" if self.retried else ""

    def _state_vs_tasks(self, state: ApplyState) -> None:
        tasks = self.tasks
        order = "".join(_LETTERS.get(t.state, "?") for t in tasks)
        if "?" not in order and not _TASK_ORDER.fullmatch(order):
            shown = ", ".join(f"{t.position + 1} {t.state}" for t in tasks)
            self.add(
                "state_vs_tasks",
                f"task states out of order ({shown}): a run completes tasks in position order",
            )
        wrong: Iterable[_Task] = ()
        if state == ApplyState.COMPLETED:
            wrong = [t for t in tasks if t.state != TaskState.COMPLETED]
        elif state == ApplyState.CANCELLED:
            bad = {TaskState.PENDING, TaskState.RUNNING, TaskState.FAILED}
            wrong = [t for t in tasks if t.state in bad]
        elif state == ApplyState.FAILED:
            if not self.apply.error and not any(t.state == TaskState.FAILED for t in tasks):
                self.add("state_vs_tasks", "is failed with no error and no failed task")
        else:  # not finished: a retry put its failed and cancelled tasks back to pending
            wrong = [t for t in tasks if t.state in (TaskState.FAILED, TaskState.CANCELLED)]
        for task in wrong:
            self.add("state_vs_tasks", f"is {state} but {task} is {task.state}")


def _terminal_list(terminals: list[tuple[int, str]]) -> str:
    if not terminals:
        return "no terminal event"
    shown = ", ".join(f"{event} (log id {log_id})" for log_id, event in terminals)
    return f"{len(terminals)} terminal event{'s' if len(terminals) > 1 else ''}: {shown}"
