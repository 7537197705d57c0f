"""A worker or beat started as an operator starts it refuses a bad configuration, and a store at
another revision, with one line and exit status 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from storage import open_database
from storage.migrate import head_revision, upgrade
from tests import support

pytestmark = pytest.mark.slow


def _env(tmp_path: Path, **variables: str) -> dict[str, str]:
    return support.environment(tmp_path, **variables)


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_celery_refuses_to_start_with_bad_configuration(tmp_path: Path, command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", command, "--loglevel", "warning"],
        env=_env(tmp_path, LEASEHOLD_HEARTBEAT_INTERVAL="60"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "LEASEHOLD_HEARTBEAT_INTERVAL (60s, set) must be shorter than" in done.stderr


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_celery_refuses_to_start_on_a_store_at_another_revision(
    tmp_path: Path, command: str
) -> None:
    """A worker or beat on a store nobody migrated (or one a newer leasehold migrated) exits at
    once with one line saying what to do, instead of failing at its first submit."""
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"

    def start() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tasks", command, "--loglevel", "warning"],
            env=_env(tmp_path, LEASEHOLD_DATABASE_URL=url),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    unmigrated = start()
    assert unmigrated.returncode == 1, unmigrated.stderr[-2000:]
    assert (
        f"leasehold: the store {url} is not migrated: this leasehold needs revision "
        f"{head_revision()}: run `leasehold migrate`"
    ) in unmigrated.stderr
    assert "Traceback" not in unmigrated.stderr

    db = open_database(url)
    try:
        upgrade(db)
        with db.transaction() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffff0000ffff'"))
    finally:
        db.dispose()
    ahead = start()
    assert ahead.returncode == 1, ahead.stderr[-2000:]
    assert "is at revision ffff0000ffff, which this leasehold does not know" in ahead.stderr
