"""Chaos over real ``celery worker`` / ``celery beat`` processes publishing on the GitHub stand-in
(a real HTTP server in this process): a worker frozen (SIGSTOP) past ``stale_after`` while
another finishes its apply, then woken (SIGCONT); and a worker killed (SIGKILL) while one of its
comment edits is held inside the stand-in.

After each, what the pull request shows obeys the issue's invariants: per comment, the epochs in
the markers of the recorded edits never decrease; exactly one terminal body, and it is the last
edit; exactly one check run per apply, concluded once; and the apply completed exactly once.

Two stacks: the embedded default (SQLite + ``filesystem://``) and Redis (database 15 only, for
broker and results alike) + MariaDB. Fixtures are this module's own: the shared e2e fixtures use
other Redis databases, and every test here needs the stand-in's URL in the processes' env.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from sqlalchemy import select

from storage import applies, open_database, publications
from storage.database import Database
from storage.migrate import upgrade
from storage.tables import apply_comments, checks
from tasks.github import render
from tasks.testing.standin import GitHubStandIn
from tests import support
from tests.conftest import scratch_mysql_database, scratch_postgres_database, unavailable
from tests.e2e.helpers import (
    RESULT_TIMEOUT,
    STALE_AFTER,
    Cluster,
    Stack,
    assert_completed_once,
    client_app,
    describe,
    freeze,
    kill_group,
    owner_worker,
    process_env,
    reclaimed_from,
    row,
    seconds_between,
    sleep_payload,
    submit_task,
    wait_for,
    wait_log,
    wait_progress,
    wait_state,
)

pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("LEASEHOLD_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
REDIS_DB = 15  # the only Redis database this module touches (and flushes)
COMMENT_INTERVAL = 0.3
OWNER, REPO = "acme", "shop"
TERMINAL = {"completed", "failed", "cancelled"}
# a reclaim (stale_after + a reclaim interval), a delivery, the lock-delay and the rest of the
# apply, with room for a slow machine
FINISH_TIMEOUT = STALE_AFTER + 30.0
_ALIVE: list[Cluster] = []


@atexit.register
def _kill_leftovers() -> None:
    """If pytest dies between setup and teardown, no process of ours outlives it."""
    for cluster in _ALIVE:
        for proc in [*cluster.shared, *cluster.own]:
            if proc.proc is not None and proc.proc.poll() is None:
                with suppress(OSError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)


# --- stacks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    """A module's deployment minus GitHub: database, broker and result backend."""

    name: str
    folder: Path
    values: dict[str, str]
    db: Database
    client: Any


@contextmanager
def _redis_store(folder: Path, store: str) -> Iterator[dict[str, str]]:
    """Redis + a scratch database on the ``store`` server (``mysql`` or ``postgres``)."""
    if store == "mysql" and importlib.util.find_spec("MySQLdb") is None:
        unavailable("mysqlclient is not installed; run scripts/bootstrap.sh")
    client = redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}")
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        unavailable(f"Redis at {REDIS_URL} is not reachable: {exc}")
    try:
        scratch = scratch_postgres_database if store == "postgres" else scratch_mysql_database
        with scratch("leasehold_chaos") as url:
            client.flushdb()
            yield {
                "LEASEHOLD_DATABASE_URL": url,
                "LEASEHOLD_BROKER_URL": f"{REDIS_URL}/{REDIS_DB}",
                "LEASEHOLD_RESULT_BACKEND": f"{REDIS_URL}/{REDIS_DB}",
                "LEASEHOLD_VAR_DIR": str(folder / "var"),
            }
    finally:
        with suppress(redis.RedisError):
            client.flushdb()
        client.close()


@contextmanager
def _sqlite(folder: Path) -> Iterator[dict[str, str]]:
    yield {
        "LEASEHOLD_DATABASE_URL": f"sqlite:///{folder / 'leasehold.sqlite3'}",
        "LEASEHOLD_VAR_DIR": str(folder / "var"),
    }


@pytest.fixture(scope="module", params=["sqlite", "redis", "postgres"])
def base(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Base]:
    kind = str(request.param)
    folder = tmp_path_factory.mktemp(f"chaos-{kind}")
    stores = {"redis": "mysql", "postgres": "postgres"}
    settings = _redis_store(folder, stores[kind]) if kind in stores else _sqlite(folder)
    with settings as values:
        db = open_database(values["LEASEHOLD_DATABASE_URL"])
        upgrade(db)
        client = client_app(process_env(values))
        try:
            yield Base(kind, folder, values, db, client)
        finally:
            client.close()
            db.dispose()


@pytest.fixture
def token() -> str:
    return "ghp_" + secrets.token_hex(20)


@pytest.fixture
def github(token: str) -> Iterator[GitHubStandIn]:
    with GitHubStandIn([token]) as standin:
        yield standin


@pytest.fixture
def cluster(base: Base, github: GitHubStandIn, token: str) -> Iterator[Cluster]:
    """This test's processes, configured for the stand-in; all stopped afterwards (SIGCONT,
    SIGTERM, then SIGKILL), failing test or not."""
    support.wipe(base.db)
    env = process_env(
        base.values
        | {
            "LEASEHOLD_GITHUB_API_URL": github.url,
            "LEASEHOLD_GITHUB_TOKEN": token,
            "LEASEHOLD_COMMENT_INTERVAL": str(COMMENT_INTERVAL),
        }
    )
    stack = Stack(
        base.name,
        base.folder,
        base.values["LEASEHOLD_DATABASE_URL"],
        env,
        base.db,
        base.client,
        redis=base.name == "redis",
    )
    made = Cluster(stack)
    _ALIVE.append(made)
    try:
        yield made
    finally:
        made.close()
        _ALIVE.remove(made)


@contextmanager
def logs_on_failure(cluster: Cluster, github: GitHubStandIn, apply_id: list[int]) -> Iterator[None]:
    """On failure, print every process's log, the apply and the stand-in's comment history."""
    try:
        yield
    except BaseException:
        for title, body in cluster.log_sections():
            print(f"----- {title} -----\n{body}")
        for found in apply_id:
            print(f"----- apply -----\n{describe(cluster.stack.db, found)}")
        for comment in github.comments(OWNER, REPO, PULL_REQUEST):
            print(f"----- comment {comment.id} -----")
            for body in github.comment_history(comment.id):
                print(f"{render.parse_marker(body)} {_headline(body)}")
        for run in github.check_runs():
            states = [(v.status, v.conclusion) for v in github.check_run_history(run.id)]
            print(f"----- check run {run.id} {run.external_id}: {states}")
        raise


# --- what the pull request must show -------------------------------------------------------------

PULL_REQUEST = 42


def _headline(body: str) -> str:
    marker = "leasehold apply #"
    line = next((ln for ln in body.splitlines() if marker in ln), "")
    return line.rsplit("**", 2)[-2] if line.count("**") >= 2 else ""


def submit(cluster: Cluster, sha: str, *seconds: float) -> int:
    payload = sleep_payload(*seconds) | {
        "repository": f"{OWNER}/{REPO}",
        "pull_request": PULL_REQUEST,
        "head_sha": sha,
    }
    return submit_task(cluster.stack, payload)


def assert_pull_request_consistent(
    github: GitHubStandIn, db: Database, apply_id: int, sha: str
) -> list[str]:
    """The issue's invariants on what GitHub recorded, and leasehold's records agree."""
    mine = [
        c
        for c in github.comments(OWNER, REPO, PULL_REQUEST)
        if (render.parse_marker(c.body) or (0, 0))[0] == apply_id
    ]
    assert len(mine) == 1, [c.body for c in github.comments(OWNER, REPO, PULL_REQUEST)]
    bodies = github.comment_history(mine[0].id)
    marks = [render.parse_marker(b) for b in bodies]
    assert all(m is not None and m[0] == apply_id for m in marks), bodies
    epochs = [m[1] for m in marks if m is not None]
    assert epochs == sorted(epochs), f"marker epochs went back: {epochs}"
    states = [_headline(b) for b in bodies]
    terminal = [i for i, state in enumerate(states) if state in TERMINAL]
    assert terminal == [len(bodies) - 1], f"terminal bodies at {terminal} of {states}"
    assert states[-1] == "completed"

    runs = [
        r
        for r in github.check_runs(OWNER, REPO, sha)
        if r.external_id == render.external_id(apply_id)
    ]
    assert len(runs) == 1, runs
    history = github.check_run_history(runs[0].id)
    concluded = [(v.status, v.conclusion) for v in history if v.status == "completed"]
    assert concluded == [("completed", "success")], history
    assert history[-1].status == "completed"

    with db.transaction() as conn:
        comment = (
            conn.execute(select(apply_comments).where(apply_comments.c.apply_id == apply_id))
            .mappings()
            .one()
        )
        check = conn.execute(select(checks).where(checks.c.apply_id == apply_id)).mappings().one()
    assert comment["github_comment_id"] == mine[0].id
    assert comment["body_sha256"] == render.digest(bodies[-1])
    assert comment["last_epoch"] == epochs[-1]
    assert (check["github_check_run_id"], check["status"], check["conclusion"]) == (
        runs[0].id,
        "completed",
        "success",
    )
    return bodies


def _sha() -> str:
    return secrets.token_hex(20)


# --- scenarios -----------------------------------------------------------------------------------


def test_sigstop_past_stale_after_then_sigcont_publishes_nothing_stale(
    cluster: Cluster, github: GitHubStandIn
) -> None:
    stack, db = cluster.stack, cluster.stack.db
    procs = cluster.workers(2)
    cluster.beats(1)
    ids: list[int] = []
    with logs_on_failure(cluster, github, ids):
        sha = _sha()
        apply_id = submit(cluster, sha, 0.3, 3.0, 0.3)
        ids.append(apply_id)
        wait_progress(db, apply_id, 1, 20, timeout=RESULT_TIMEOUT)
        before = row(db, apply_id)
        old_epoch = int(before["lease_epoch"])
        victim = owner_worker(before["lease_owner"], procs)
        wait_for(
            "a progress edit of task 2 at the first epoch",
            lambda: any("`t2` | running" in b for c in github.comments(OWNER, REPO, PULL_REQUEST)
                        for b in github.comment_history(c.id)),
            timeout=RESULT_TIMEOUT,
        )  # fmt: skip

        freeze(stack, victim, apply_id)  # SIGSTOP, outside any fence or result write
        wait_state(db, apply_id, "completed", timeout=FINISH_TIMEOUT)
        assert reclaimed_from(db, apply_id) == [old_epoch]
        # the end is published after the terminal commit, by the new holder's publisher thread
        wait_for("the end published", lambda: _published(db, apply_id), timeout=RESULT_TIMEOUT)
        published = github.requests()

        kill_group(victim, signal.SIGCONT)
        wait_log(victim, "lease lost, stopping without further writes", timeout=RESULT_TIMEOUT)
        assert github.requests() == published, "the woken worker reached GitHub"
        bodies = assert_pull_request_consistent(github, db, apply_id, sha)
        epochs = {m[1] for b in bodies if (m := render.parse_marker(b))}
        # the old holder's, the new holder's, and the end's (published under the lease it minted)
        assert epochs == {old_epoch, old_epoch + 1, old_epoch + 2}
        assert_completed_once(db, apply_id)


def test_sigkill_while_an_edit_is_held_then_the_edit_lands(
    cluster: Cluster, github: GitHubStandIn
) -> None:
    """The victim's comment edit is held inside the stand-in (its effect window open) when the
    victim is killed; the stand-in then applies it, as GitHub may apply a request whose sender
    died. The next holder's edits, after reclaim, the lock-delay and the victim's window, come
    later and at a higher epoch."""
    db = cluster.stack.db
    procs = cluster.workers(2)
    cluster.beats(1)
    ids: list[int] = []
    with logs_on_failure(cluster, github, ids):
        sha = _sha()
        apply_id = submit(cluster, sha, 0.3, 3.0, 0.3)
        ids.append(apply_id)
        wait_progress(db, apply_id, 1, 20, timeout=RESULT_TIMEOUT)
        before = row(db, apply_id)
        old_epoch = int(before["lease_epoch"])
        victim = owner_worker(before["lease_owner"], procs)

        gate = github.hold("PATCH", r"/issues/comments/\d+$", count=1)
        assert gate.wait_arrived(RESULT_TIMEOUT), "no comment edit was made"
        held = next(r for r in github.requests() if r.method == "PATCH" and r.status is None)
        assert render.parse_marker(held.body["body"]) == (apply_id, old_epoch)
        kill_group(victim, signal.SIGKILL)
        assert victim.proc is not None
        assert victim.proc.wait(10) == -signal.SIGKILL
        gate.release()  # the dead worker's edit lands now
        assert gate.wait_answered(10)

        wait_state(db, apply_id, "completed", timeout=FINISH_TIMEOUT)
        assert reclaimed_from(db, apply_id) == [old_epoch]
        # the end is published after the terminal commit, by the new holder's publisher thread
        wait_for("the end published", lambda: _published(db, apply_id), timeout=RESULT_TIMEOUT)
        bodies = assert_pull_request_consistent(github, db, apply_id, sha)
        epochs = [m[1] for b in bodies if (m := render.parse_marker(b))]
        assert held.body["body"] in bodies
        landed = bodies.index(held.body["body"])
        assert set(epochs[: landed + 1]) == {old_epoch}
        # the new holder's running edits, if the lock-delay and the window left time for any,
        # then the end's, published under the lease it minted
        assert set(epochs[landed + 1 :]) <= {old_epoch + 1, old_epoch + 2}
        assert epochs[-1] == old_epoch + 2
        assert_completed_once(db, apply_id)


# --- a GitHub outage ------------------------------------------------------------------------------


def _task_span(db: Database, apply_id: int) -> float:
    """Seconds from the first apply task's start to the last one's end, by the store's clock."""
    tasks = applies.tasks(db, apply_id)
    return seconds_between(tasks[0]["started_at"], tasks[-1]["finished_at"])


def test_a_github_that_never_answers_does_not_slow_the_apply_and_its_end_is_published_later(
    cluster: Cluster, github: GitHubStandIn, timing: list[str]
) -> None:
    """The same apply with GitHub up, then with every request held inside the stand-in (GitHub
    accepting connections and never answering): the runner never waits for GitHub, so both
    take about as long. What the held apply's pull request is owed stays owed; once GitHub
    answers again, the worker's publisher or the reclaim pass publishes it: the final body
    once, the check run concluded once."""
    db = cluster.stack.db
    cluster.workers(1)
    cluster.beats(1)
    ids: list[int] = []
    seconds = (0.5, 0.5, 0.5, 0.5)
    with logs_on_failure(cluster, github, ids):
        up_sha = _sha()
        up = submit(cluster, up_sha, *seconds)
        ids.append(up)
        wait_state(db, up, "completed", timeout=FINISH_TIMEOUT)
        wait_for(
            "the completed apply on its pull request",
            lambda: _published(db, up),
            timeout=RESULT_TIMEOUT,
        )
        assert_pull_request_consistent(github, db, up, up_sha)

        seen = len(github.requests())
        github.hold("*", ".*")  # from now on nothing is answered
        down_sha = _sha()
        down = submit(cluster, down_sha, *seconds)
        ids.append(down)
        wait_state(db, down, "completed", timeout=FINISH_TIMEOUT)
        assert len(github.requests()) > seen  # the publisher did try
        assert not _published(db, down)
        owed = publications.get(db, down)
        assert owed is not None
        assert owed["published_at"] is None
        up_s, down_s = _task_span(db, up), _task_span(db, down)
        timing.append(
            f"{cluster.stack.name}: apply of {len(seconds)} x {seconds[0]:g}s tasks: GitHub up "
            f"{up_s:.2f}s, GitHub never answering {down_s:.2f}s (ratio {down_s / up_s:.2f})"
        )

        github.clear_faults()  # GitHub answers again
        wait_for(
            "the owed end published after the outage",
            lambda: _published(db, down),
            timeout=FINISH_TIMEOUT + 60.0,  # the backoff may have grown to 15-30 s meanwhile
        )
        assert_pull_request_consistent(github, db, down, down_sha)
        assert_completed_once(db, down)


def _published(db: Database, apply_id: int) -> bool:
    owed = publications.get(db, apply_id)
    return owed is not None and owed["published_at"] is not None


# --- the embedded broker under concurrent producers ----------------------------------------------

PRODUCER = """
import sys
from kombu.connection import Connection
folder, count = sys.argv[1], int(sys.argv[2])
options = {"data_folder_in": folder, "data_folder_out": folder}
with Connection("filesystem://", transport_options=options) as conn:  # kombu's own producer
    for n in range(count):
        # a minimal kombu envelope: the transport dead-letters anything less (tasks/envelope.py)
        info = {"exchange": "", "routing_key": "q"}
        properties = {"delivery_tag": f"t{n}", "delivery_info": info}
        conn.default_channel._put("q", {"n": n, "pad": "x" * 20000, "properties": properties})
"""


def test_the_embedded_broker_never_hands_out_a_half_written_message(tmp_path: Path) -> None:
    """What crashed a surviving worker in the chaos runs ("Unrecoverable error:
    JSONDecodeError", kombu #1551): kombu's consumer read message files that their producer was
    still writing. ``tasks.broker`` (the ``filesystem://`` transport of every process importing
    ``tasks``) takes only complete files: two producer processes, one consumer, nothing lost,
    nothing half read."""
    import tasks.broker

    count, producers = 1500, 2
    procs = [
        subprocess.Popen([sys.executable, "-c", PRODUCER, str(tmp_path), str(count)])
        for _ in range(producers)
    ]
    got: list[int] = []
    try:
        options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path)}
        connect: Callable[..., Any] = Connection  # kombu is untyped
        with connect("filesystem://", transport_options=options) as conn:
            assert isinstance(conn.transport, tasks.broker.Transport)
            channel = conn.default_channel
            deadline = time.monotonic() + 60
            while len(got) < count * producers and time.monotonic() < deadline:
                try:
                    got.append(int(channel._get("q")["n"]))
                except Empty:
                    time.sleep(0.001)
    finally:
        for proc in procs:
            assert proc.wait(30) == 0
    assert sorted(got) == sorted(list(range(count)) * producers)
