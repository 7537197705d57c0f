"""``celeryconfig``: every ``LEASEHOLD_*`` variable is checked at start-up, in a fresh process,
exactly as ``celery -A tasks worker`` loads it; defaults need no server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support

_DUMP = """
import json, celeryconfig as c
print(json.dumps({
    "broker_url": c.broker_url,
    "broker_transport_options": getattr(c, "broker_transport_options", None),
    "result_backend": c.result_backend,
    "database_url": c.leasehold_database_url,
    "accept_content": c.accept_content,
    "result_accept_content": c.result_accept_content,
    "task_serializer": c.task_serializer,
    "result_serializer": c.result_serializer,
    "event_serializer": c.event_serializer,
    "worker_send_task_events": c.worker_send_task_events,
    "task_send_sent_event": c.task_send_sent_event,
    "worker_prefetch_multiplier": c.worker_prefetch_multiplier,
    "task_acks_late": c.task_acks_late,
    "task_reject_on_worker_lost": c.task_reject_on_worker_lost,
    "beat_schedule": c.beat_schedule,
    "heartbeat": c.leasehold_heartbeat_interval,
    "stale_after": c.leasehold_stale_after,
    "reclaim": c.leasehold_reclaim_interval,
    "dispatch_timeout": c.leasehold_dispatch_timeout,
    "max_reclaims": c.leasehold_max_reclaims,
    "effect_timeout": c.leasehold_effect_timeout,
    "effect_grace": c.leasehold_effect_grace,
    "targets": c.leasehold_targets,
    "queue": c.leasehold_queue,
    "apply_queue": c.leasehold_apply_queue,
    "apply_slots": c.leasehold_worker_concurrency,
    "worker_concurrency": c.worker_concurrency,
    "task_default_queue": c.task_default_queue,
    "task_queues": c.task_queues,
    "task_routes": c.task_routes,
}))
"""


def _env(tmp_path: Path, **variables: str) -> dict[str, str]:
    return support.environment(tmp_path, **variables)


def _python(code: str, tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=_env(tmp_path, **variables),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_defaults_need_no_server(tmp_path: Path) -> None:
    done = _python(_DUMP, tmp_path)
    assert done.returncode == 0, done.stderr
    conf = json.loads(done.stdout)
    assert conf["broker_url"] == "filesystem://"
    queue = Path(conf["broker_transport_options"]["data_folder_in"])
    assert queue.is_dir()
    assert queue.is_relative_to(tmp_path / "var")
    assert conf["result_backend"].startswith("db+sqlite:///")
    assert conf["result_backend"].endswith(str(tmp_path / "var" / "results.sqlite3"))
    assert conf["database_url"] == f"sqlite:///{tmp_path / 'leasehold.sqlite3'}"
    assert (conf["heartbeat"], conf["stale_after"], conf["reclaim"]) == (5.0, 30.0, 5.0)
    assert (conf["dispatch_timeout"], conf["max_reclaims"]) == (600.0, 5)
    assert conf["effect_grace"] > conf["effect_timeout"]
    assert conf["targets"] == {}


def test_json_only_events_on_prefetch_one_and_no_requeue_forever(tmp_path: Path) -> None:
    done = _python(_DUMP, tmp_path)
    assert done.returncode == 0, done.stderr
    conf = json.loads(done.stdout)
    assert conf["accept_content"] == ["json"]
    assert conf["result_accept_content"] == ["json"]
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["event_serializer"] == "json"
    assert conf["worker_send_task_events"] is True
    assert conf["task_send_sent_event"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    # Late acks together with reject-on-worker-lost would requeue a worker-killing message forever.
    assert not (conf["task_acks_late"] and conf["task_reject_on_worker_lost"])


def test_two_lanes_applies_on_their_own_queue_and_slots(tmp_path: Path) -> None:
    """Applies are routed to their own queue and run on the apply slots; Celery's pool (the
    control lane) serves everything else from the default queue (tasks/slots.py)."""
    done = _python(_DUMP, tmp_path)
    assert done.returncode == 0, done.stderr
    conf = json.loads(done.stdout)
    assert (conf["queue"], conf["apply_queue"]) == ("leasehold", "leasehold.applies")
    assert conf["task_default_queue"] == "leasehold"
    assert sorted(conf["task_queues"]) == ["leasehold", "leasehold.applies"]
    assert conf["task_routes"] == {"leasehold.run_apply": {"queue": "leasehold.applies"}}
    assert (conf["apply_slots"], conf["worker_concurrency"]) == (4, 4)

    done = _python(
        _DUMP,
        tmp_path,
        LEASEHOLD_QUEUE="schema.control",
        LEASEHOLD_APPLY_QUEUE="schema.applies",
        LEASEHOLD_WORKER_CONCURRENCY="16",
        LEASEHOLD_CONTROL_CONCURRENCY="3",
    )
    assert done.returncode == 0, done.stderr
    conf = json.loads(done.stdout)
    assert conf["task_default_queue"] == "schema.control"
    assert sorted(conf["task_queues"]) == ["schema.applies", "schema.control"]
    assert conf["task_routes"] == {"leasehold.run_apply": {"queue": "schema.applies"}}
    assert (conf["apply_slots"], conf["worker_concurrency"]) == (16, 3)


def test_beat_runs_reclaim_every_reclaim_interval(tmp_path: Path) -> None:
    done = _python(_DUMP, tmp_path, LEASEHOLD_RECLAIM_INTERVAL="7.5")
    assert done.returncode == 0, done.stderr
    schedule = json.loads(done.stdout)["beat_schedule"]
    entries = [e for e in schedule.values() if e["task"] == "leasehold.reclaim_stale_applies"]
    assert len(entries) == 1
    assert entries[0]["schedule"] == 7.5


def test_variables_are_read(tmp_path: Path) -> None:
    targets = {"shop": "mysql+mysqldb://u@db/shop"}
    done = _python(
        _DUMP,
        tmp_path,
        LEASEHOLD_HEARTBEAT_INTERVAL="1",
        LEASEHOLD_STALE_AFTER="4",
        LEASEHOLD_DISPATCH_TIMEOUT="60",
        LEASEHOLD_MAX_RECLAIMS="2",
        LEASEHOLD_EFFECT_TIMEOUT="1.5",
        LEASEHOLD_EFFECT_GRACE="2",
        LEASEHOLD_DATABASE_URL="sqlite:////elsewhere/x.sqlite3",
        LEASEHOLD_BROKER_URL="redis://127.0.0.1:6379/9",
        LEASEHOLD_RESULT_BACKEND="redis://127.0.0.1:6379/10",
        LEASEHOLD_TARGETS=json.dumps(targets),
    )
    assert done.returncode == 0, done.stderr
    conf = json.loads(done.stdout)
    assert (conf["heartbeat"], conf["stale_after"], conf["dispatch_timeout"]) == (1.0, 4.0, 60.0)
    assert (conf["max_reclaims"], conf["effect_timeout"], conf["effect_grace"]) == (2, 1.5, 2.0)
    assert conf["database_url"] == "sqlite:////elsewhere/x.sqlite3"
    assert conf["broker_url"] == "redis://127.0.0.1:6379/9"
    assert conf["broker_transport_options"] is None  # filesystem options only for filesystem://
    assert conf["result_backend"] == "redis://127.0.0.1:6379/10"
    assert conf["targets"] == targets


@pytest.mark.parametrize("stale_after", ["4", "1", "600"])
def test_lowering_stale_after_alone_works(tmp_path: Path, stale_after: str) -> None:
    """The heartbeat and the effect timeout follow stale_after unless set: changing it alone
    never makes a default it depends on invalid (and blamed, although nobody set it)."""
    done = _python(_DUMP, tmp_path, LEASEHOLD_STALE_AFTER=stale_after)
    assert done.returncode == 0, done.stderr
    conf = json.loads(done.stdout)
    stale = float(stale_after)
    assert conf["heartbeat"] == min(5.0, stale / 6)
    assert conf["effect_timeout"] == min(10.0, stale / 3)
    assert conf["effect_grace"] == conf["effect_timeout"] + 2.0


def test_defaults_are_unchanged_at_the_default_stale_after(tmp_path: Path) -> None:
    conf = json.loads(_python(_DUMP, tmp_path).stdout)
    assert (conf["heartbeat"], conf["effect_timeout"], conf["effect_grace"]) == (5.0, 10.0, 12.0)


def test_a_refusal_says_which_setting_was_set(tmp_path: Path) -> None:
    done = _python(_DUMP, tmp_path, LEASEHOLD_STALE_AFTER="4", LEASEHOLD_EFFECT_TIMEOUT="6")
    assert done.returncode != 0
    assert (
        "LEASEHOLD_EFFECT_TIMEOUT (6s, set) must be well under LEASEHOLD_STALE_AFTER (4s, set)"
        in done.stderr
    )
    done = _python(_DUMP, tmp_path, LEASEHOLD_HEARTBEAT_INTERVAL="40")
    assert "LEASEHOLD_HEARTBEAT_INTERVAL (40s, set) must be shorter than" in done.stderr
    assert "LEASEHOLD_STALE_AFTER (30s, default)" in done.stderr


def test_targets_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    path.write_text(json.dumps({"shop": "mysql+mysqldb://u@db/shop"}))
    done = _python(_DUMP, tmp_path, LEASEHOLD_TARGETS=str(path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["targets"] == {"shop": "mysql+mysqldb://u@db/shop"}


BAD = [
    pytest.param(
        {"LEASEHOLD_HEARTBEAT_INTERVAL": "30"},
        ["LEASEHOLD_HEARTBEAT_INTERVAL", "LEASEHOLD_STALE_AFTER", "shorter"],
        id="heartbeat-equals-stale-after",
    ),
    pytest.param(
        {"LEASEHOLD_HEARTBEAT_INTERVAL": "10", "LEASEHOLD_STALE_AFTER": "5"},
        ["LEASEHOLD_HEARTBEAT_INTERVAL", "LEASEHOLD_STALE_AFTER"],
        id="heartbeat-over-stale-after",
    ),
    pytest.param(
        {"LEASEHOLD_STALE_AFTER": "thirty"},
        ["LEASEHOLD_STALE_AFTER", "'thirty'", "not a number"],
        id="not-a-number",
    ),
    pytest.param(
        {"LEASEHOLD_RECLAIM_INTERVAL": "-5"},
        ["LEASEHOLD_RECLAIM_INTERVAL", ">= 0"],
        id="negative",
    ),
    pytest.param(
        {"LEASEHOLD_HEARTBEAT_INTERVAL": "0"},
        ["LEASEHOLD_HEARTBEAT_INTERVAL", "greater than 0"],
        id="zero",
    ),
    pytest.param({"LEASEHOLD_STALE_AFTER": "nan"}, ["LEASEHOLD_STALE_AFTER", "finite"], id="nan"),
    pytest.param({"LEASEHOLD_STALE_AFTER": "inf"}, ["LEASEHOLD_STALE_AFTER", "finite"], id="inf"),
    pytest.param(
        {"LEASEHOLD_MAX_RECLAIMS": "2.5"},
        ["LEASEHOLD_MAX_RECLAIMS", "whole number"],
        id="max-reclaims-not-integer",
    ),
    pytest.param(
        {"LEASEHOLD_EFFECT_TIMEOUT": "30", "LEASEHOLD_EFFECT_GRACE": "40"},
        ["LEASEHOLD_EFFECT_TIMEOUT", "LEASEHOLD_STALE_AFTER"],
        id="effect-timeout-equals-stale-after",
    ),
    pytest.param(
        {"LEASEHOLD_EFFECT_TIMEOUT": "10", "LEASEHOLD_EFFECT_GRACE": "10"},
        ["LEASEHOLD_EFFECT_GRACE", "LEASEHOLD_EFFECT_TIMEOUT", "longer"],
        id="grace-equals-effect-timeout",
    ),
    pytest.param(
        {"LEASEHOLD_EFFECT_TIMEOUT": "10", "LEASEHOLD_EFFECT_GRACE": "3"},
        ["LEASEHOLD_EFFECT_GRACE", "LEASEHOLD_EFFECT_TIMEOUT"],
        id="grace-under-effect-timeout",
    ),
    pytest.param(
        {"LEASEHOLD_DISPATCH_TIMEOUT": "5"},
        ["LEASEHOLD_DISPATCH_TIMEOUT", "LEASEHOLD_RECLAIM_INTERVAL"],
        id="dispatch-timeout-not-over-reclaim-interval",
    ),
    pytest.param(
        {"LEASEHOLD_QUEUE": "celery", "LEASEHOLD_APPLY_QUEUE": "celery"},
        ["LEASEHOLD_QUEUE and LEASEHOLD_APPLY_QUEUE must differ", "control plane"],
        id="one-queue-for-both-lanes",
    ),
    pytest.param(
        {"LEASEHOLD_APPLY_QUEUE": "applies; rm -rf"},
        ["LEASEHOLD_APPLY_QUEUE", "is not a queue name"],
        id="bad-queue-name",
    ),
    pytest.param(
        {"LEASEHOLD_WORKER_CONCURRENCY": "0"},
        ["LEASEHOLD_WORKER_CONCURRENCY must be at least 1"],
        id="no-apply-slots",
    ),
    pytest.param(
        {"LEASEHOLD_CONTROL_CONCURRENCY": "0"},
        ["LEASEHOLD_CONTROL_CONCURRENCY must be at least 1"],
        id="no-control-threads",
    ),
    pytest.param(
        {"LEASEHOLD_TARGETS": "{shop: mysql://x}"},
        ["LEASEHOLD_TARGETS", "not JSON"],
        id="targets-not-json",
    ),
    pytest.param(
        {"LEASEHOLD_TARGETS": '{"shop": 5}'},
        ["LEASEHOLD_TARGETS", "name -> URL"],
        id="targets-not-a-map-of-urls",
    ),
    pytest.param(
        {"LEASEHOLD_TARGETS": '["mysql://x"]'},
        ["LEASEHOLD_TARGETS must be a JSON object of name -> URL"],
        id="targets-a-json-list",
    ),
    pytest.param(
        {"LEASEHOLD_TARGETS": "/nonexistent/leasehold-targets.json"},
        ["LEASEHOLD_TARGETS", "cannot read", "/nonexistent/leasehold-targets.json"],
        id="targets-file-unreadable",
    ),
]


@pytest.mark.parametrize(("variables", "expected"), BAD)
def test_nonsense_is_rejected_at_import(
    tmp_path: Path, variables: dict[str, str], expected: list[str]
) -> None:
    done = _python("import celeryconfig", tmp_path, **variables)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("celeryconfig.LeaseholdConfigError: "), done.stderr
    for fragment in expected:
        assert fragment in last, last


def test_targets_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    path.write_text("shop = mysql://x\n")
    done = _python("import celeryconfig", tmp_path, LEASEHOLD_TARGETS=str(path))
    assert done.returncode != 0
    assert "LEASEHOLD_TARGETS is not JSON" in done.stderr


def test_the_defaults_ring_the_filesystem_broker(tmp_path: Path) -> None:
    """No server at all: sending a task writes a message file under LEASEHOLD_VAR_DIR."""
    code = (
        "from tasks.app import app\n"
        "r = app.send_task('leasehold.reclaim_stale_applies')\n"
        "print(r.id)\n"
    )
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    queue = tmp_path / "var" / "broker" / "queue"
    messages = [p.read_text() for p in queue.iterdir()]
    assert len(messages) == 1
    assert done.stdout.strip() in messages[0]
    assert "leasehold.reclaim_stale_applies" in messages[0]
