"""The contract another app meets (issue 8), from another app: a separate Python process whose
Celery app sets only the broker, the result backend and the README's routing line, and imports
nothing of leasehold's. It submits an apply asking to be notified, reads it with
``leasehold.get_apply``, stops and cancels another, and receives its notification on a queue of
its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.e2e.helpers import RESULT_TIMEOUT, Cluster, Stack, assert_completed_once
from tests.e2e.rabbitmq import is_amqp
from tests.support import new_database

pytestmark = pytest.mark.slow

# The other app. Its configuration is what the README tells a caller to write; everything else
# is Celery's defaults. It prints one JSON object: what it saw.
OTHER_APP = r"""
import json, sys, time
from celery import Celery

config = json.loads(sys.argv[1])
app = Celery("deploys", broker=config["broker"], backend=config["backend"])
app.conf.update(config.get("transport", {}))
app.conf.task_routes = {"leasehold.*": {"queue": "leasehold"}}  # the README's routing line

def call(name, **kwargs):
    return app.send_task(name, kwargs=kwargs).get(timeout=30)

def until(apply_id, *states):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        view = call("leasehold.get_apply", apply_id=apply_id)
        if view["state"] in states:
            return view
        time.sleep(0.1)
    raise SystemExit(f"apply {apply_id} never reached {states}")

def apply(seconds, **extra):
    return {
        "database": config["database"], "environment": "deploys", "engine": "sleep",
        "tasks": [{"table": "orders", "ddl": "ALTER TABLE orders ADD c INT",
                   "options": {"seconds": seconds}}],
        **extra,
    }

seen = {}
first = call("leasehold.submit_apply", **apply(
    3.0, request_id=config["request_id"],
    notify={"task": "deploys.apply_finished", "queue": "deploys"}))["apply_id"]
seen["submitted"] = first
seen["again"] = call("leasehold.submit_apply", **apply(3.0, request_id=config["request_id"]))
second = call("leasehold.submit_apply", **apply(30.0))["apply_id"]  # waits behind the first
seen["waiting"] = call("leasehold.get_apply", apply_id=second)
seen["first_done"] = until(first, "completed", "failed", "cancelled")
until(second, "running")
seen["stop"] = call("leasehold.control_apply", apply_id=second, action="stop")
seen["stopped"] = until(second, "stopped")
seen["cancel"] = call("leasehold.control_apply", apply_id=second, action="cancel")
seen["cancelled"] = until(second, "cancelled")

with app.connection_for_read() as conn:
    queue = conn.SimpleQueue("deploys")
    message = queue.get(timeout=30)
    args, kwargs, _ = message.decode()
    seen["notification"] = {"task": message.headers["task"], "args": args, "kwargs": kwargs}
    message.ack()
    queue.close()

ours = {"tasks", "storage", "leases", "celeryconfig"}
seen["imported"] = sorted(ours & {name.split(".")[0] for name in sys.modules})
print(json.dumps(seen))
"""


def other_app_config(stack: Stack) -> dict[str, Any]:
    env = stack.env
    config: dict[str, Any] = {"database": new_database(), "request_id": f"deploy-{os.getpid()}"}
    if stack.redis or is_amqp(stack):
        config |= {
            "broker": env["LEASEHOLD_BROKER_URL"],
            "backend": env["LEASEHOLD_RESULT_BACKEND"],
        }
    else:  # the embedded default: the same folders, with kombu's own filesystem transport
        var = env["LEASEHOLD_VAR_DIR"]
        folder = f"{var}/broker/queue"
        config |= {
            "broker": "filesystem://",
            "backend": f"db+sqlite:///{var}/results.sqlite3",
            "transport": {
                "broker_transport_options": {
                    "data_folder_in": folder,
                    "data_folder_out": folder,
                    "polling_interval": 0.1,
                }
            },
        }
    return config


def test_another_app_submits_reads_controls_and_is_notified(cluster: Cluster) -> None:
    stack, db = cluster.stack, cluster.stack.db
    cluster.shared_workers(2)
    cluster.beats(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASEHOLD_", "CELERY_"))}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", OTHER_APP, json.dumps(other_app_config(stack))],
        env=env,
        cwd=stack.folder,
        capture_output=True,
        text=True,
        timeout=RESULT_TIMEOUT * 4,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    first = seen["submitted"]
    assert seen["again"] == {"apply_id": first}
    assert seen["imported"] == []

    waiting = seen["waiting"]
    assert (waiting["state"], waiting["position"], waiting["waiting_behind"]) == (
        "queued",
        2,
        first,
    )
    done_view = seen["first_done"]
    assert done_view["state"] == "completed"
    assert done_view["tasks"] == [{"table": "orders", "state": "completed", "progress": 100}]
    assert (seen["stop"]["request_state"], seen["stopped"]["state"]) == ("pending", "stopped")
    assert (seen["cancel"]["request_state"], seen["cancelled"]["state"]) == (
        "completed",
        "cancelled",
    )
    assert seen["notification"] == {
        "task": "deploys.apply_finished",
        "args": [],
        "kwargs": {"apply_id": first, "state": "completed", "error": None},
    }
    assert_completed_once(db, first)
