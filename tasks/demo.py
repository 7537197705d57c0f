"""``leasehold demo``: a scripted tour on the embedded default (SQLite + filesystem broker).

A worker is killed mid-apply; beat reclaims the apply and rotates its lease; a second worker
resumes from the last checkpoint and completes it; and a write with the dead worker's lease is
refused. Everything runs in real processes in a scratch folder, and the apply's pull request
lives on the GitHub stand-in, so the progress comment's whole edit history can be shown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tasks
from leases import Lease, fence
from storage import applies, fenced, open_database
from storage.database import Database
from storage.errors import LeaseLost
from tasks.github import render
from tasks.testing.processes import beat, worker
from tasks.testing.standin import GitHubStandIn

# The demo's own apply, not a copy read from examples/apply.json: the wheel carries no examples,
# and the scenario is timed on these durations (worker-a is killed 30% into the second 3 s task,
# with the last one still ahead), so an edit to the users' example must not change the tour.
DEMO_APPLY: dict[str, Any] = {
    "database": "shop",
    "environment": "staging",
    "engine": "sleep",
    "request_id": "example-apply-1",
    "tasks": [
        {
            "table": "orders",
            "ddl": "ALTER TABLE orders ADD COLUMN note VARCHAR(255)",
            "options": {"seconds": 3},
        },
        {
            "table": "customers",
            "ddl": "ALTER TABLE customers ADD INDEX ix_email (email)",
            "options": {"seconds": 3},
        },
        {
            "table": "invoices",
            "ddl": "ALTER TABLE invoices ADD COLUMN paid_at DATETIME",
            "options": {"seconds": 3},
        },
    ],
}
DEMO_TOKEN = "demo-" + "0" * 36  # accepted by the stand-in only
PULL_REQUEST = {"repository": "acme/shop", "pull_request": 42, "head_sha": "c0ffee" + "0" * 34}


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _wait(what: str, check: Callable[[], bool], timeout: float = 60.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"demo: gave up waiting for {what} after {timeout:.0f}s")
        time.sleep(0.1)
    return time.monotonic() - started


def run_demo(folder: Path) -> int:
    with GitHubStandIn([DEMO_TOKEN]) as github:
        return _tour(folder, github)


def _import_root() -> Path:
    """The directory holding the ``tasks`` package this process imported: site-packages when
    installed from a wheel, the checkout when run from source."""
    return Path(tasks.__file__).resolve().parent.parent


def _tour(folder: Path, github: GitHubStandIn) -> int:
    folder = folder.absolute()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = dict(os.environ)
    env.update(
        LEASEHOLD_DATABASE_URL=f"sqlite:///{folder / 'leasehold.sqlite3'}",
        LEASEHOLD_BROKER_URL="filesystem://",
        LEASEHOLD_RESULT_BACKEND=f"db+sqlite:///{folder / 'results.sqlite3'}",
        LEASEHOLD_VAR_DIR=str(folder / "var"),
        LEASEHOLD_HEARTBEAT_INTERVAL="1",
        LEASEHOLD_STALE_AFTER="5",
        LEASEHOLD_RECLAIM_INTERVAL="1",
        LEASEHOLD_EFFECT_TIMEOUT="2",
        LEASEHOLD_EFFECT_GRACE="3",
        LEASEHOLD_COMMENT_INTERVAL="1",
        LEASEHOLD_CHECKPOINT_INTERVAL="1",
        LEASEHOLD_GITHUB_API_URL=github.url,
        LEASEHOLD_GITHUB_TOKEN=DEMO_TOKEN,
    )
    payload = DEMO_APPLY | PULL_REQUEST
    # A real file, submitted by the real CLI, so the tour shows what a user would type.
    submission = folder / "apply.json"
    submission.write_text(json.dumps(payload, indent=2))
    cli = [sys.executable, "-m", "tasks.cli"]

    def leasehold(*args: str) -> str:
        done = subprocess.run(
            [*cli, *args], env=env, cwd=folder, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"leasehold {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    # The children run in the scratch folder, where a checkout's ``tasks`` is not importable; and
    # they must run the very code this process runs, not another leasehold on the path.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(_import_root()), env.get("PYTHONPATH", "")])
    )
    print(f"demo folder: {folder}  (stale_after 5 s, heartbeat 1 s, reclaim every 1 s)")
    print(f"GitHub stand-in: {github.url}  (pull request {payload['repository']}#42)")
    _say("leasehold migrate")
    print(leasehold("migrate").strip())

    db = open_database(env["LEASEHOLD_DATABASE_URL"])
    first = worker("worker-a", env=env, cwd=folder, logfile=folder / "worker-a.log")
    second = worker("worker-b", env=env, cwd=folder, logfile=folder / "worker-b.log")
    ticker = beat(
        env=env, cwd=folder, logfile=folder / "beat.log", schedule=folder / "beat-schedule"
    )
    try:
        _say("starting worker-a and beat")
        first.start().wait_ready()
        ticker.start()
        _say(f"leasehold submit {submission.name} (with a pull request)")
        apply_id = int(_json(leasehold("submit", str(submission)))["apply_id"])
        print(f"apply {apply_id} submitted")

        _wait("worker-a to be 30% into task 2", lambda: _task_progress(db, apply_id, 1) >= 30)
        row = applies.get(db, apply_id)
        stale = Lease(apply_id, int(row["lease_epoch"]), str(row["lease_token"]))
        _say(f"worker-a holds {stale!r} and is into task 2; SIGKILL worker-a")
        print(leasehold("status", str(apply_id)).rstrip())
        first.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        _say("starting worker-b; beat reclaims once the heartbeat is 5 s stale, and worker-b")
        print("resumes task 2 from worker-a's last checkpoint")
        second.start().wait_ready()
        _wait("reclaim", lambda: int(applies.get(db, apply_id)["lease_epoch"]) > stale.epoch)
        print(f"reclaimed {time.monotonic() - killed_at:.1f}s after the kill")
        _wait("completion", lambda: applies.get(db, apply_id)["state"] == "completed")
        print(f"completed {time.monotonic() - killed_at:.1f}s after the kill")

        _say("a write with worker-a's dead lease is refused by the fence")
        _try_stale_write(db, stale)

        _say(f"leasehold status {apply_id}")
        print(leasehold("status", str(apply_id)).rstrip())
        _say(f"leasehold logs {apply_id}  (epochs never decrease)")
        print(leasehold("logs", str(apply_id)).rstrip())
        _show_github(github)
    finally:
        for proc in (first, second, ticker):
            proc.stop()
        db.dispose()
    _say("done: one apply, one worker killed, completed exactly once")
    return 0


def _show_github(github: GitHubStandIn) -> None:
    _say("the pull request's comment, edit by edit (the marker's epoch never decreases)")
    for comment in github.comments("acme", "shop", 42):
        for number, body in enumerate(github.comment_history(comment.id)):
            epoch = (render.parse_marker(body) or (0, 0))[1]
            headline = body.splitlines()[1] if "\n" in body else body
            print(f"  edit {number:>2}  epoch {epoch}  {headline}")
        print("final body:\n" + textwrap.indent(comment.body, "    "))
    for run in github.check_runs():
        print(f"check run {run.id} ({run.external_id}): {run.status}, {run.conclusion}")


def _task_progress(db: Database, apply_id: int, position: int) -> int:
    rows = applies.tasks(db, apply_id)
    if len(rows) <= position or rows[position]["state"] != "running":
        return -1
    return int(rows[position]["progress"])


def _try_stale_write(db: Database, stale: Lease) -> None:
    try:
        with fence(db, stale) as fx:
            fenced.append_log(fx, "stale_write", "this line must never be written")
    except LeaseLost as exc:
        print(f"refused: LeaseLost: {exc}")
    else:  # pragma: no cover - would be a broken fence
        raise SystemExit("demo: the stale write was NOT refused: the fence is broken")


def _json(text: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    return data
