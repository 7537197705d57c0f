"""GitHub effects, in process: ``ApplyRunner`` + ``Publisher`` (its own thread) + a real database
(SQLite and MariaDB) + the GitHub stand-in over real HTTP, with the sleep engine.

What the pull request shows (one comment created on start, edited at task boundaries and at most
once per ``comment_interval`` in between, a final edit; one check run, in progress then
concluded), what leasehold records about it, and what a worker that lost its lease, crashed
between GitHub's answer and its record, met rate limits or 5xx answers, or has no GitHub settings
at all does; that the runner never waits for GitHub; that what GitHub could not be shown is owed
and settled later; and that two epochs' calls never overlap (the effect window). No mock: the
database and HTTP are real.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import pytest
from sqlalchemy import RowMapping, select

from leases import Lease, redeem
from storage import applies, open_database, publications
from storage.applies import NewApply, NewTask
from storage.database import Database
from storage.errors import LeaseLost
from storage.states import ApplyState
from storage.tables import apply_comments, checks, metadata
from tasks.backoff import Backoff
from tasks.effects import NoEffects
from tasks.engines.sleep import SleepEngine
from tasks.github import render
from tasks.github.client import GitHubClient, GitHubConfig
from tasks.github.effects import github_effects
from tasks.github.owed import publish_owed
from tasks.github.publisher import Publisher
from tasks.heartbeat import Heartbeat
from tasks.interrupts import Interrupts, Reason
from tasks.runner import ApplyRunner, Outcome
from tasks.testing.standin import GitHubStandIn, RecordedRequest
from tests import support
from tests.celery_fixtures import FakeClock, RecordingReporter, Report, run_lease, wait_until
from tests.support import hand_back

T = TypeVar("T")

OWNER, REPO, PR = "acme", "shop", 42
REPOSITORY = f"{OWNER}/{REPO}"
SHA = "c0ffee" + "0" * 34
COMMENTS = r"/issues/\d+/comments$"  # GET lists, POST creates
COMMENT = r"/issues/comments/\d+$"  # PATCH edits
RUNS = r"/check-runs$"  # POST creates
RUN = r"/check-runs/\d+$"  # PATCH updates
RUNS_FOR_REF = r"/commits/[^/]+/check-runs$"  # GET lists

_HEADLINE = re.compile(r"leasehold apply #(\d+): \*\*(\w+)\*\*")
_ROW = re.compile(r"^\| (\d+) \| `([^`]+)` \| (\w+) \| (\d+)% \|$", re.MULTILINE)


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def token() -> str:
    """Long and random: the stand-in's ``secret_recorded`` matches substrings."""
    return "ghp_" + secrets.token_hex(20)


@pytest.fixture
def github(token: str) -> Iterator[GitHubStandIn]:
    with GitHubStandIn([token]) as standin:
        yield standin


FAST = Backoff((0.05, 0.1, 0.2))


def publisher(
    db: Database,
    lease: Lease,
    github: GitHubStandIn,
    token: str,
    *,
    interrupts: Interrupts | None = None,
    timeout: float = 5.0,
    comment_interval: float = 60.0,
    grace: float = 6.0,
    reclaimed: bool = False,
    monotonic: Callable[[], float] = time.monotonic,
    backoff: Backoff = FAST,
    final_attempts: int = 4,
    api_url: str | None = None,
) -> Publisher:
    config = GitHubConfig(api_url=api_url or github.url, token=token, timeout=timeout)
    return Publisher(
        db,
        lease,
        GitHubClient(config).open(),
        interrupts or Interrupts(),
        repository=REPOSITORY,
        pull_request=PR,
        head_sha=SHA,
        comment_interval=comment_interval,
        effect_timeout=timeout,
        effect_grace=grace,
        reclaimed=reclaimed,
        monotonic=monotonic,
        backoff=backoff,
        final_attempts=final_attempts,
    )


def run_to_end(run: ApplyRunner, pub: Publisher, timeout: float = 30.0) -> Outcome:
    """Run the apply, then let the publisher finish what it owes (as the worker does, in the
    background) and wait for it."""
    try:
        return run.run()
    finally:
        pub.close()
        assert pub.join(timeout), "the publisher did not finish"


def pr_apply(
    db: Database,
    seconds: tuple[float, ...],
    *,
    fail_at: int | None = None,
    requested_by: str | None = None,
) -> int:
    """A pending sleep apply on pull request acme/shop#42."""
    tasks = [
        NewTask(f"t{i}", f"ALTER TABLE t{i} ADD COLUMN c INT", {"seconds": s, "fail": i == fail_at})
        for i, s in enumerate(seconds)
    ]
    new = NewApply(
        database_name=support.new_database(),
        environment="staging",
        engine="sleep",
        tasks=tasks,
        repository=REPOSITORY,
        pull_request=PR,
        head_sha=SHA,
        requested_by=requested_by,
    )
    return applies.create(db, new).apply_id


def runner(
    db: Database,
    lease: Lease,
    effects: Publisher | NoEffects,
    *,
    interrupts: Interrupts | None = None,
    hook: Callable[[Report], None] | None = None,
) -> ApplyRunner:
    return ApplyRunner(
        db,
        lease,
        SleepEngine(),
        interrupts or Interrupts(),
        RecordingReporter(hook),
        progress_interval=0.0,
        effects=effects,
    )


class Background(Generic[T]):
    """Run a callable in a thread; ``result`` re-raises what it raised."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = 20.0) -> T:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still running after {timeout}s"
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def headline(body: str) -> str:
    found = _HEADLINE.search(body)
    assert found, body
    return found[2]


def task_rows(body: str) -> list[tuple[str, str, int]]:
    """(table, state, progress) of every apply task the body shows."""
    return [(m[2], m[3], int(m[4])) for m in _ROW.finditer(body)]


def the_comment(github: GitHubStandIn) -> tuple[int, list[str]]:
    """The pull request's only comment: its id and every body it had, creation first."""
    comments = github.comments(OWNER, REPO, PR)
    assert len(comments) == 1, [c.body for c in comments]
    return comments[0].id, github.comment_history(comments[0].id)


def the_check_run(github: GitHubStandIn) -> Any:
    runs = github.check_runs(OWNER, REPO, SHA)
    assert len(runs) == 1, runs
    return runs[0]


def comment_record(db: Database, apply_id: int) -> RowMapping | None:
    with db.transaction() as conn:
        query = select(apply_comments).where(apply_comments.c.apply_id == apply_id)
        return conn.execute(query).mappings().one_or_none()


def check_record(db: Database, apply_id: int) -> RowMapping | None:
    with db.transaction() as conn:
        return conn.execute(select(checks).where(checks.c.apply_id == apply_id)).mappings().first()


def owed(db: Database, apply_id: int) -> dict[str, Any]:
    """The apply's publication record (what its pull request is owed)."""
    record = publications.get(db, apply_id)
    assert record is not None, f"apply {apply_id} has no publication record"
    return record


def kinds(requests: list[RecordedRequest]) -> list[str]:
    """Each request as 'METHOD what', for comparing sequences."""
    names = [
        (RUNS_FOR_REF, "runs"),
        (RUN, "run"),
        (RUNS, "runs"),
        (COMMENT, "comment"),
        (COMMENTS, "comments"),
    ]
    out = []
    for r in requests:
        what = next(name for pattern, name in names if re.search(pattern, r.path))
        out.append(f"{r.method} {what}")
    return out


def is_progress_edit(request: RecordedRequest, table: str) -> bool:
    """A comment edit showing ``table`` part-way through (not a boundary edit)."""
    if request.method != "PATCH" or not re.search(COMMENT, request.path):
        return False
    rows = {t: (state, p) for t, state, p in task_rows(str(request.body["body"]))}
    state, progress = rows[table]
    return state == "running" and 0 < progress < 100


def assert_published(
    github: GitHubStandIn,
    db: Database,
    apply_id: int,
    *,
    epochs: list[int],
    state: str,
    conclusion: str | None,
) -> list[str]:
    """What GitHub shows and what leasehold recorded agree, and every edit is well formed:
    one comment whose every version carries the marker with the epoch of a holder (in order,
    never decreasing) and renders every apply task; the last body shows ``state`` and the DB's
    tasks; one check run concluded at most once, with ``conclusion``. Returns the bodies."""
    comment_id, bodies = the_comment(github)
    task_count = len(applies.tasks(db, apply_id))
    marks = [render.parse_marker(body) for body in bodies]
    assert all(m is not None and m[0] == apply_id for m in marks), marks
    seen = [m[1] for m in marks if m is not None]
    assert seen == sorted(seen), seen
    assert set(seen) <= set(epochs), (seen, epochs)
    for body in bodies:
        assert [row[0] for row in task_rows(body)] == [f"t{i}" for i in range(task_count)], body
    last = bodies[-1]
    assert headline(last) == state, last
    expected_rows = [
        (t["table_name"], t["state"], int(t["progress"])) for t in applies.tasks(db, apply_id)
    ]
    assert task_rows(last) == expected_rows, last
    assert f"lease epoch {seen[-1]}" in last

    record = comment_record(db, apply_id)
    assert record is not None
    assert record["kind"] == render.COMMENT_KIND
    assert record["github_comment_id"] == comment_id
    assert record["last_epoch"] == seen[-1]
    assert record["body_sha256"] == hashlib.sha256(last.encode()).hexdigest()

    run = the_check_run(github)
    assert (run.name, run.head_sha) == (render.CHECK_NAME, SHA)
    assert run.external_id == f"leasehold-apply-{apply_id}"
    history = github.check_run_history(run.id)
    assert history[0].status == "in_progress"
    completions = [v for v in history if v.status == "completed"]
    check = check_record(db, apply_id)
    assert check is not None
    assert check["github_check_run_id"] == run.id
    if conclusion is None:
        assert completions == []
        assert (run.status, check["status"], check["conclusion"]) == ("in_progress",) * 2 + (None,)
    else:
        assert [v.conclusion for v in completions] == [conclusion], history
        assert history[-1].status == "completed"
        assert (check["status"], check["conclusion"]) == ("completed", conclusion)
        assert run.output_summary == render.render_summary(applies.tasks(db, apply_id), state=state)
    return bodies


# --- the comment and the check run over a whole apply --------------------------------------------


def test_a_whole_apply_creates_edits_and_concludes_once(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    apply_id = pr_apply(db, (0.2, 0.2))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, comment_interval=0.05)
    assert run_to_end(runner(db, lease, pub), pub) == Outcome(ApplyState.COMPLETED)

    bodies = assert_published(
        github, db, apply_id, epochs=[lease.epoch, lease.epoch + 1], state="completed",
        conclusion="success",
    )  # fmt: skip
    assert headline(bodies[0]) == "running"
    assert [b for b in bodies if headline(b) != "running"] == [bodies[-1]]
    record = comment_record(db, apply_id)
    assert record is not None
    # An edit made just before the finishing rotation is not recorded: its fence found the lease
    # moved on (a stale holder records nothing). Every recorded edit was made, and the last one
    # recorded is what GitHub shows.
    assert len(bodies) - 2 <= record["edit_count"] <= len(bodies) - 1
    requests = github.requests()
    assert kinds(requests)[:4] == ["GET runs", "POST runs", "GET comments", "POST comments"]
    # the final publication sends only what GitHub does not show yet, and concludes once
    assert kinds(requests)[-4:] == ["GET comment", "PATCH comment", "GET run", "PATCH run"]
    assert all(r.status is not None and r.status < 300 for r in requests)
    assert all(r.auth == "token" for r in requests)
    assert pub.calls == len(requests)
    assert owed(db, apply_id)["due_at"] is None  # nothing owed


@pytest.mark.parametrize("interval", ["frozen", "short"])
def test_boundaries_are_shown_at_once_and_progress_at_most_once_an_interval(
    db: Database, github: GitHubStandIn, token: str, interval: str
) -> None:
    """With the publisher's clock frozen, an interval never passes: there is at most one edit per
    apply task boundary (edits coalesce), however many progress writes a task makes. With a
    short interval, progress within a task is shown as well."""
    # 1.2 s: about 24 progress steps of the sleep engine, so that more than 5 are reported even
    # when a loaded machine stretches each step (0.6 s gave 4 in a CI run).
    apply_id = pr_apply(db, (1.2, 0.05))
    lease = run_lease(db, apply_id)
    clock: Callable[[], float] = FakeClock() if interval == "frozen" else time.monotonic
    pub = publisher(db, lease, github, token, comment_interval=0.05, monotonic=clock)
    run = runner(db, lease, pub)
    assert run_to_end(run, pub) == Outcome(ApplyState.COMPLETED)
    reporter = run.reporter
    assert isinstance(reporter, RecordingReporter)
    partial = reporter.count(lambda r: r.index == 0 and 0 < r.percent < 100)
    assert partial > 5

    bodies = assert_published(
        github, db, apply_id, epochs=[lease.epoch, lease.epoch + 1], state="completed",
        conclusion="success",
    )  # fmt: skip
    boundaries = 1 + 2 * 2  # the start, then each task's start and end
    running = [b for b in bodies if headline(b) == "running"]
    if interval == "frozen":
        assert len(running) <= boundaries
    else:
        assert any(is_progress_edit(r, "t0") for r in github.requests())


@pytest.mark.parametrize(
    ("ending", "conclusion"),
    [("completed", "success"), ("failed", "failure"), ("cancelled", "cancelled")],
)
def test_the_final_state_is_the_last_edit_and_concludes_the_check_run(
    db: Database, github: GitHubStandIn, token: str, ending: str, conclusion: str
) -> None:
    apply_id = pr_apply(db, (0.4, 0.05, 0.05), fail_at=1 if ending == "failed" else None)
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()

    def cancel_mid_task_1(report: Report) -> None:
        if ending == "cancelled" and report.index == 0 and 20 <= report.percent < 100:
            interrupts.interrupt(Reason.CANCEL)

    pub = publisher(db, lease, github, token, interrupts=interrupts, comment_interval=0.05)
    run = runner(db, lease, pub, interrupts=interrupts, hook=cancel_mid_task_1)
    assert run_to_end(run, pub).state == ending

    bodies = assert_published(
        github, db, apply_id, epochs=[lease.epoch, lease.epoch + 1], state=ending,
        conclusion=conclusion,
    )  # fmt: skip
    # published under the lease the end minted (one epoch on), after every running edit
    assert render.parse_marker(bodies[-1]) == (apply_id, lease.epoch + 1)
    assert [b for b in bodies if headline(b) != "running"] == [bodies[-1]]
    expected = {
        "completed": ["completed", "completed", "completed"],
        "failed": ["completed", "failed", "cancelled"],
        "cancelled": ["cancelled", "cancelled", "cancelled"],
    }[ending]
    assert [state for _, state, _ in task_rows(bodies[-1])] == expected
    if ending == "failed":
        assert "```text\nsleep engine: task t1 failed as asked (fail=true)\n```" in bodies[-1]
    assert applies.get(db, apply_id)["state"] == ending


def test_stop_publishes_stopped_and_the_resumed_holder_edits_the_same_comment(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    apply_id = pr_apply(db, (0.4, 0.05))
    first = run_lease(db, apply_id)
    interrupts = Interrupts()

    def stop_mid_task_1(report: Report) -> None:
        if report.index == 0 and 20 <= report.percent < 100:
            interrupts.interrupt(Reason.STOP)

    pub = publisher(db, first, github, token, interrupts=interrupts)
    run = runner(db, first, pub, interrupts=interrupts, hook=stop_mid_task_1)
    assert run_to_end(run, pub) == Outcome(ApplyState.STOPPED)
    stopped_epoch = first.epoch + 1
    bodies = assert_published(
        github, db, apply_id, epochs=[first.epoch, stopped_epoch], state="stopped",
        conclusion=None,
    )  # fmt: skip
    assert headline(bodies[-1]) == "stopped"

    second = run_lease(db, apply_id)  # resume: dispatch from stopped, redeem
    assert second.epoch > stopped_epoch
    before = len(github.requests())
    pub2 = publisher(db, second, github, token)
    assert run_to_end(runner(db, second, pub2), pub2) == Outcome(ApplyState.COMPLETED)
    bodies = assert_published(
        github,
        db,
        apply_id,
        epochs=[first.epoch, stopped_epoch, second.epoch, second.epoch + 1],
        state="completed",
        conclusion="success",
    )
    states = [headline(b) for b in bodies]
    assert states.count("stopped") == 1
    # created once (a creation whose record the stop's rotation beat is adopted by a lookup);
    # the resumed holder found both recorded and looked nothing up
    seen = kinds(github.requests())
    assert seen.count("POST runs") == seen.count("POST comments") == 1
    assert not {"GET runs", "GET comments"} & set(seen[before:])


# --- the runner never waits for GitHub -----------------------------------------------------------


def test_the_runner_never_waits_for_a_github_that_does_not_answer(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """Every request is held inside the stand-in: the apply runs to its end regardless, while
    the publisher's first request is still unanswered. Once GitHub answers, the publisher shows
    the final state (one body after another, never a stale one last)."""
    gate = github.hold("*", ".*")
    apply_id = pr_apply(db, (0.2, 0.2, 0.2))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, timeout=30.0)
    try:
        assert runner(db, lease, pub).run() == Outcome(ApplyState.COMPLETED)
        assert gate.arrived >= 1
        assert gate.answered == 0
        assert applies.get(db, apply_id)["state"] == "completed"
    finally:
        github.clear_faults()
    pub.close()
    assert pub.join(30)
    assert_published(
        github, db, apply_id, epochs=[lease.epoch, lease.epoch + 1], state="completed",
        conclusion="success",
    )  # fmt: skip


def test_the_runner_never_waits_for_a_github_that_refuses_connections(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """Nothing listens where GitHub should be: the apply completes, and what its pull request
    was not shown is owed (``publications``), with the reason, for the reclaim pass."""
    apply_id = pr_apply(db, (0.1, 0.1))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, api_url=support.closed_url(), final_attempts=2)
    assert run_to_end(runner(db, lease, pub), pub) == Outcome(ApplyState.COMPLETED)
    assert pub.published == 0
    record = owed(db, apply_id)
    assert record["due_at"] is not None
    assert record["attempts"] == 2
    assert "request failed" in str(record["last_error"])
    assert github.requests() == []


def test_what_github_could_not_be_shown_is_settled_by_the_reclaim_pass(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """GitHub down through the end of two applies: both owe their final state. A pass while it
    is still down tries one and stops (one call's timeout per pass at most); once it is up, a
    pass publishes both, and the next finds nothing owed."""
    ids = []
    for _ in range(2):
        apply_id = pr_apply(db, (0.05,))
        lease = run_lease(db, apply_id)
        pub = publisher(db, lease, github, token, api_url=support.closed_url(), final_attempts=1)
        assert run_to_end(runner(db, lease, pub), pub) == Outcome(ApplyState.COMPLETED)
        ids.append(apply_id)
    url = str(db.engine.url)
    down = support.settings(url, github_api_url=support.closed_url(), github_token=token)
    up = support.settings(url, github_api_url=github.url, github_token=token)

    support.make_due(db, *ids)
    assert publish_owed(db, down) == 0
    attempts = [owed(db, i)["attempts"] for i in ids]
    assert sorted(attempts) == [1, 2]  # the pass stopped after its first failure

    support.make_due(db, *ids)
    assert publish_owed(db, up) == 2
    for apply_id in ids:
        assert owed(db, apply_id)["due_at"] is None
        bodies = github.comment_history(
            next(c.id for c in github.comments(OWNER, REPO, PR) if f"apply={apply_id} " in c.body)
        )
        assert headline(bodies[-1]) == "completed"
    assert publish_owed(db, up) == 0


# --- lease loss ----------------------------------------------------------------------------------


def test_a_rotation_does_not_wait_for_a_call_in_flight_and_the_stale_holder_records_nothing(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """A progress edit is held inside the stand-in when the lease is taken away: the rotation
    commits at once (the brake never waits for GitHub). The edit then lands, but the stale
    holder records nothing and sends nothing more; its runner stops with ``LeaseLost``."""
    apply_id = pr_apply(db, (0.8, 0.2, 0.2))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, comment_interval=0.05)
    stale = Background(runner(db, lease, pub).run)
    wait_until(
        lambda: any(is_progress_edit(r, "t0") for r in github.requests()),
        timeout=10,
        what="a progress edit of task 1",
    )
    gate = github.hold("PATCH", COMMENT, count=1)
    assert gate.wait_arrived(10)
    new = hand_back(db, lease, reason="test: the lease is taken away mid-call")
    assert gate.answered == 0  # rotated while the call was in flight
    rows = support.snapshot(db)
    gate.release()
    assert gate.wait_answered(10)
    with pytest.raises(LeaseLost):
        stale.result()
    pub.close()
    assert pub.join(10)
    held = max(r.seq for r in github.requests() if r.fault == "held")
    assert [kinds([r]) for r in github.requests() if r.seq > held] == []
    # Nothing recorded; the one write left to the stale holder is closing its own, answered
    # call's effect window, so that the next epoch need not wait for it to run out.
    assert _without_window(support.snapshot(db)) == _without_window(rows)
    assert applies.get(db, apply_id)["effect_until"] is None

    redeem(db, new, "worker-2")
    pub2 = publisher(db, new, github, token)
    assert run_to_end(runner(db, new, pub2), pub2) == Outcome(ApplyState.COMPLETED)
    bodies = assert_published(
        github, db, apply_id, epochs=[lease.epoch, new.epoch, new.epoch + 1],
        state="completed", conclusion="success",
    )  # fmt: skip
    assert render.parse_marker(bodies[-1]) == (apply_id, new.epoch + 1)


def _without_window(rows: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    until = list(metadata.tables["applies"].columns.keys()).index("effect_until")
    return rows | {"applies": [r[:until] + r[until + 1 :] for r in rows["applies"]]}


def test_a_later_epochs_first_change_waits_for_the_earlier_epochs_window(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """The effect window: epoch e's edit is held past the client's timeout (no answer, so e
    leaves its window open: GitHub may still apply the edit). Epoch e+1, redeemed at once and
    not from a reclaim (no lock-delay), runs its apply to the end meanwhile, but its first
    change to GitHub waits until e's window has run out: the two epochs' calls never overlap,
    and e's edit lands first."""
    apply_id = pr_apply(db, (0.8, 0.3))
    lease = run_lease(db, apply_id)
    timeout, grace = 1.0, 1.5  # a window of 2.5 s
    pub = publisher(db, lease, github, token, comment_interval=0.05, timeout=timeout, grace=grace)
    stale = Background(runner(db, lease, pub).run)
    wait_until(
        lambda: any(is_progress_edit(r, "t0") for r in github.requests()),
        timeout=10,
        what="a progress edit of task 1",
    )
    gate = github.hold("PATCH", COMMENT, count=1)
    assert gate.wait_arrived(10)
    new = hand_back(db, lease, reason="test: rotated while an edit is in flight")
    redeem(db, new, "worker-2")
    pub2 = publisher(db, new, github, token, timeout=timeout, grace=grace)
    assert runner(db, new, pub2).run() == Outcome(ApplyState.COMPLETED)  # never waited
    gate.release()
    with pytest.raises(LeaseLost):
        stale.result()
    pub.close()
    pub2.close()
    assert pub.join(10)
    assert pub2.join(30)

    requests = github.requests()
    held = next(r for r in requests if r.fault == "held")
    assert held.answered_at is not None
    changes = [r for r in requests if r.method in ("POST", "PATCH") and r.seq > held.seq]
    assert changes, kinds(requests)
    assert all(r.received_at >= held.answered_at for r in changes)  # after e's call was over
    assert all(render.parse_marker(str(r.body["body"]))[1] > lease.epoch  # type: ignore[index]
               for r in changes if "body" in (r.body or {}) and "comment" in r.path)  # fmt: skip
    assert_published(
        github, db, apply_id, epochs=[lease.epoch, new.epoch, new.epoch + 1],
        state="completed", conclusion="success",
    )  # fmt: skip


# --- a crash between GitHub's answer and our record ----------------------------------------------


@pytest.mark.parametrize("what", ["comment", "check run"])
def test_a_creation_that_landed_but_was_not_recorded_is_adopted(
    db: Database, github: GitHubStandIn, token: str, what: str
) -> None:
    """The creation reaches GitHub and takes effect, but its answer comes after the client's
    timeout, so nothing is recorded. The next attempt finds the comment by its marker (the check
    run by its external_id) and adopts it."""
    path = COMMENTS if what == "comment" else RUNS
    gate = github.hold("POST", path, apply="on_arrival", count=1)
    apply_id = pr_apply(db, (0.05,))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, timeout=0.3)
    try:
        pub.start()
        wait_until(
            lambda: comment_record(db, apply_id) and check_record(db, apply_id),
            timeout=10,
            what="both records",
        )
        assert gate.arrived == 1
    finally:
        gate.release()
    assert gate.wait_answered(5)

    comment_id, _ = the_comment(github)
    run = the_check_run(github)
    record = comment_record(db, apply_id)
    check = check_record(db, apply_id)
    assert record is not None
    assert check is not None
    assert record["github_comment_id"] == comment_id
    assert check["github_check_run_id"] == run.id
    timed_out = [r for r in github.requests() if r.method == "POST" and r.fault == "held"]
    assert len(timed_out) == 1
    posts = [k for k in kinds(github.requests()) if k.startswith("POST")]
    assert posts == ["POST runs", "POST comments"]  # nothing created twice
    if what == "check run":
        assert [v.status for v in github.check_run_history(run.id)] == ["in_progress"]

    # and the apply goes on with the adopted ones
    assert run_to_end(runner(db, lease, pub), pub) == Outcome(ApplyState.COMPLETED)
    assert_published(
        github, db, apply_id, epochs=[lease.epoch, lease.epoch + 1], state="completed",
        conclusion="success",
    )  # fmt: skip


def test_a_conclusion_that_landed_but_was_not_recorded_is_not_sent_again(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """The final publication's check run conclusion reaches GitHub, but its answer comes after
    the client's timeout. GitHub already shows the final body and the conclusion: the next
    attempt records them without sending either again."""
    gate = github.hold("PATCH", RUN, apply="on_arrival", count=1)
    apply_id = pr_apply(db, (0.05,))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, timeout=0.3)
    pub.start()  # created and recorded before the apply runs: only the final publication is left
    wait_until(
        lambda: comment_record(db, apply_id) and check_record(db, apply_id),
        timeout=10,
        what="both records",
    )
    try:
        assert run_to_end(runner(db, lease, pub), pub) == Outcome(ApplyState.COMPLETED)
        assert gate.arrived == 1
    finally:
        gate.release()
    assert gate.wait_answered(5)

    bodies = assert_published(
        github, db, apply_id, epochs=[lease.epoch, lease.epoch + 1], state="completed",
        conclusion="success",
    )  # fmt: skip
    assert [headline(b) for b in bodies].count("completed") == 1
    assert kinds(github.requests())[-5:] == [  # the final publication's two attempts
        "GET comment",  # attempt 1: not shown yet
        "PATCH comment",  # recorded
        "GET run",
        "PATCH run",  # lands, answer too late: not recorded
        "GET run",  # attempt 2: the comment is recorded as shown; the run concluded already
    ]
    assert owed(db, apply_id)["due_at"] is None


# --- rate limits, 5xx answers, the token ---------------------------------------------------------


FAULTS: dict[str, tuple[int, Callable[[GitHubStandIn], None]]] = {
    "secondary 403 + Retry-After on a comment creation": (
        403,
        lambda gh: gh.rate_limit_next(1, "secondary", 1, method="POST", path=COMMENTS),
    ),
    "primary 403 + x-ratelimit-reset on a check run creation": (
        403,
        lambda gh: gh.rate_limit_next(1, "primary", 1, method="POST", path=RUNS),
    ),
    "429 + Retry-After on a comment edit": (
        429,
        lambda gh: gh.rate_limit_next(1, "429", 1, method="PATCH", path=COMMENT),
    ),
    "500 on the comment lookup": (
        500,
        lambda gh: gh.fail_next(1, 500, method="GET", path=COMMENTS),
    ),
    "502 on the check run's conclusion": (
        502,
        lambda gh: gh.fail_next(1, 502, method="PATCH", path=RUN),
    ),
    "503 on a comment edit": (
        503,
        lambda gh: gh.fail_next(1, 503, method="PATCH", path=COMMENT),
    ),
}


@pytest.fixture
def sqlite_db(sqlite_file: str) -> Iterator[Database]:
    """SQLite only, for the HTTP fault matrix: the attempts are the same whatever the store,
    and the fault tests that need the store's locks run on both."""
    database = open_database(sqlite_file)
    support.wipe(database)
    yield database
    database.dispose()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_rate_limits_and_5xx_are_retried_then_published(
    sqlite_db: Database, github: GitHubStandIn, token: str, fault: str
) -> None:
    db = sqlite_db
    status, inject = FAULTS[fault]
    inject(github)
    apply_id = pr_apply(db, (0.05, 0.05))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token)
    assert run_to_end(runner(db, lease, pub), pub) == Outcome(ApplyState.COMPLETED)

    requests = github.requests()
    faulted = [r for r in requests if r.fault is not None]
    assert [r.status for r in faulted] == [status], kinds(requests)
    refused = faulted[0]
    # the same call again, later, and it went through
    (what,) = kinds([refused])
    again = [r for r in requests[refused.seq + 1 :] if kinds([r]) == [what]]
    assert again, kinds(requests)
    assert again[0].status is not None
    assert again[0].status < 300
    if "Retry-After" in fault:  # 1 s asked, 1 s waited (at least)
        assert (again[0].received_at - refused.received_at).total_seconds() >= 0.9
    bodies = assert_published(
        github, db, apply_id, epochs=[lease.epoch, lease.epoch + 1], state="completed",
        conclusion="success",
    )  # fmt: skip
    assert [b for b in bodies if headline(b) != "running"] == [bodies[-1]]


def test_the_token_appears_in_no_log_and_nothing_the_standin_keeps(
    db: Database, github: GitHubStandIn, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    github.rate_limit_next(1, "secondary", 1, method="POST", path=COMMENTS)
    github.fail_next(1, 502, method="PATCH", path=COMMENT)
    github.add_latency(0.5, method="GET", path=RUNS_FOR_REF, count=1)  # one client timeout
    apply_id = pr_apply(db, (0.1, 0.05))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, timeout=0.3, comment_interval=0.02)
    assert run_to_end(runner(db, lease, pub), pub) == Outcome(ApplyState.COMPLETED)
    assert_published(
        github, db, apply_id, epochs=[lease.epoch, lease.epoch + 1], state="completed",
        conclusion="success",
    )  # fmt: skip

    retried = [r.getMessage() for r in caplog.records if "next attempt in" in r.getMessage()]
    # the failures were logged, with their causes (a fault may fall into an attempt that an
    # earlier one already failed, so not necessarily one line each)
    assert len(retried) >= 2, retried
    assert all("(" in r for r in retried), retried
    assert any(r.name.startswith(("httpx", "httpcore")) for r in caplog.records)  # DEBUG on
    secret = token[len("ghp_") :]
    for text in [caplog.text, *(repr(r.__dict__) for r in caplog.records)]:
        assert secret not in text
    assert github.credential_presented(token)
    assert not github.secret_recorded(secret)


def test_no_github_settings_no_effects_and_the_apply_still_completes(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    apply_id = pr_apply(db, (0.05, 0.05))
    lease = run_lease(db, apply_id)
    apply = applies.get(db, apply_id)
    url = str(db.engine.url)
    unconfigured = support.settings(url, github_api_url=github.url)
    configured = support.settings(url, github_api_url=github.url, github_token=token)
    interrupts = Interrupts()
    effects = github_effects(db, lease, interrupts, apply, unconfigured, reclaimed=False)
    assert isinstance(effects, NoEffects)
    without_pr = dict(apply) | {"repository": None, "pull_request": None, "head_sha": None}
    assert isinstance(
        github_effects(db, lease, interrupts, without_pr, configured, reclaimed=False), NoEffects
    )
    configured_effects = github_effects(db, lease, interrupts, apply, configured, reclaimed=True)
    assert isinstance(configured_effects, Publisher)
    configured_effects.close()

    assert runner(db, lease, effects, interrupts=interrupts).run() == Outcome(ApplyState.COMPLETED)
    assert applies.get(db, apply_id)["state"] == "completed"
    assert github.requests() == []
    assert comment_record(db, apply_id) is None
    assert check_record(db, apply_id) is None


# --- lost leases while waiting, and the lock-delay -----------------------------------------------


def _heartbeat(db: Database, lease: Lease, interrupts: Interrupts) -> Heartbeat:
    beat = Heartbeat(db, lease, interrupts, interval=0.05, stale_after=5.0)
    beat.start()
    return beat


def test_a_lease_lost_during_a_backoff_stops_the_publisher_at_once(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """GitHub says: retry in 25 s. The heartbeat finds the lease rotated meanwhile; the
    publisher stops at once and makes no further request."""
    github.rate_limit_next(1, "secondary", 25, method="POST", path=RUNS)
    apply_id = pr_apply(db, (0.05,))
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()
    beat = _heartbeat(db, lease, interrupts)
    try:
        pub = publisher(db, lease, github, token, interrupts=interrupts)
        pub.start()
        wait_until(
            lambda: any(r.fault and r.status == 403 for r in github.requests()),
            timeout=10,
            what="the rate-limited check run creation",
        )
        seen = github.requests()
        hand_back(db, lease, reason="test: taken away during the backoff")
        assert pub.join(10)  # far less than the 25 s GitHub asked for
        assert github.requests() == seen
        assert kinds(seen) == ["GET runs", "POST runs"]
    finally:
        beat.stop()
        beat.join()
    assert check_record(db, apply_id) is None
    assert comment_record(db, apply_id) is None


def _no_request_for(github: GitHubStandIn, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if github.requests():
            return False
        time.sleep(0.01)
    return True


def test_lock_delay_no_request_before_the_grace_has_elapsed(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """A holder whose lease came from a reclaim waits ``effect_grace`` on its own clock
    (injected here) before its first call, then publishes as usual."""
    apply_id = pr_apply(db, (0.05,))
    lease = run_lease(db, apply_id)
    clock = FakeClock()
    pub = publisher(db, lease, github, token, grace=5.0, reclaimed=True, monotonic=clock)
    pub.start()
    assert _no_request_for(github, 0.3)
    clock.advance(4.9)
    assert _no_request_for(github, 0.3)
    clock.advance(0.2)
    wait_until(lambda: comment_record(db, apply_id), timeout=10, what="the comment")
    assert kinds(github.requests()) == ["GET runs", "POST runs", "GET comments", "POST comments"]
    the_comment(github)
    pub.close()
    assert pub.join(10)


def test_a_lease_lost_during_the_lock_delay_publishes_nothing(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    apply_id = pr_apply(db, (0.05,))
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()
    beat = _heartbeat(db, lease, interrupts)
    try:
        pub = publisher(db, lease, github, token, interrupts=interrupts, grace=60.0, reclaimed=True)
        pub.start()
        hand_back(db, lease, reason="test: taken away during the lock-delay")
        assert pub.join(10)
    finally:
        beat.stop()
        beat.join()
    assert github.requests() == []


def test_while_github_fails_attempts_back_off_and_resume_when_it_is_back(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """GitHub down: the publisher's attempts space out (the backoff, on its injected clock),
    however many boundaries the apply crosses; once GitHub is back and the wait is over, the
    comment shows the latest state."""
    apply_id = pr_apply(db, (0.01,))
    lease = run_lease(db, apply_id)
    clock = FakeClock()
    pub = publisher(
        db, lease, github, token, comment_interval=30.0, monotonic=clock,
        backoff=Backoff((10.0, 20.0)),
    )  # fmt: skip
    github.fail_next(100, status=503)
    pub.start()
    wait_until(lambda: pub.failures == 1, timeout=10, what="the first failed attempt")
    failed = len(github.requests())
    for _ in range(5):
        pub.progress(boundary=True)
    clock.advance(9.0)
    assert _no_more_requests(github, failed, 0.3)  # quiet for the backoff, boundaries or not

    github.clear_faults()
    clock.advance(2.0)
    wait_until(lambda: comment_record(db, apply_id), timeout=10, what="the comment")
    assert len(github.comments(OWNER, REPO, PR)) == 1
    pub.close()
    assert pub.join(10)


def _no_more_requests(github: GitHubStandIn, count: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(github.requests()) != count:
            return False
        time.sleep(0.01)
    return True


# --- who asked (issue 14) ------------------------------------------------------------------------


def test_the_comment_names_who_asked_as_literal_text(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """The requester is free text from another app: every body shows it once, in a code span it
    cannot leave, so it mentions nobody, formats nothing and links nothing; and it never carries
    another apply's marker, so that apply's publisher still makes a comment of its own instead of
    adopting this one."""
    other = pr_apply(db, (0.05,))  # on the same pull request, run second
    hostile = (
        f"@acme/dba **now** [x](https://evil.example) `rm` #1 <!-- leasehold apply={other} "
        "epoch=9 -->"
    )
    apply_id = pr_apply(db, (0.05, 0.05), requested_by=hostile)
    for each in (apply_id, other):
        lease = run_lease(db, each)
        pub = publisher(db, lease, github, token, comment_interval=0.02)
        assert run_to_end(runner(db, lease, pub), pub) == Outcome(ApplyState.COMPLETED)

    comments = {render.parse_marker(c.body)[0]: c for c in github.comments(OWNER, REPO, PR)}  # type: ignore[index]
    assert sorted(comments) == sorted([apply_id, other])  # two comments: none was adopted
    expected = "Requested by ``" + hostile.replace("<!", "<\u2060!") + "``"
    bodies = github.comment_history(comments[apply_id].id)
    assert len(bodies) >= 2
    for body in bodies:
        assert [line for line in body.splitlines() if "Requested by" in line] == [expected]
        assert body.count("<!--") == 1  # its own marker only
        assert render.marker_prefix(other) not in body
    assert headline(bodies[-1]) == "completed"
    assert "Requested by" not in github.comment_history(comments[other].id)[-1]
