"""The scale bench's short run (``bench/scale.py``, one small N): 20 ``sleep`` applies running at
once on one real ``celery worker`` process with a slot for each and a ``celery beat``, heartbeat
every 1 s, ``stale_after`` 5 s, a reclaim pass every 1 s, a steady state of about 12 s; on the
suite's shared servers: a scratch database on the MariaDB at ``LEASEHOLD_TEST_MYSQL_URL``
(created and dropped here) and Redis database 14 at ``LEASEHOLD_TEST_REDIS_URL`` (broker and
results; emptied before and after).

Correctness, not speed: every apply runs, and stays running through the window; no lease is
reclaimed and no worker presumes one lost (so every heartbeat age stays below ``stale_after``);
every apply ends when cancelled; no process logs a traceback; the bench's
statements-per-apply-second figure is produced (MariaDB's counters are server-wide: other clients
of the shared server inflate it, so only its presence is asserted).
The same machinery as the bench (``bench/_scale_run.py``'s ``ScaleRun``), its flags parsed by
``bench/scale.py``: ``--applies 20 --workers 1 --seconds 30 --window 12 --store mariadb``.
Skipped locally when Redis or MariaDB does not answer, a failure when CI is set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import redis

from bench import scale
from bench._scale_report import print_result
from bench._scale_run import UNFINISHED, ScaleRun
from bench._scale_sampler import Sampler
from bench._scale_servers import stack_on
from bench.failover import Stack, intervals_of
from storage import open_database
from storage.migrate import upgrade
from tests.conftest import scratch_mysql_database, unavailable
from tests.e2e.helpers import client_app, close_client

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

REDIS_URL = os.environ.get("LEASEHOLD_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
REDIS_DB = 14  # the only Redis database this module touches (and flushes)
N = 20
STALE_AFTER = 5.0
ARGV = [
    *("--applies", str(N), "--store", "mariadb", "--servers", "shared", "--workers", "1"),
    *("--seconds", "30", "--window", "12", "--sample-every", "0.5", "--no-plot"),
    *("--heartbeat", "1", "--stale-after", f"{STALE_AFTER:g}", "--reclaim-interval", "1"),
]
ARGS = scale.parse_args(ARGV)
ENDED = ("cancelled", "completed")


@contextmanager
def _redis_database() -> Iterator[str]:
    """Redis database ``REDIS_DB``, empty, with no consumer left behind by an earlier run."""
    url = f"{REDIS_URL}/{REDIS_DB}"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        try:
            client.ping()
            consumers = [
                str(c.get("addr"))
                for c in client.client_list()
                if int(c.get("db", -1)) == REDIS_DB and c.get("cmd") == "brpop"
            ]
        except redis.RedisError as exc:
            unavailable(f"Redis at {REDIS_URL} is not reachable: {exc}")
        if consumers:
            unavailable(
                f"{len(consumers)} connections consume from Redis database {REDIS_DB} (workers "
                f"of a killed run?) and would steal this run's messages: {', '.join(consumers)}"
            )
        client.flushdb()
        yield url
    finally:
        with suppress(redis.RedisError):
            client.flushdb()
        client.close()


@pytest.fixture
def scale_stack(tmp_path: Path) -> Iterator[Stack]:
    """The bench's stack of one store on the shared servers: a migrated scratch database on the
    MariaDB server and a Redis database of this module's own."""
    intervals = intervals_of(ARGS, scale.INTERVALS)
    with scratch_mysql_database("leasehold_scale") as url:
        db = open_database(url)
        try:
            upgrade(db)
        finally:
            db.dispose()
        with _redis_database() as redis_url:
            yield stack_on("mariadb", url, redis_url, tmp_path, intervals)


@pytest.mark.timeout(180)
def test_twenty_applies_run_heartbeat_and_end_without_a_false_reclaim(
    scale_stack: Stack, timing: list[str]
) -> None:
    sampler = Sampler("mariadb", scale_stack.database_url, "")
    client = client_app(scale_stack.env)  # not tasks.app: this process's environment is not set
    try:
        result = ScaleRun("mariadb", scale_stack, sampler, ARGS, None, app=client).run(N)
        print_result(result, float(ARGS.heartbeat))
        ended = {state: sampler.count([state], 0) for state in ENDED}
        unfinished = sampler.count(UNFINISHED, 0)
    finally:
        close_client(client)
        sampler.close()

    logs = "\n".join(result.log_examples)
    assert result.error is None, f"{result.error}\n{logs}"
    assert result.all_running, f"not all {N} applies ran\n{logs}"
    assert result.samples > 0
    assert result.min_running == N, f"only {result.min_running} of {N} ran through the window"
    assert result.reclaims == 0, f"{result.reclaims} false reclaims\n{logs}"
    assert result.presumed_lost == 0, f"{result.presumed_lost} leases presumed lost\n{logs}"
    # What "no false reclaim" means: no heartbeat ever as old as stale_after.
    assert result.max_age < STALE_AFTER, f"heartbeat age max {result.max_age} s"
    assert unfinished == 0, f"{unfinished} applies unfinished after the cancels; ended {ended}"
    assert sum(ended.values()) == N, ended
    tracebacks = {k: v for k, v in result.log_findings.items() if k.endswith(":Traceback")}
    assert not tracebacks, f"{tracebacks}\n{logs}"
    figure = result.statements_per_apply_s
    assert figure is not None
    assert math.isfinite(figure)
    assert figure > 0
    timing.append(
        f"N={N}: all running {result.ramp_s:.1f} s after the first submit; heartbeat age p50 "
        f"{result.p50:.3f} p99 {result.p99:.3f} max {result.max_age:.3f} s; statements per "
        f"apply-second {figure:.3f}; ended {ended}; cancelled in {result.cancel_s:.1f} s; "
        f"log lines {result.log_findings or 'none'}"
    )
