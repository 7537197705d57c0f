"""``leasehold demo`` from a wheel, in a fresh virtualenv, run in a folder with no source: the
demo must need nothing from the checkout (no ``examples/``, no checkout on ``PYTHONPATH``), and
the wheel must not carry the test suite."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import unavailable

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds, and a stale
# build/lib left there would go into the next wheel; none of this is the project's.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
)
FINAL_LINE = "done: one apply, one worker killed, completed exactly once"
# pip resolves the dependencies on PyPI, which may not answer: that is the environment's fault,
# not the code's, so it is unavailable() (a loud skip locally, a failure in CI).
OFFLINE_SIGNS = (
    "Could not find a version that satisfies",
    "No matching distribution found",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Max retries exceeded",
    "ConnectTimeoutError",
    "ReadTimeoutError",
)


def _clean_env() -> dict[str, str]:
    """No leasehold or Celery settings and no PYTHONPATH leak in from the caller: the installed
    demo has to stand on its own."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LEASEHOLD_", "CELERY_")) and k != "PYTHONPATH"
    }


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _pip_step(what: str, argv: list[str], cwd: Path) -> None:
    done = subprocess.run(
        argv, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode == 0:
        return
    output = done.stdout + done.stderr
    if any(sign in output for sign in OFFLINE_SIGNS):
        unavailable(f"{what} needs PyPI, which did not answer:\n{_tail(output, 15)}")
    pytest.fail(f"{what} failed ({done.returncode}):\n{_tail(output)}", pytrace=False)


def _run_demo(leasehold: Path, folder: Path, cwd: Path) -> tuple[int | None, str, str]:
    """The exit status (None if it hung) and output of ``leasehold demo``."""
    with subprocess.Popen(
        [str(leasehold), "demo", "--dir", str(folder)],
        cwd=cwd,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as demo:
        try:
            out, err = demo.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            # Its workers run in sessions of their own, out of reach of a kill: Ctrl-C lets
            # the demo's own cleanup stop them.
            demo.send_signal(signal.SIGINT)
            try:
                out, err = demo.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                demo.kill()
                out, err = demo.communicate()
            return None, out, err
        return demo.returncode, out, err


@pytest.mark.timeout(900)
def test_installed_demo_runs_outside_the_checkout(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE, symlinks=True)
    wheels = tmp_path / "wheels"
    _pip_step(
        "building the wheel",
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("leasehold-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    carried = [name for name in names if name.startswith(("tests/", "examples/"))]
    assert not carried, f"the wheel carries the test suite or the examples: {carried[:10]}"
    assert "tasks/demo.py" in names, "the wheel has no demo to run"
    shutil.rmtree(source)  # the demo below must not find it

    venv = tmp_path / "venv"
    _pip_step("creating a virtualenv", [sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    _pip_step(
        "installing the wheel",
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        cwd=tmp_path,
    )

    # A folder with no source in it: nothing here can stand in for what the wheel lacks.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    status, out, err = _run_demo(venv / "bin" / "leasehold", tmp_path / "demo", cwd=elsewhere)
    report = f"stdout:\n{_tail(out)}\nstderr:\n{_tail(err)}"
    assert status is not None, f"leasehold demo did not finish in 600 s\n{report}"
    assert status == 0, f"leasehold demo exited with {status}\n{report}"
    assert FINAL_LINE in out, f"leasehold demo did not get to its end\n{report}"
