"""``leasehold run`` on the embedded default: it migrates, starts a worker and beat, runs a
submitted apply to completion, and a SIGTERM shuts it all down warmly with exit status 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import applies, open_database
from tests.celery_fixtures import REPO

pytestmark = pytest.mark.slow
COMMAND = [sys.executable, "-m", "tasks.cli"]


def test_run_serves_a_submitted_apply_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASEHOLD_", "CELERY"))}
    env.update(
        LEASEHOLD_DATABASE_URL=f"sqlite:///{tmp_path / 'leasehold.sqlite3'}",
        LEASEHOLD_VAR_DIR=str(tmp_path / "var"),
        LEASEHOLD_HEARTBEAT_INTERVAL="0.5",
        LEASEHOLD_RECLAIM_INTERVAL="0.5",
        PYTHONPATH=str(REPO),
    )

    def leasehold(*args: str) -> str:
        done = subprocess.run(
            [*COMMAND, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    leasehold("migrate")  # `run` migrates too; a submit may come before it has
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        run = subprocess.Popen(
            [*COMMAND, "run", "--no-flower"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        payload = tmp_path / "apply.json"
        payload.write_text(
            '{"database": "shop", "environment": "dev", "engine": "sleep",'
            ' "tasks": [{"table": "t", "ddl": "ALTER TABLE t ADD c INT",'
            ' "options": {"seconds": 0.3}}]}'
        )
        apply_id = int(json.loads(leasehold("submit", str(payload)))["apply_id"])
        db = open_database(env["LEASEHOLD_DATABASE_URL"])
        deadline = time.monotonic() + 60
        while applies.get(db, apply_id)["state"] != "completed":
            assert run.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        db.dispose()
        os.killpg(run.pid, signal.SIGTERM)
        assert run.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            # SIGTERM lets `run` stop its worker and beat (a SIGKILL would orphan them).
            os.killpg(run.pid, signal.SIGTERM)
            try:
                run.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait(10)
