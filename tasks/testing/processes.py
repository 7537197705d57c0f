"""Starting and stopping real ``celery`` worker and beat processes: for ``leasehold run``, the
demo, the end-to-end tests and the failover benchmark alike."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

READY_MARK = "ready."


def celery_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "tasks", *args]


@dataclass
class CeleryProcess:
    """One ``celery`` process in its own process group (so SIGSTOP/SIGKILL reach all of it)."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    logfile: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _ready_from: int = field(default=0, init=False)

    def start(self) -> CeleryProcess:
        # A restart appends to the same log: readiness counts only what this start writes.
        self._ready_from = (
            self.logfile.stat().st_size if self.logfile and self.logfile.exists() else 0
        )
        with ExitStack() as stack:
            out: IO[bytes] | int = subprocess.DEVNULL
            if self.logfile:
                out = stack.enter_context(open(self.logfile, "ab"))  # the child keeps its copy
            self.proc = subprocess.Popen(
                list(self.argv),
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until a worker logged that it is ready (needs ``logfile``)."""
        assert self.logfile is not None, "wait_ready reads the log file"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            assert self.logfile is not None
            if (
                self.logfile.exists()
                and READY_MARK.encode() in self.logfile.read_bytes()[self._ready_from :]
            ):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        if self.logfile is None or not self.logfile.exists():
            return ""
        return self.logfile.read_text(errors="replace")

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int | None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.send_signal(signal.SIGCONT)  # a frozen process cannot shut down
            self.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def worker(
    name: str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    logfile: Path | None = None,
    apply_slots: int | None = None,
    queues: Sequence[str] | None = None,
    loglevel: str = "info",
) -> CeleryProcess:
    """A plain ``celery -A tasks worker``: apply slots and control pool as configured
    (``apply_slots`` overrides ``LEASEHOLD_WORKER_CONCURRENCY``); ``queues``: ``-Q``."""
    argv = celery_argv(
        "worker",
        "--loglevel",
        loglevel,
        "--hostname",
        f"{name}@%h",
        "--without-mingle",
        "--without-gossip",
        *(["--queues", ",".join(queues)] if queues else []),
    )
    if apply_slots is not None:
        env = {
            **(os.environ if env is None else env),
            "LEASEHOLD_WORKER_CONCURRENCY": f"{apply_slots:d}",
        }
    return CeleryProcess(name, argv, env, cwd, logfile)


def beat(
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    logfile: Path | None = None,
    schedule: Path | None = None,
    loglevel: str = "info",
    name: str = "beat",
) -> CeleryProcess:
    args = ["beat", "--loglevel", loglevel]
    if schedule is not None:
        args += ["--schedule", str(schedule)]
    return CeleryProcess(name, celery_argv(*args), env, cwd, logfile)


def flower_installed() -> bool:
    return importlib.util.find_spec("flower") is not None


def run_foreground(*, workers: int = 1, flower: bool = True) -> int:
    """``leasehold run``: workers and beat (and Flower on 127.0.0.1:5555 if installed) until
    Ctrl-C or SIGTERM, which warm-shuts them down (running applies are handed back)."""
    procs = [worker(f"worker{i + 1}") for i in range(workers)] + [beat()]
    if flower and flower_installed():
        procs.append(
            CeleryProcess("flower", celery_argv("flower", "--address=127.0.0.1", "--port=5555"))
        )
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for proc in procs:
            # Inherit the terminal so that the processes' logs show up here.
            proc.proc = subprocess.Popen(list(proc.argv), start_new_session=True)
            print(f"leasehold run: started {proc.name} (pid {proc.pid})", file=sys.stderr)
        while not stopping and all(p.proc is not None and p.proc.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for proc in procs:
            proc.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
