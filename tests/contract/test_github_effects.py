"""GitHub effects under the fence, in process: ``ApplyRunner`` + ``Publisher`` + a real database
(SQLite and MariaDB) + the GitHub stand-in over real HTTP, with the sleep engine.

What the pull request shows (one comment created on start, edited at task boundaries and at most
once per ``comment_interval`` in between, a terminal edit; one check run, in progress then
concluded), what leasehold records about it, and what a worker that lost its lease, crashed
between GitHub's answer and its commit, met rate limits or 5xx answers, or has no GitHub settings
at all does. No mock: the fence, the database and HTTP are real.
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
from storage import applies, open_database
from storage.applies import NewApply, NewTask
from storage.database import Database
from storage.errors import LeaseLost
from storage.states import ApplyState
from storage.tables import apply_comments, checks
from tasks.effects import NoEffects
from tasks.engines.sleep import SleepEngine
from tasks.github import render
from tasks.github.client import GitHubClient, GitHubConfig
from tasks.github.effects import github_effects
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


def client(github: GitHubStandIn, token: str, *, timeout: float = 5.0) -> GitHubClient:
    return GitHubClient(GitHubConfig(api_url=github.url, token=token, timeout=timeout))


def publisher(
    db: Database,
    lease: Lease,
    github: GitHubStandIn,
    token: str,
    *,
    interrupts: Interrupts | None = None,
    timeout: float = 5.0,
    comment_interval: float = 60.0,
    grace: float = 0.0,
    monotonic: Callable[[], float] = time.monotonic,
    max_retry_after: float = 30.0,
) -> Publisher:
    return Publisher(
        db,
        lease,
        client(github, token, timeout=timeout),
        interrupts or Interrupts(),
        repository=REPOSITORY,
        pull_request=PR,
        head_sha=SHA,
        comment_interval=comment_interval,
        grace=grace,
        monotonic=monotonic,
        max_retry_after=max_retry_after,
    )


def pr_apply(db: Database, seconds: tuple[float, ...], *, fail_at: int | None = None) -> int:
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


def test_comment_created_on_start_edited_at_boundaries_and_once_per_interval(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """The publisher's clock is frozen, so between boundaries it edits only when the test moves
    that clock by one interval: once, mid task 1. Every other progress write is throttled."""
    apply_id = pr_apply(db, (0.5, 0.1))
    lease = run_lease(db, apply_id)
    clock = FakeClock()
    pub = publisher(db, lease, github, token, comment_interval=10.0, monotonic=clock)
    moved = threading.Event()

    def one_interval_mid_task_1(report: Report) -> None:
        if report.index == 0 and 20 <= report.percent < 100 and not moved.is_set():
            moved.set()
            clock.advance(10.0)

    run = runner(db, lease, pub, hook=one_interval_mid_task_1)
    reporter = run.reporter
    assert isinstance(reporter, RecordingReporter)
    assert run.run() == Outcome(ApplyState.COMPLETED)

    bodies = assert_published(
        github, db, apply_id, epochs=[lease.epoch], state="completed", conclusion="success"
    )
    # created on start, then: task 1 starts, its one progress edit, task 1 done, task 2 starts,
    # task 2 done, the terminal edit
    assert [headline(b) for b in bodies] == ["running"] * 6 + ["completed"]
    assert [task_rows(b) for b in bodies[:2]] == [
        [("t0", "pending", 0), ("t1", "pending", 0)],
        [("t0", "running", 0), ("t1", "pending", 0)],
    ]
    (table, state, progress), pending = task_rows(bodies[2])
    assert (table, state, pending) == ("t0", "running", ("t1", "pending", 0))
    assert 20 <= progress < 100
    assert [task_rows(b) for b in bodies[3:]] == [
        [("t0", "completed", 100), ("t1", "pending", 0)],
        [("t0", "completed", 100), ("t1", "running", 0)],
        [("t0", "completed", 100), ("t1", "completed", 100)],
        [("t0", "completed", 100), ("t1", "completed", 100)],
    ]
    # many progress writes, one edit between boundaries
    assert reporter.count(lambda r: r.index == 0 and 0 < r.percent < 100) > 2
    record = comment_record(db, apply_id)
    assert record is not None
    assert record["edit_count"] == len(bodies) - 1 == 6

    requests = github.requests()
    assert kinds(requests) == [
        "GET runs",  # look for a check run to adopt
        "POST runs",
        "GET comments",  # look for a comment to adopt
        "POST comments",
        *["PATCH comment"] * 5,
        "GET comment",  # the terminal transition sends only what GitHub does not show yet
        "PATCH comment",
        "GET run",
        "PATCH run",  # concluded inside the terminal transition's fence
    ]
    assert all(r.status is not None and r.status < 300 for r in requests)
    assert all(r.auth == "token" for r in requests)
    assert pub.calls == len(requests)
    run_record = the_check_run(github)
    assert [(v.status, v.conclusion) for v in github.check_run_history(run_record.id)] == [
        ("in_progress", None),
        ("completed", "success"),
    ]


@pytest.mark.parametrize(
    ("ending", "conclusion"),
    [("completed", "success"), ("failed", "failure"), ("cancelled", "cancelled")],
)
def test_terminal_state_is_the_last_edit_and_concludes_the_check_run(
    db: Database, github: GitHubStandIn, token: str, ending: str, conclusion: str
) -> None:
    apply_id = pr_apply(db, (0.4, 0.05, 0.05), fail_at=1 if ending == "failed" else None)
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()

    def cancel_mid_task_1(report: Report) -> None:
        if ending == "cancelled" and report.index == 0 and 20 <= report.percent < 100:
            interrupts.interrupt(Reason.CANCEL)

    pub = publisher(db, lease, github, token, interrupts=interrupts, comment_interval=0.05)
    outcome = runner(db, lease, pub, interrupts=interrupts, hook=cancel_mid_task_1).run()
    assert outcome.state == ending

    bodies = assert_published(
        github, db, apply_id, epochs=[lease.epoch], state=ending, conclusion=conclusion
    )
    terminal = [b for b in bodies if headline(b) != "running"]
    assert terminal == [bodies[-1]]
    expected = {
        "completed": ["completed", "completed", "completed"],
        "failed": ["completed", "failed", "cancelled"],
        "cancelled": ["cancelled", "cancelled", "cancelled"],
    }[ending]
    assert [state for _, state, _ in task_rows(bodies[-1])] == expected
    if ending == "failed":
        assert "> sleep engine: task t1 failed as asked (fail=true)" in bodies[-1]
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
    assert runner(db, first, pub, interrupts=interrupts, hook=stop_mid_task_1).run() == Outcome(
        ApplyState.STOPPED
    )
    bodies = assert_published(
        github, db, apply_id, epochs=[first.epoch], state="stopped", conclusion=None
    )
    assert headline(bodies[-1]) == "stopped"

    second = run_lease(db, apply_id)  # resume: dispatch from stopped, redeem
    assert second.epoch > first.epoch
    pub2 = publisher(db, second, github, token)
    assert runner(db, second, pub2).run() == Outcome(ApplyState.COMPLETED)
    bodies = assert_published(
        github,
        db,
        apply_id,
        epochs=[first.epoch, second.epoch],
        state="completed",
        conclusion="success",
    )
    epochs = [m[1] for b in bodies if (m := render.parse_marker(b))]
    assert epochs[0] == first.epoch
    assert epochs[-1] == second.epoch
    states = [headline(b) for b in bodies]
    assert states.count("stopped") == 1
    assert states.index("stopped") == epochs.index(second.epoch) - 1
    # the resumed holder adopted its own records: no second lookup, no second creation
    lookups = ("GET runs", "GET comments", "POST runs", "POST comments")
    assert [k for k in kinds(github.requests()) if k in lookups] == [
        "GET runs",
        "POST runs",
        "GET comments",
        "POST comments",
    ]


# --- lease loss ----------------------------------------------------------------------------------


def test_after_lease_loss_the_stale_runner_publishes_and_records_nothing(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """The lease is rotated away (``hand_back``, from the test thread) as soon as GitHub has seen
    a progress edit. From then on the stale runner makes no request and writes no row; the next
    holder takes the same comment over at a higher epoch."""
    apply_id = pr_apply(db, (0.8, 0.2, 0.2))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, comment_interval=0.05)
    stale = Background(runner(db, lease, pub).run)

    wait_until(
        lambda: any(is_progress_edit(r, "t0") for r in github.requests()),
        timeout=10,
        what="a progress edit of task 1",
    )
    new = hand_back(db, lease, reason="test: the lease is taken away mid-apply")
    requests, rows = github.requests(), support.snapshot(db)
    with pytest.raises(LeaseLost):
        stale.result()
    assert github.requests() == requests, kinds(github.requests()[len(requests) :])
    assert support.snapshot(db) == rows

    # no terminal publication, nothing concluded, the apply waits for its next holder
    bodies = assert_published(
        github, db, apply_id, epochs=[lease.epoch], state="running", conclusion=None
    )
    assert all(headline(b) == "running" for b in bodies)
    record = comment_record(db, apply_id)
    assert record is not None
    assert record["edit_count"] == len(bodies) - 1
    assert applies.get(db, apply_id)["state"] == "dispatched"

    redeem(db, new, "worker-2")
    assert runner(db, new, publisher(db, new, github, token)).run() == Outcome(ApplyState.COMPLETED)
    bodies = assert_published(
        github,
        db,
        apply_id,
        epochs=[lease.epoch, new.epoch],
        state="completed",
        conclusion="success",
    )
    assert render.parse_marker(bodies[-1]) == (apply_id, new.epoch)


# --- a crash between GitHub's answer and our commit ----------------------------------------------


@pytest.mark.parametrize("what", ["comment", "check run"])
def test_a_creation_that_landed_but_was_not_committed_is_adopted(
    db: Database, github: GitHubStandIn, token: str, what: str
) -> None:
    """The creation reaches GitHub and takes effect, but its answer is held past the client's
    timeout, so the fenced transaction that would have recorded it rolls back. The retry finds
    the comment by its marker (the check run by its external_id) and adopts it."""
    path = COMMENTS if what == "comment" else RUNS
    gate = github.hold("POST", path, apply="on_arrival", count=1)
    apply_id = pr_apply(db, (0.05,))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, timeout=0.3)
    try:
        pub.start()
        assert gate.arrived == 1
    finally:
        gate.release()
    assert gate.wait_answered(5)

    comment_id, bodies = the_comment(github)
    run = the_check_run(github)
    record = comment_record(db, apply_id)
    check = check_record(db, apply_id)
    assert record is not None
    assert check is not None
    assert record["github_comment_id"] == comment_id
    assert check["github_check_run_id"] == run.id
    assert record["body_sha256"] == hashlib.sha256(bodies[-1].encode()).hexdigest()
    timed_out = [r for r in github.requests() if r.method == "POST" and r.fault == "held"]
    assert len(timed_out) == 1
    posts = [k for k in kinds(github.requests()) if k.startswith("POST")]
    assert posts == ["POST runs", "POST comments"]  # nothing created twice
    if what == "comment":
        # created (rolled back on our side), then adopted with an edit of the same body
        assert len(bodies) == 2
        assert bodies[0] == bodies[1]
    else:
        assert [v.status for v in github.check_run_history(run.id)] == ["in_progress"]

    # and the apply goes on with the adopted ones
    assert runner(db, lease, pub).run() == Outcome(ApplyState.COMPLETED)
    assert_published(
        github, db, apply_id, epochs=[lease.epoch], state="completed", conclusion="success"
    )


def test_a_conclusion_that_landed_but_was_not_committed_is_not_sent_again(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """The terminal transition's check run conclusion reaches GitHub, but its answer comes after
    the client's timeout, so the transition (state, final edit, conclusion, rotation) rolls back
    and is retried in a new fence. GitHub already shows the final body and the conclusion: the
    retry records them without sending either again."""
    gate = github.hold("PATCH", RUN, apply="on_arrival", count=1)
    apply_id = pr_apply(db, (0.05,))
    lease = run_lease(db, apply_id)
    pub = publisher(db, lease, github, token, timeout=0.3)
    try:
        assert runner(db, lease, pub).run() == Outcome(ApplyState.COMPLETED)
        assert gate.arrived == 1
    finally:
        gate.release()
    assert gate.wait_answered(5)

    bodies = assert_published(
        github, db, apply_id, epochs=[lease.epoch], state="completed", conclusion="success"
    )
    assert [headline(b) for b in bodies].count("completed") == 1
    record = comment_record(db, apply_id)
    assert record is not None
    assert record["edit_count"] == len(bodies) - 1
    assert kinds(github.requests())[-6:] == [
        "GET comment",  # attempt 1: not shown yet
        "PATCH comment",
        "GET run",
        "PATCH run",  # lands, answer too late: attempt 1 rolls back
        "GET comment",  # attempt 2: shown already
        "GET run",  # concluded already
    ]


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
    """SQLite only, for the HTTP fault matrix: each attempt is a new fence whatever the backend,
    and the fault tests that need the fence to hold across attempts run on both."""
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
    assert runner(db, lease, pub).run() == Outcome(ApplyState.COMPLETED)

    requests = github.requests()
    faulted = [r for r in requests if r.fault is not None]
    assert [r.status for r in faulted] == [status], kinds(requests)
    refused = faulted[0]
    # the same call again, later (a new attempt in a new fence), and it went through
    (what,) = kinds([refused])
    again = [r for r in requests[refused.seq + 1 :] if kinds([r]) == [what]]
    assert again, kinds(requests)
    assert again[0].status is not None
    assert again[0].status < 300
    if "Retry-After" in fault:  # 1 s asked, 1 s waited (at least)
        assert (again[0].received_at - refused.received_at).total_seconds() >= 0.9
    bodies = assert_published(
        github, db, apply_id, epochs=[lease.epoch], state="completed", conclusion="success"
    )
    # a refused terminal call is retried as a whole transition, which does not send again the
    # final body that its first attempt put on GitHub: one terminal body, the last
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
    assert runner(db, lease, pub).run() == Outcome(ApplyState.COMPLETED)
    assert_published(
        github, db, apply_id, epochs=[lease.epoch], state="completed", conclusion="success"
    )

    retried = [r.getMessage() for r in caplog.records if "will retry" in r.getMessage()]
    assert len(retried) == 3, retried  # the failures were logged, with their causes
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
    assert isinstance(
        github_effects(db, lease, interrupts, apply, configured, reclaimed=True), Publisher
    )

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


def test_a_lease_lost_during_a_retry_backoff_stops_retrying_at_once(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """GitHub says: retry in 25 s. The heartbeat finds the lease rotated meanwhile; the
    publisher stops waiting at once with ``LeaseLost`` and makes no further request."""
    github.rate_limit_next(1, "secondary", 25, method="POST", path=RUNS)
    apply_id = pr_apply(db, (0.05,))
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()
    beat = _heartbeat(db, lease, interrupts)
    try:
        pub = publisher(db, lease, github, token, interrupts=interrupts)
        started = Background(pub.start)
        wait_until(
            lambda: any(r.fault and r.status == 403 for r in github.requests()),
            timeout=10,
            what="the rate-limited check run creation",
        )
        seen = github.requests()
        hand_back(db, lease, reason="test: taken away during the backoff")
        with pytest.raises(LeaseLost):
            started.result(timeout=10)  # far less than the 25 s GitHub asked for
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
    """A holder whose lease came from a reclaim waits ``grace`` on its own clock (injected
    here) before its first call, then publishes as usual."""
    apply_id = pr_apply(db, (0.05,))
    lease = run_lease(db, apply_id)
    clock = FakeClock()
    pub = publisher(db, lease, github, token, grace=5.0, monotonic=clock)
    started = Background(pub.start)
    assert _no_request_for(github, 0.3)
    clock.advance(4.9)
    assert _no_request_for(github, 0.3)
    assert not started.done()
    clock.advance(0.2)
    started.result(timeout=10)
    assert kinds(github.requests()) == ["GET runs", "POST runs", "GET comments", "POST comments"]
    the_comment(github)


def test_a_lease_lost_during_the_lock_delay_publishes_nothing(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    apply_id = pr_apply(db, (0.05,))
    lease = run_lease(db, apply_id)
    interrupts = Interrupts()
    beat = _heartbeat(db, lease, interrupts)
    try:
        pub = publisher(db, lease, github, token, interrupts=interrupts, grace=60.0)
        started = Background(pub.start)
        hand_back(db, lease, reason="test: taken away during the lock-delay")
        with pytest.raises(LeaseLost):
            started.result(timeout=10)
    finally:
        beat.stop()
        beat.join()
    assert github.requests() == []


def test_after_giving_up_progress_edits_pause_for_a_comment_interval(
    db: Database, github: GitHubStandIn, token: str
) -> None:
    """GitHub down: one effect gives up after its attempts, and the boundary edits that follow
    within ``comment_interval`` are skipped instead of stalling the apply attempt by attempt."""
    apply_id = pr_apply(db, (0.01,))
    lease = run_lease(db, apply_id)
    clock = FakeClock()
    pub = publisher(db, lease, github, token, comment_interval=30.0, monotonic=clock)
    pub.max_attempts = 2
    pub.pause = lambda attempt, error: None  # type: ignore[method-assign]
    github.fail_next(100, status=503)

    pub.progress(boundary=True)
    failed = len(github.requests())
    assert failed == 2  # both attempts reached GitHub (each a find, answered 503)
    pub.progress(boundary=True)
    clock.advance(29.0)
    pub.progress(boundary=True)
    assert len(github.requests()) == failed  # quiet: nothing sent

    github.clear_faults()
    clock.advance(2.0)
    pub.progress(boundary=True)
    assert len(github.comments(OWNER, REPO, PR)) == 1  # published again once the pause ends
