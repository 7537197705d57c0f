"""The ``leasehold`` console script, run as a user runs it, with LEASEHOLD_DATABASE_URL in its
environment: its entry point ``tasks.cli:main`` in this process under that environment alone
(``tests.contract.test_cli_commands.run_cli``: a subprocess per command cost a second each), and
the installed script in a subprocess where only a process of its own shows it: a reader that goes
away (``leasehold logs 7 | head``)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text

from storage import applies, open_database
from storage.database import Database
from storage.migrate import head_revision
from tasks import service
from tests import support
from tests.cli_runner import Ran, run_cli
from tests.support import hand_back

ROOT = Path(__file__).resolve().parents[2]
COMMAND = support.LEASEHOLD


def leasehold(*args: str, url: str, cwd: Path) -> Ran:
    return run_cli(args, support.environment(cwd, LEASEHOLD_DATABASE_URL=url), cwd)


def one_error_line(result: Ran) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("leasehold: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def test_migrate_twice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    head = head_revision()
    first = leasehold("migrate", url=url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "migrated" in first.stdout
    assert head in first.stdout
    second = leasehold("migrate", url=url, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"already at revision {head}" in second.stdout
    assert "migrated" not in second.stdout


def test_status_prints_the_lease_table_without_tokens(
    db: Database, backend_url: str, tmp_path: Path
) -> None:
    first = support.running_lease(db, owner="worker-cli")
    second = hand_back(db, support.running_lease(db), reason="tests")
    line = applies.get(db, first.apply_id)["database_name"]
    queued = support.new_apply(db, database=line)  # behind the first, on its database
    support.insert_control_request(db, first.apply_id, action="stop")
    tokens = [first.token, second.token]

    table = leasehold("status", url=backend_url, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["id", "state", "epoch"]
    rows = {int(line.split()[0]): line for line in lines[1:]}
    assert set(rows) == {first.apply_id, second.apply_id, queued}
    assert rows[first.apply_id].split()[1:3] == ["running", str(first.epoch)]
    assert "worker-cli" in rows[first.apply_id]
    assert first.token[:6] in rows[first.apply_id]
    assert rows[second.apply_id].split()[1:3] == ["dispatched", str(second.epoch)]
    assert rows[queued].split()[1:3] == ["queued", "0"]
    assert rows[queued].endswith(f"{line}/staging (#2 in line)")
    assert rows[first.apply_id].endswith(f"{line}/staging")

    one = leasehold("status", str(first.apply_id), url=backend_url, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert f"lease epoch {first.epoch}" in one.stdout
    assert "pending request " in one.stdout
    assert ": stop by tests, asked " in one.stdout
    waiting = leasehold("status", str(queued), url=backend_url, cwd=tmp_path)
    assert waiting.returncode == 0, waiting.stderr
    assert f"#2 in line on {line}/staging, behind apply {first.apply_id} (running)" in (
        waiting.stdout
    )
    logs = leasehold("logs", str(first.apply_id), url=backend_url, cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert "redeemed" in logs.stdout

    for result in (table, one, waiting, logs):
        for token in tokens:
            assert token not in result.stdout
            assert token not in result.stderr
            assert token[:12] not in result.stdout


def test_status_of_an_empty_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    assert leasehold("migrate", url=url, cwd=tmp_path).returncode == 0
    result = leasehold("status", url=url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(no applies yet)" in result.stdout


def test_status_of_an_unknown_apply(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    assert leasehold("migrate", url=url, cwd=tmp_path).returncode == 0
    line = one_error_line(leasehold("status", "424242", url=url, cwd=tmp_path))
    assert "424242" in line


@pytest.mark.parametrize("command", ["migrate", "status"])
def test_unreachable_mysql_is_one_clear_line(tmp_path: Path, command: str) -> None:
    url = "mysql+mysqldb://leasehold:s3cret@127.0.0.1:1/leasehold"
    result = leasehold(command, url=url, cwd=tmp_path)
    line = one_error_line(result)
    assert "unavailable" in line or "cannot reach" in line
    assert "s3cret" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_migrate_in_a_missing_directory_is_one_clear_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing' / 'leasehold.sqlite3'}"
    line = one_error_line(leasehold("migrate", url=url, cwd=tmp_path))
    assert "unavailable" in line or "cannot reach" in line


def test_migrate_refuses_a_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "foreign.sqlite3"
    url = f"sqlite:///{path}"
    foreign = open_database(url)
    try:
        with foreign.engine.begin() as conn:
            conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total INTEGER)"))
            conn.execute(text("INSERT INTO invoices (id, total) VALUES (1, 99)"))
        line = one_error_line(leasehold("migrate", url=url, cwd=tmp_path))
        assert "foreign database" in line
        with foreign.engine.connect() as conn:
            names = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))
            assert [n for (n,) in names] == ["invoices"]
            assert conn.execute(text("SELECT total FROM invoices")).scalar_one() == 99
    finally:
        foreign.dispose()


@pytest.mark.parametrize("command", [["status"], ["status", "1"], ["logs", "1"], ["stop", "1"]])
def test_an_unmigrated_store_is_one_line_that_says_what_to_do(
    tmp_path: Path, command: list[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'never-migrated.sqlite3'}"
    line = one_error_line(leasehold(*command, url=url, cwd=tmp_path))
    assert line == (
        f"leasehold: the store {url} is not migrated: this leasehold needs revision "
        f"{head_revision()}: run `leasehold migrate`"
    )


def test_a_store_behind_or_ahead_is_named_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    assert leasehold("migrate", url=url, cwd=tmp_path).returncode == 0
    db = open_database(url)
    try:
        with db.transaction() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
        behind = one_error_line(leasehold("status", url=url, cwd=tmp_path))
        assert f"is at revision 0001, this leasehold needs {head_revision()}" in behind
        assert behind.endswith("run `leasehold migrate`")
        with db.transaction() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffff0000ffff'"))
        ahead = one_error_line(leasehold("status", url=url, cwd=tmp_path))
        assert "is at revision ffff0000ffff, which this leasehold does not know" in ahead
    finally:
        db.dispose()


def test_the_cli_stops_quietly_when_its_reader_goes_away(db: Database, tmp_path: Path) -> None:
    """`leasehold logs 7 | head -4`: no BrokenPipeError traceback, exit 0."""
    lease = support.running_lease(db)
    with db.transaction() as conn:
        for i in range(3000):
            conn.execute(
                text(
                    "INSERT INTO apply_logs (apply_id, lease_epoch, level, event, message, "
                    "created_at) VALUES (:a, :e, 'info', 'filler', :m, CURRENT_TIMESTAMP)"
                ),
                {"a": lease.apply_id, "e": lease.epoch, "m": f"line {i} " + "x" * 100},
            )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASEHOLD_")}
    env["LEASEHOLD_DATABASE_URL"] = str(db.engine.url.render_as_string(hide_password=False))
    proc = subprocess.Popen(
        [*COMMAND, "logs", str(lease.apply_id)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    with proc.stdout, proc.stderr:
        first = [proc.stdout.readline() for _ in range(4)]  # what `head -4` reads; it exits
        proc.stdout.close()
        assert all(first)
        assert proc.wait(timeout=60) == 0
        assert proc.stderr.read().decode() == ""


def test_status_json_is_what_get_apply_gives(
    db: Database, backend_url: str, tmp_path: Path
) -> None:
    lease = support.running_lease(db)
    done = leasehold("status", str(lease.apply_id), "--json", url=backend_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    expected = service.get_apply(db, lease.apply_id)
    view.pop("heartbeat_age")
    expected.pop("heartbeat_age")
    assert view == expected
    assert lease.token not in done.stdout
    refused = leasehold("status", "--json", url=backend_url, cwd=tmp_path)
    assert one_error_line(refused) == "leasehold: --json shows one apply: give its id"


def test_status_and_logs_show_who_asked(db: Database, backend_url: str, tmp_path: Path) -> None:
    """Issue 14, on every store: the table, the one-apply view and the log's header name who
    asked for the apply, and the header who asked for each of its control requests."""
    by = "CN=deploy-bot.example.com (as alice)"  # longer than the table's column
    payload = {
        "database": support.new_database(),
        "environment": "staging",
        "engine": "sleep",
        "tasks": [{"table": "orders", "ddl": "ALTER TABLE orders ADD c INT"}],
        "requested_by": by,
    }
    settings = support.settings(backend_url)
    apply_id = service.submit(db, settings, payload, lambda lease: None)
    stop = service.control_apply(db, apply_id, "stop", "ops", lambda lease: None)

    table = leasehold("status", url=backend_url, cwd=tmp_path)
    one = leasehold("status", str(apply_id), url=backend_url, cwd=tmp_path)
    logs = leasehold("logs", str(apply_id), url=backend_url, cwd=tmp_path)

    for done in (table, one, logs):
        assert done.returncode == 0, done.stderr
    (row,) = [line for line in table.stdout.splitlines()[1:] if line.split()[0] == str(apply_id)]
    assert f"  {by[:23]}…  {payload['database']}/staging" in row
    assert one.stdout.splitlines()[1] == f"  requested by {by}"
    assert logs.stdout.splitlines()[:2] == [
        f"apply {apply_id}: {payload['database']} in staging, requested by {by}",
        f"  control request {stop['request_id']}: stop by ops, completed",
    ]
