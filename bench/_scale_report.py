"""What ``bench/scale.py`` prints and draws: a run's lines, the table of every run, the PNG
(heartbeat-age p99 and store statements / transactions per running apply against N), and the
headline figures of a store (its largest N that held)."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import _stores
from bench._scale_run import Result


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def print_result(r: Result, interval: float) -> None:
    cores = os.cpu_count() or 1
    print(
        f"   ramp {_f(r.ramp_s)} s; window {r.window_s:.1f} s, {r.samples} samples, running "
        f">= {r.min_running}/{r.n}; heartbeat age p50 {_f(r.p50, 3)} p99 {_f(r.p99, 3)} max "
        f"{_f(r.max_age, 3)} s; false reclaims {r.reclaims}; leases presumed lost by their worker "
        f"{r.presumed_lost}",
        flush=True,
    )
    print(
        f"   per running apply per s: statements {_f(r.statements_per_apply_s, 3)}, "
        f"transactions {_f(r.transactions_per_apply_s, 3)}"
        + (
            f" (sessions of other clients active on the shared server: {r.other_sessions})"
            * bool(r.other_sessions)
        ),
        flush=True,
    )
    print(
        f"   workers: CPU {_f(r.cpu_one_core, 1)}% of one core ({_f(r.cpu_one_core / cores, 1)}% "
        f"of {cores}), RSS {_f(r.rss_mib, 0)} MiB, {r.threads} threads; beat CPU "
        f"{_f(r.beat_cpu, 1)}%; store server CPU {_f(r.store_cpu, 1)}%; peak store sessions "
        f"{r.peak_sessions}; load {_f(r.load_before)} -> {_f(r.load_after)}; cancelled in "
        f"{_f(r.cancel_s, 1)} s; {'OK' if r.ok(interval) else 'NOT OK'}",
        flush=True,
    )
    if r.log_findings:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.log_findings.items()))
        print(f"   logs: {counts}", flush=True)
        for example in r.log_examples:
            print(f"     {example}", flush=True)


def print_table(results: Sequence[Result], interval: float) -> None:
    cores = os.cpu_count() or 1
    print(
        "| store | N | workers x slots | ramp s | hb age p50 / p99 / max s | false reclaims "
        "(presumed lost) | "
        "stmts/s/apply | xacts/s/apply | worker CPU % (1 core / all) | RSS MiB | threads | "
        "peak sessions | load | ok |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.store} | {r.n} | {r.workers} x {r.slots} | {_f(r.ramp_s, 1)} | "
            f"{_f(r.p50)} / {_f(r.p99)} / {_f(r.max_age)} | {r.reclaims} ({r.presumed_lost}) | "
            f"{_f(r.statements_per_apply_s)} | {_f(r.transactions_per_apply_s)} | "
            f"{_f(r.cpu_one_core, 0)} / {_f(r.cpu_one_core / cores, 0)} | {_f(r.rss_mib, 0)} | "
            f"{r.threads} | {r.peak_sessions} | {_f(r.load_before)} | "
            f"{'yes' if r.ok(interval) else 'no'} |"
        )


def plot(results: Sequence[Result], path: Path, interval: float) -> None:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        print(f"plot skipped: matplotlib is not installed ({path} not written)")
        return
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for store in dict.fromkeys(r.store for r in results):
        rows = [r for r in results if r.store == store and r.samples]
        if not rows:
            continue
        ns = [r.n for r in rows]
        series: list[tuple[Any, list[float | None], str, str, str]] = [
            (left, [r.p99 for r in rows], "o", "-", store)
        ]
        if store == _stores.MARIADB:
            series.append(
                (right, [r.statements_per_apply_s for r in rows], "o", "-", f"{store}: statements")
            )
        series.append(
            (right, [r.transactions_per_apply_s for r in rows], "s", ":", f"{store}: transactions")
        )
        for ax, values, marker, style, label in series:
            (line,) = ax.plot(ns, values, marker=marker, linestyle=style, label=label)
            # An N that did not hold (false reclaims, p99 over the line): a hollow marker.
            failed = [
                (n, v) for n, v, r in zip(ns, values, rows, strict=True) if not r.ok(interval)
            ]
            if failed:
                ax.plot(
                    *zip(*failed, strict=True),
                    marker=marker,
                    linestyle="none",
                    markersize=9,
                    markerfacecolor="white",
                    color=line.get_color(),
                )
    left.axhline(
        2 * interval, linestyle="--", color="grey", label=f"2 x heartbeat ({interval:g} s)"
    )
    left.set_yscale("log")
    left.set_xlabel("concurrent applies N")
    left.set_ylabel("heartbeat age p99, s (database clock, log scale)")
    left.set_title("heartbeat age p99 (hollow: N did not hold)")
    left.legend()
    right.set_xlabel("concurrent applies N")
    right.set_ylabel("per running apply per second")
    right.set_ylim(bottom=0)
    right.set_title("store statements / transactions per running apply")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")


def headline(results: Sequence[Result], store: str, interval: float) -> tuple[str, str, str]:
    """(largest qualifying N, its statements/s per apply, its transactions/s per apply)."""
    rows = [r for r in results if r.store == store]
    if not rows:
        return "unavailable", "unavailable", "unavailable"
    good = [r for r in rows if r.ok(interval)]
    if not good:
        return "0", "unavailable", "unavailable"
    best = max(good, key=lambda r: r.n)
    return str(best.n), _f(best.statements_per_apply_s, 3), _f(best.transactions_per_apply_s, 3)
