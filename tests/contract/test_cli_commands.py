"""The ``leasehold`` commands that drive applies (submit, status ID, logs, stop, resume, cancel,
retry), run as a user runs them, on a temporary SQLite database and the embedded ``filesystem://``
broker, with no worker. Errors are one clear line and a non-zero exit.

Each command runs in this process (:func:`run_cli`): the console script's entry point,
``tasks.cli:main``, with its argv, under exactly the environment a user's shell would give it,
``celeryconfig`` evaluated afresh under that environment, stdout and stderr captured. A subprocess
per command cost a second of interpreter start and imports each; what a separate process alone can
show (the installed console script, a configuration error at start-up) keeps one here
(``test_the_console_script_reads_its_configuration_at_start``) and in ``test_cli.py``."""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from leases import Lease, fence, mint_token, redeem
from storage import fenced, open_database
from storage.database import Database
from storage.errors import LeaseLost
from storage.migrate import upgrade
from storage.states import ApplyState, TaskState
from tests import support
from tests.celery_fixtures import REPO, task_rows
from tests.cli_runner import Ran, run_cli

_SCRIPT = Path(sys.executable).parent / "leasehold"
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tasks.cli"]
EXAMPLE = REPO / "examples" / "apply.json"
# Who the CLI records when neither --by nor the file says: the user running it, on this host.
OPERATOR = f"{getpass.getuser()}@{socket.gethostname()}"


@dataclass
class Home:
    """A user's working directory: database, broker folder, and how to run ``leasehold``."""

    path: Path
    url: str
    db: Database

    @property
    def queue(self) -> Path:
        return self.path / "var" / "broker" / "queue"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASEHOLD_", "CELERY"))}
        env.update(
            LEASEHOLD_DATABASE_URL=self.url,
            LEASEHOLD_VAR_DIR=str(self.path / "var"),
            PYTHONPATH=str(REPO),
        )
        env.update(extra)
        return env

    def run(self, *args: str, **extra: str) -> Ran:
        """``leasehold ARGS`` (in this process: :func:`run_cli`), ``extra`` in its environment."""
        return run_cli(args, self.env(**extra), self.path)

    def subprocess(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """``leasehold ARGS`` as a process of its own: the installed console script."""
        return subprocess.run(
            [*COMMAND, *args],
            cwd=self.path,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, (done.stdout, done.stderr)
        return done.stdout

    def lease(self, apply_id: int) -> Lease:
        _, epoch, token, _ = support.lease_of(self.db, apply_id)
        assert token is not None
        return Lease(apply_id, epoch, token)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    url = f"sqlite:///{tmp_path / 'leasehold.sqlite3'}"
    db = open_database(url)
    upgrade(db)
    yield Home(tmp_path, url, db)
    db.dispose()


def one_error_line(done: Ran | subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert done.returncode == code, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("leasehold: "), lines[0]
    assert "Traceback" not in done.stderr
    return lines[0]


def submit_example(home: Home) -> int:
    out = home.ok("submit", str(EXAMPLE))
    answer: dict[str, int] = json.loads(out)
    assert set(answer) == {"apply_id"}
    return answer["apply_id"]


def test_submit_prints_the_apply_id_and_rings_the_broker(home: Home) -> None:
    apply_id = submit_example(home)
    row = support.lease_of(home.db, apply_id)
    assert row[:2] == ("dispatched", 1)
    assert [t["table_name"] for t in task_rows(home.db, apply_id)] == [
        "orders",
        "customers",
        "invoices",
    ]
    # No worker here: the run_apply message waits in the filesystem broker's folder.
    (message,) = home.queue.iterdir()
    body = message.read_text()
    assert "leasehold.run_apply" in body
    # The example carries a request_id: submitting it again is the same apply, not a second one.
    assert submit_example(home) == apply_id
    assert len(list(home.queue.iterdir())) == 1


def _write(home: Home, name: str, content: str) -> str:
    path = home.path / name
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{", "is not JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"database": "shop"}', "missing required key 'environment'"),
        (
            json.dumps({**json.loads(EXAMPLE.read_text()), "priority": 1}),
            "unknown payload keys: ['priority']",
        ),
        (
            json.dumps({**json.loads(EXAMPLE.read_text()), "engine": "mysql"}),
            "is not a configured target",
        ),
    ],
    ids=["missing-file", "not-json", "not-an-object", "missing-key", "unknown-key", "target"],
)
def test_submit_of_a_bad_file_is_one_line_and_writes_nothing(
    home: Home, content: str | None, message: str
) -> None:
    path = str(home.path / "absent.json") if content is None else _write(home, "bad.json", content)
    before = support.snapshot(home.db)
    done = home.run("submit", path)
    assert message in one_error_line(done)
    assert done.stdout == ""
    assert support.snapshot(home.db) == before
    assert not home.queue.exists() or not list(home.queue.iterdir())


def test_status_of_one_apply(home: Home) -> None:
    apply_id = submit_example(home)
    lease = home.lease(apply_id)
    redeem(home.db, lease, "worker-cli/1")
    first, second, _ = (t["id"] for t in task_rows(home.db, apply_id))
    with fence(home.db, lease) as fx:
        fenced.finish_task(fx, first, TaskState.COMPLETED)
        fenced.start_task(fx, second)
        fenced.update_task(fx, second, progress=42, checkpoint={"elapsed": 1.26})
    support.age_heartbeat(home.db, apply_id, 125)

    out = home.ok("status", str(apply_id))
    assert out.splitlines()[0] == f"apply {apply_id}: running  (shop in staging)"
    assert f"lease epoch {lease.epoch}, token {lease.token[:6]}…" in out
    assert "owner worker-cli/1" in out
    age = re.search(r"heartbeat (\d+\.\d)s ago", out)
    assert age is not None, out
    assert 125 <= float(age[1]) < 185  # the database's clock, not this process's
    tasks = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\. ", line)]
    assert [t[:4] for t in tasks] == [
        ["1.", "orders", "completed", "100%"],
        ["2.", "customers", "running", "42%"],
        ["3.", "invoices", "pending", "0%"],
    ]
    assert lease.token not in out
    assert lease.token[:7] not in out


def test_logs_show_each_line_with_its_epoch(home: Home) -> None:
    apply_id = submit_example(home)
    lease = home.lease(apply_id)
    redeem(home.db, lease, "worker-cli/1")
    with fence(home.db, lease) as fx:
        fenced.append_log(fx, "note", "a line from the runner")
    out = home.ok("logs", str(apply_id))
    header, *lines = out.splitlines()
    assert header == f"apply {apply_id}: shop in staging, requested by {OPERATOR}"
    assert len(lines) == 3
    assert [re.findall(r"epoch +(\d+)", line)[0] for line in lines] == ["1", "1", "1"]
    assert "dispatched" in lines[0]
    assert "redeemed" in lines[1]
    assert "a line from the runner" in lines[2]
    assert lease.token not in out


def _control(home: Home, action: str, apply_id: int, code: int = 0) -> dict[str, Any]:
    done = home.run(action, str(apply_id), "--by", "cli-test")
    assert done.returncode == code, (done.stdout, done.stderr)
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_stop_resume_cancel_of_an_apply_nobody_owns(home: Home) -> None:
    apply_id = submit_example(home)
    outstanding = home.lease(apply_id)

    stopped = _control(home, "stop", apply_id)
    assert (stopped["request_state"], stopped["apply_state"]) == ("completed", "stopped")
    assert support.lease_of(home.db, apply_id)[:2] == ("stopped", 2)

    resumed = _control(home, "resume", apply_id)
    assert (resumed["request_state"], resumed["apply_state"]) == ("completed", "dispatched")
    assert support.lease_of(home.db, apply_id)[:2] == ("dispatched", 3)
    assert len(list(home.queue.iterdir())) == 2  # the resumed lease was sent too

    cancelled = _control(home, "cancel", apply_id)
    assert (cancelled["request_state"], cancelled["apply_state"]) == ("completed", "cancelled")
    assert [t["state"] for t in task_rows(home.db, apply_id)] == ["cancelled"] * 3
    assert [e for e, _ in support.log_events(home.db, apply_id)] == [1, 2, 3, 4]

    # The lease of the first message can no longer redeem anything.
    with pytest.raises(LeaseLost):
        redeem(home.db, outstanding, "late-worker")


def test_a_request_that_cannot_apply_exits_non_zero_with_one_line(home: Home) -> None:
    apply_id = submit_example(home)
    _control(home, "cancel", apply_id)
    before = support.lease_of(home.db, apply_id)
    done = home.run("stop", str(apply_id))
    line = one_error_line(done)
    assert line == f"leasehold: stop {apply_id}: apply is cancelled: nothing to stop"
    assert json.loads(done.stdout)["request_state"] == "failed"
    assert support.lease_of(home.db, apply_id) == before


def test_stop_of_a_running_apply_is_left_to_its_owner(home: Home) -> None:
    apply_id = submit_example(home)
    redeem(home.db, home.lease(apply_id), "worker-cli/1")
    asked = _control(home, "stop", apply_id)
    assert (asked["request_state"], asked["apply_state"]) == ("pending", "running")
    again = _control(home, "stop", apply_id)
    assert again["request_id"] == asked["request_id"]


@pytest.mark.parametrize("command", ["status", "logs", "stop", "resume", "cancel", "retry"])
def test_an_unknown_apply_is_one_clear_line(home: Home, command: str) -> None:
    before = support.snapshot(home.db)
    line = one_error_line(home.run(command, "424242"))
    assert line == "leasehold: apply 424242 does not exist"
    assert support.snapshot(home.db) == before


def _fail_at_second_task(home: Home) -> int:
    """The example apply, run by a worker that completed its first task and failed the second."""
    apply_id = submit_example(home)
    lease = home.lease(apply_id)
    redeem(home.db, lease, "worker-cli/1")
    first, second, _ = (t["id"] for t in task_rows(home.db, apply_id))
    with fence(home.db, lease) as fx:
        fenced.finish_task(fx, first, TaskState.COMPLETED)
        fenced.start_task(fx, second)
        fenced.update_task(fx, second, progress=42, checkpoint={"elapsed": 1.26})
    with fence(home.db, lease, finishing=True) as fx:
        fenced.finish_task(fx, second, TaskState.FAILED, error="target went away")
        fenced.cancel_unfinished_tasks(fx)
        fenced.finish(
            fx,
            new_token=mint_token(),
            successor_token=mint_token(),
            to_state=ApplyState.FAILED,
            event="failed",
            reason="target went away",
            error="target went away",
        )
    return apply_id


def test_retry_of_a_failed_apply_dispatches_it_from_its_failed_task(home: Home) -> None:
    apply_id = _fail_at_second_task(home)
    assert support.lease_of(home.db, apply_id)[:2] == ("failed", 2)

    retried = _control(home, "retry", apply_id)

    assert (retried["action"], retried["request_state"], retried["apply_state"]) == (
        "retry",
        "completed",
        "dispatched",
    )
    assert retried["error"] is None
    assert support.lease_of(home.db, apply_id)[:2] == ("dispatched", 4)  # retried, dispatched
    assert len(list(home.queue.iterdir())) == 2  # the new lease was sent to a worker
    tasks = task_rows(home.db, apply_id)
    assert [t["state"] for t in tasks] == ["completed", "pending", "pending"]
    assert tasks[1]["checkpoint"] == {"elapsed": 1.26}
    status = home.ok("status", str(apply_id))
    assert status.splitlines()[0] == f"apply {apply_id}: dispatched  (shop in staging)"
    assert "error:" not in status
    shown = json.loads(home.ok("status", str(apply_id), "--json"))
    assert (shown["state"], shown["error"], shown["epoch"]) == ("dispatched", None, 4)
    log = home.ok("logs", str(apply_id)).splitlines()
    assert re.search(
        r"epoch +3 +info +retried +epoch 3: retry requested .*it had failed: target "
        r"went away$",
        log[-2],
    ), log
    assert re.search(r"epoch +4 +info +dispatched ", log[-1]), log


@pytest.mark.parametrize(
    ("state", "advice"),
    [
        ("stopped", "resume a stopped one instead (leasehold resume {id})"),
        ("dispatched", "this one has not failed: wait for it to end, or stop or cancel it"),
        ("cancelled", "a cancelled one is final: submit it again"),
    ],
)
def test_retry_of_an_apply_that_has_not_failed_is_one_line_and_changes_nothing(
    home: Home, state: str, advice: str
) -> None:
    apply_id = submit_example(home)
    if state != "dispatched":
        _control(home, "stop" if state == "stopped" else "cancel", apply_id)
    before = support.snapshot(home.db)
    done = home.run("retry", str(apply_id))
    line = one_error_line(done)
    assert line == (
        f"leasehold: apply {apply_id} is {state}: cannot retry: only a failed apply can be "
        f"retried; {advice.format(id=apply_id)}"
    )
    assert done.stdout == ""
    assert support.snapshot(home.db) == before


def test_retry_is_listed_with_the_other_commands(home: Home) -> None:
    out = home.ok("--help")
    assert "retry" in out
    assert "retry a failed apply from its failed task" in home.ok("retry", "--help")


def test_an_id_that_is_not_a_number_is_a_usage_error(home: Home) -> None:
    done = home.run("status", "abc")
    assert done.returncode == 2
    assert "invalid int value: 'abc'" in done.stderr


def test_the_console_script_reads_its_configuration_at_start(home: Home) -> None:
    """The installed ``leasehold`` in a process of its own: celeryconfig is read as it starts,
    and a bad setting is one clear line and exit 2."""
    done = home.subprocess("status", LEASEHOLD_STALE_AFTER="soon")
    line = one_error_line(done, code=2)
    assert (
        line == "leasehold: configuration: LEASEHOLD_STALE_AFTER='soon' is not a number of seconds"
    )


# --- who asked (issue 14) ------------------------------------------------------------------------


def _example(home: Home, **changes: Any) -> str:
    payload = {**json.loads(EXAMPLE.read_text()), **changes}
    return _write(home, "apply.json", json.dumps(payload))


def _submitted(home: Home, *args: str) -> int:
    answer: dict[str, int] = json.loads(home.ok("submit", *args))
    return answer["apply_id"]


@pytest.mark.parametrize(
    ("in_file", "by", "recorded"),
    [
        (None, None, OPERATOR),
        ("deploy-bot", None, "deploy-bot"),
        (None, "alice", "alice"),
        ("deploy-bot", "alice", "alice"),
    ],
    ids=["default-user-at-host", "the-file", "by", "by-over-the-file"],
)
def test_submit_records_who_asked(
    home: Home, in_file: str | None, by: str | None, recorded: str
) -> None:
    changes = {} if in_file is None else {"requested_by": in_file}
    path = _example(home, **changes)
    apply_id = _submitted(home, path, *([] if by is None else ["--by", by]))

    assert json.loads(home.ok("status", str(apply_id), "--json"))["requested_by"] == recorded
    status = home.ok("status", str(apply_id)).splitlines()
    assert status[:2] == [
        f"apply {apply_id}: dispatched  (shop in staging)",
        f"  requested by {recorded}",
    ]
    table = home.ok("status").splitlines()
    assert "requested by" in table[0]
    (row,) = [line for line in table[1:] if line.split()[0] == str(apply_id)]
    assert f"  {recorded[:23]}" in row
    assert row.endswith("shop/staging")
    assert home.ok("logs", str(apply_id)).splitlines()[0] == (
        f"apply {apply_id}: shop in staging, requested by {recorded}"
    )


@pytest.mark.parametrize(
    ("by", "message"),
    [
        ("", "requested_by must hold 1 to 255 characters"),
        ("x" * 256, "requested_by must hold 1 to 255 characters"),
        ("alice\nforged", "requested_by must be printable"),
    ],
    ids=["empty", "too-long", "newline"],
)
def test_submit_with_a_malformed_by_is_one_line_and_writes_nothing(
    home: Home, by: str, message: str
) -> None:
    before = support.snapshot(home.db)
    done = home.run("submit", str(EXAMPLE), "--by", by)
    assert message in one_error_line(done)
    assert support.snapshot(home.db) == before
    assert not home.queue.exists() or not list(home.queue.iterdir())


def test_a_long_requester_is_cut_in_the_table_and_whole_in_the_views(home: Home) -> None:
    long = "CN=deploy-bot.example.com (as alice)"
    apply_id = _submitted(home, str(EXAMPLE), "--by", long)
    (row,) = [
        line for line in home.ok("status").splitlines()[1:] if line.split()[0] == str(apply_id)
    ]
    assert f"  {long[:23]}…  shop/staging" in row
    assert f"  requested by {long}\n" in home.ok("status", str(apply_id))


def test_the_log_header_names_who_asked_for_each_control_request(home: Home) -> None:
    apply_id = _submitted(home, str(EXAMPLE), "--by", "alice")
    stopped = _control(home, "stop", apply_id)  # --by cli-test
    resumed = json.loads(home.ok("resume", str(apply_id)))  # no --by: the CLI's user@host
    refused = home.run("resume", str(apply_id))  # dispatched again: nothing to resume
    assert refused.returncode == 1
    retry_id = json.loads(refused.stdout)["request_id"]

    header = home.ok("logs", str(apply_id)).splitlines()[:4]

    assert header == [
        f"apply {apply_id}: shop in staging, requested by alice",
        f"  control request {stopped['request_id']}: stop by cli-test, completed",
        f"  control request {resumed['request_id']}: resume by {OPERATOR}, completed",
        f"  control request {retry_id}: resume by {OPERATOR}, failed",
    ]
    assert home.ok("audit") == "audited 1 apply: no violations\n"


def test_views_of_an_apply_nobody_named_show_a_dash(home: Home) -> None:
    apply_id = support.new_apply(home.db)  # as a Celery caller that says nothing records it
    assert home.ok("status", str(apply_id)).splitlines()[1] == "  requested by -"
    assert home.ok("logs", str(apply_id)).splitlines()[0].endswith(", requested by -")
    assert json.loads(home.ok("status", str(apply_id), "--json"))["requested_by"] is None
