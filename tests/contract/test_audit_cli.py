"""``leasehold audit [--apply ID] [--json]`` as an operator runs it (the console script's entry
point, in this process: ``tests/cli_runner.py``) on a temporary SQLite store. Clean: exit 0 and
one summary line. Violations: exit 1 and one line each (or a JSON list). An audit that cannot
run (an unknown apply): one error line and exit 2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import insert, text

from storage import applies, open_database
from storage.migrate import upgrade
from storage.tables import apply_logs, control_requests
from tests import support
from tests.contract.test_cli_commands import Home, one_error_line, submit_example


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    url = f"sqlite:///{tmp_path / 'leasehold.sqlite3'}"
    db = open_database(url)
    upgrade(db)
    yield Home(tmp_path, url, db)
    db.dispose()


def stale_log_row(home: Home, apply_id: int) -> int:
    """Plant a log row of epoch 0 after the apply's dispatch (epoch 1); returns its id."""
    with home.db.transaction() as conn:
        result = conn.execute(
            insert(apply_logs).values(
                apply_id=apply_id,
                lease_epoch=0,
                level="info",
                event="task_started",
                message="planted",
                created_at=text("CURRENT_TIMESTAMP"),
            )
        )
    (log_id,) = result.inserted_primary_key or (None,)
    assert log_id is not None
    return int(log_id)


def test_a_clean_store_is_one_summary_line_and_exit_0(home: Home) -> None:
    submit_example(home)
    support.new_apply(home.db)  # queued behind nothing: never dispatched
    before = support.snapshot(home.db)

    assert home.ok("audit") == "audited 2 applies: no violations\n"
    assert json.loads(home.ok("audit", "--json")) == []
    assert home.ok("audit", "--apply", "1") == "audited 1 apply: no violations\n"
    assert support.snapshot(home.db) == before  # read-only


def test_violations_are_one_line_each_and_exit_1(home: Home) -> None:
    dirty, clean = submit_example(home), support.new_apply(home.db)
    first = stale_log_row(home, dirty)
    second = stale_log_row(home, dirty)
    before = support.snapshot(home.db)

    done = home.run("audit")

    assert (done.returncode, done.stderr) == (1, "")
    top = _dispatch_log_id(home, dirty)
    assert done.stdout.splitlines() == [
        f"apply {dirty}: log epoch 0 after 1 (log ids {top}, {first})",
        f"apply {dirty}: log epoch 0 after 1 (log ids {top}, {second})",
    ]
    as_json = home.run("audit", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == [
        {
            "apply_id": dirty,
            "check": "log_epochs",
            "message": f"log epoch 0 after 1 (log ids {top}, {n})",
        }
        for n in (first, second)
    ]
    assert home.ok("audit", "--apply", str(clean)) == "audited 1 apply: no violations\n"
    assert home.run("audit", "--apply", str(dirty)).returncode == 1
    assert support.snapshot(home.db) == before


def _dispatch_log_id(home: Home, apply_id: int) -> int:
    return min(int(r["id"]) for r in applies.logs(home.db, apply_id) if r["event"] == "dispatched")


def test_an_unknown_apply_is_one_clear_line_and_exit_2(home: Home) -> None:
    line = one_error_line(home.run("audit", "--apply", "424242"), code=2)
    assert line == "leasehold: apply 424242 does not exist"


def test_audit_is_listed_with_the_other_commands(home: Home) -> None:
    assert "audit" in home.ok("--help")
    usage = home.ok("audit", "--help")
    assert "--apply ID" in usage
    assert "--json" in usage


def test_a_control_request_nobody_asked_for_is_one_line(home: Home) -> None:
    """The CLI records who runs it (USER@HOST) with every request: its requests audit clean. A
    request that records nobody (a Celery caller that said nothing) is a violation naming it."""
    apply_id = submit_example(home)
    home.ok("stop", str(apply_id))
    assert home.ok("audit") == "audited 1 apply: no violations\n"
    with home.db.transaction() as conn:
        conn.execute(
            insert(control_requests).values(
                apply_id=apply_id,
                action="cancel",
                state="failed",
                requested_by=None,
                created_at=text("CURRENT_TIMESTAMP"),
            )
        )
    (request_id,) = [
        r[0] for r in support.snapshot(home.db)["control_requests"] if r[2] == "cancel"
    ]

    done = home.run("audit")

    assert (done.returncode, done.stderr) == (1, "")
    message = f"control request {request_id} (cancel) records no requester"
    assert done.stdout == f"apply {apply_id}: {message}\n"
    as_json = json.loads(home.run("audit", "--json").stdout)
    assert as_json == [{"apply_id": apply_id, "check": "control_requesters", "message": message}]
