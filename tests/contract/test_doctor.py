"""``leasehold doctor`` against each broken set-up it claims to detect that needs no worker
process: a store that is unmigrated, unreachable or behind; a broker that does not answer;
no worker; no beat; leasehold messages waiting in Celery's default queue; a stale apply that
no reclaim pass took over; a contradictory configuration. Run as an operator runs it: the console
script in a subprocess, configured by LEASEHOLD_* only. (With real workers and beat:
``tests/e2e/test_doctor.py``.)
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from storage import marks, open_database
from storage.database import Database
from storage.migrate import head_revision, upgrade
from tests import support
from tests.certs import self_signed
from tests.e2e.helpers import client_app

COMMAND = support.LEASEHOLD


def environment(folder: Path, **variables: str) -> dict[str, str]:
    url = f"sqlite:///{folder / 'leasehold.sqlite3'}"
    return support.environment(folder, **{"LEASEHOLD_DATABASE_URL": url, **variables})


def doctor(env: dict[str, str], cwd: Path) -> tuple[int, dict[str, list[str]]]:
    """Exit status, and the lines of each topic (``FAIL  store  ...`` -> store: [FAIL ...])."""
    done = subprocess.run(
        [*COMMAND, "doctor", "--timeout", "0.5"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    topics: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] in ("ok", "warn", "FAIL"):
            topics.setdefault(parts[1], []).append(f"{parts[0]} {parts[2]}")
    return done.returncode, topics


@pytest.fixture
def migrated(tmp_path: Path) -> tuple[dict[str, str], Database]:
    env = environment(tmp_path)
    db = open_database(env["LEASEHOLD_DATABASE_URL"])
    upgrade(db)
    return env, db


def test_an_unmigrated_store(tmp_path: Path) -> None:
    env = environment(tmp_path)
    code, topics = doctor(env, tmp_path)
    assert code == 1
    (store,) = topics["store"]
    assert store.startswith("FAIL the store sqlite:///")
    assert f"is not migrated: this leasehold needs revision {head_revision()}" in store
    assert "beat" not in topics  # nothing more is read from a store that is not there yet


def test_an_unreachable_store(tmp_path: Path) -> None:
    env = environment(tmp_path, LEASEHOLD_DATABASE_URL="mysql+mysqldb://root@127.0.0.1:1/x")
    code, topics = doctor(env, tmp_path)
    assert code == 1
    assert topics["store"][0].startswith("FAIL cannot reach mysql+mysqldb://root@127.0.0.1:1/x")


def test_an_unreachable_broker(migrated: tuple[dict[str, str], Database], tmp_path: Path) -> None:
    env, _ = migrated
    env["LEASEHOLD_BROKER_URL"] = "redis://127.0.0.1:1/0"
    env["LEASEHOLD_RESULT_BACKEND"] = "redis://127.0.0.1:1/1"
    code, topics = doctor(env, tmp_path)
    assert code == 1
    assert topics["broker"][0].startswith("FAIL cannot reach the broker (redis://)")
    assert "workers" not in topics  # nobody to ask
    # A SQLite store with a broker other machines reach: said, not failed.
    assert any("workers on other machines cannot share" in line for line in topics["config"])


def test_no_worker_no_beat_and_a_stale_apply(
    migrated: tuple[dict[str, str], Database], tmp_path: Path
) -> None:
    env, db = migrated
    lease = support.running_lease(db)
    support.age_heartbeat(db, lease.apply_id, 120)
    code, topics = doctor(env, tmp_path)
    assert code == 1
    assert topics["store"][0].startswith("ok ")
    assert topics["broker"][0] == "ok reachable (filesystem://)"
    assert topics["workers"] == [
        "FAIL no worker answered within 0.5s: start `celery -A tasks worker`"
    ]
    assert topics["beat"][0].startswith("FAIL no reclaim pass ever ran")
    (stale,) = topics["applies"]
    assert stale.startswith(f"FAIL apply {lease.apply_id} (running): heartbeat 12")
    assert stale.endswith("over 30s; no reclaim pass ran since: is beat running?")


def test_a_stale_apply_that_reclaim_passes_skip(
    migrated: tuple[dict[str, str], Database], tmp_path: Path
) -> None:
    """Passes ran since it went stale, yet it is still running: they skip its locked row."""
    env, db = migrated
    lease = support.running_lease(db)
    support.age_heartbeat(db, lease.apply_id, 120)
    marks.touch(db, marks.RECLAIM_PASS, detail="0 rotated")
    _, topics = doctor(env, tmp_path)
    assert topics["beat"][0].startswith("ok last reclaim pass ")
    (stale,) = topics["applies"]
    assert "reclaim passes ran since but skip it: its row is locked" in stale


def test_a_beat_that_stopped(migrated: tuple[dict[str, str], Database], tmp_path: Path) -> None:
    env, db = migrated
    marks.touch(db, marks.RECLAIM_PASS)
    support.age_mark(db, marks.RECLAIM_PASS, 600)
    _, topics = doctor(env, tmp_path)
    (beat,) = topics["beat"]
    assert re.match(r"FAIL the last reclaim pass ran 6\d\ds ago \(one is due every 5s\)", beat)


def test_leasehold_messages_in_celerys_default_queue(
    migrated: tuple[dict[str, str], Database], tmp_path: Path
) -> None:
    """A caller that names no queue sends to 'celery', which no leasehold worker reads."""
    env, _ = migrated
    client = client_app(env)
    try:
        for _ in range(2):
            client.send_task("leasehold.submit_apply", kwargs={}, queue="celery")
        client.send_task("leasehold.control_apply", kwargs={}, queue="celery")
        client.send_task("someone.elses_task", kwargs={}, queue="celery")
    finally:
        client.close()
    code, topics = doctor(env, tmp_path)
    assert code == 1
    (routing,) = topics["routing"]
    assert routing.startswith("FAIL 3 leasehold messages wait in Celery's default queue 'celery'")
    assert "leasehold.control_apply x1, leasehold.submit_apply x2" in routing
    assert routing.endswith(
        "must name queue 'leasehold' (send_task(..., queue=...) or task_routes)"
    )


def test_a_healthy_store_and_routing_say_ok(
    migrated: tuple[dict[str, str], Database], tmp_path: Path
) -> None:
    env, db = migrated
    marks.touch(db, marks.RECLAIM_PASS, detail="0 rotated")
    support.running_lease(db)
    _, topics = doctor(env, tmp_path)
    assert topics["routing"] == ["ok no leasehold message waits in queue 'celery'"]
    assert topics["applies"] == ["ok 1 running, 0 dispatched: none past its staleness"]
    assert topics["config"][0].startswith("ok heartbeat 5s, stale_after 30s")


def test_a_heartbeat_too_close_to_stale_after_is_said(
    migrated: tuple[dict[str, str], Database], tmp_path: Path
) -> None:
    env, _ = migrated
    env["LEASEHOLD_HEARTBEAT_INTERVAL"] = "20"  # accepted (< 30 s), but one slow beat and gone
    _, topics = doctor(env, tmp_path)
    assert any(
        line.startswith("warn LEASEHOLD_HEARTBEAT_INTERVAL (20s) leaves fewer than two")
        for line in topics["config"]
    ), topics["config"]


# --- who may send work (issue 14) ----------------------------------------------------------------


def test_unsigned_messages_on_a_shared_broker_are_a_warning(
    migrated: tuple[dict[str, str], Database], tmp_path: Path
) -> None:
    env, _ = migrated
    env["LEASEHOLD_BROKER_URL"] = "redis://127.0.0.1:1/0"  # unreachable: only the setting counts
    env["LEASEHOLD_RESULT_BACKEND"] = "redis://127.0.0.1:1/1"
    _, topics = doctor(env, tmp_path)
    assert topics["security"] == [
        "warn messages are not signed: any client that can write to the broker can submit, "
        "stop and cancel applies (LEASEHOLD_SECURITY_*, docs/security.md)"
    ]


def test_signed_messages_name_the_signer_and_whom_the_workers_trust(
    migrated: tuple[dict[str, str], Database], tmp_path: Path
) -> None:
    env, _ = migrated
    worker, client = (self_signed(tmp_path, name) for name in ("leasehold-worker", "deploy-bot"))
    env["LEASEHOLD_SECURITY_KEY"] = str(worker.key_path)
    env["LEASEHOLD_SECURITY_CERTIFICATE"] = str(worker.cert_path)
    env["LEASEHOLD_SECURITY_CERT_STORE"] = worker.cert_pem + client.cert_pem
    _, topics = doctor(env, tmp_path)
    assert topics["security"] == [
        "ok messages signed as CN=leasehold-worker; taken only when signed by one of 2 "
        "certificates: CN=deploy-bot, CN=leasehold-worker"
    ]


def test_github_over_plain_http_to_another_host_is_a_warning(
    migrated: tuple[dict[str, str], Database], tmp_path: Path
) -> None:
    env, _ = migrated
    env["LEASEHOLD_GITHUB_API_URL"] = "http://ghe.example/api/v3"
    _, topics = doctor(env, tmp_path)
    assert topics["security"] == [
        "warn LEASEHOLD_GITHUB_API_URL is http:// to ghe.example: GitHub's token crosses the "
        "network in clear"
    ]
    env["LEASEHOLD_GITHUB_API_URL"] = "http://127.0.0.1:9/"  # a local stand-in (the demo)
    _, topics = doctor(env, tmp_path)
    assert "security" not in topics
