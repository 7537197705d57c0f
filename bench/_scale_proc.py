"""What ``bench/scale.py`` reads from ``/proc``: CPU ticks, RSS and threads summed over processes
(a celery process's group, the store server's processes), and the 1-minute load average it waits
on before a big N."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOAD_POLL = 30.0
LOAD_WAIT = 20 * 60.0


@dataclass(frozen=True)
class ProcSample:
    ticks: int  # utime + stime, clock ticks
    rss_kib: int
    threads: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: fields start after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def group_pids(pgids: Sequence[int]) -> list[int]:
    """Every live process whose process group is one of ``pgids`` (a celery process and any child
    it forked: each is started in a session and group of its own)."""
    wanted = set(pgids)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[2]) in wanted:  # fields[2]: pgrp
            found.append(int(entry.name))
    return found


def named_pids(names: Sequence[str]) -> list[int]:
    """Processes whose command name is one of ``names`` (the store's server processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in names:
            found.append(int(entry.name))
    return found


def proc_sample(pids: Sequence[int]) -> ProcSample:
    """CPU ticks, RSS and threads summed over ``pids`` (those that have gone are left out)."""
    ticks = rss = threads = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("Threads:"):
                threads += int(line.split()[1])
    return ProcSample(ticks, rss, threads)


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_quiet(max_load: float, patience: float = LOAD_WAIT) -> float:
    """Wait (polling every 30 s, up to ``patience``, 20 minutes by default) until the 1-minute
    load is at most ``max_load``; the load measured last (printed: it may still be higher)."""
    deadline = time.monotonic() + patience
    load = load1()
    while load > max_load and time.monotonic() < deadline:
        print(f"   load {load:.2f} > {max_load:g}: waiting {LOAD_POLL:g} s", flush=True)
        time.sleep(LOAD_POLL)
        load = load1()
    return load


def children(parent: int) -> list[int]:
    """The live processes whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == parent:  # fields[1]: ppid
                found.append(int(entry.name))
    return found
