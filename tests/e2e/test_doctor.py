"""``leasehold doctor`` with real worker and beat processes (issue 8): a healthy deployment is all
ok; a fleet whose workers serve only the control queue fails; a fleet whose apply slots are all
busy is said to be busy, not failed (its workers stop consuming the apply queue meanwhile). The
broken set-ups that need no process are in ``tests/contract/test_doctor.py``.
"""

from __future__ import annotations

import pytest

from storage import marks
from tests import support
from tests.e2e.helpers import (
    RESULT_TIMEOUT,
    Cluster,
    Stack,
    sleep_payload,
    submit_task,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.slow
# Stacks: doctor's store checks run on every store in tests/contract/test_doctor.py, and its
# dead-letter report on RabbitMQ in test_poison.py (tests/e2e/conftest.py).
STACKS = frozenset({"redis", "sqlite"})


def doctor(stack: Stack) -> tuple[int, list[str]]:
    done = stack.cli("doctor", "--timeout", "3", check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout.splitlines()


def lines_of(output: list[str], topic: str) -> list[str]:
    return [" ".join(line.split(None, 2)[::2]) for line in output if line.split()[1:2] == [topic]]


def wait_for_a_reclaim_pass(stack: Stack) -> None:
    support.age_mark(stack.db, marks.RECLAIM_PASS, 3600)  # then a fresh one from this beat
    wait_for(
        "a reclaim pass to be recorded",
        lambda: (m := marks.read(stack.db, marks.RECLAIM_PASS)).age is not None and m.age < 60,
        timeout=RESULT_TIMEOUT,
    )


def test_a_healthy_deployment_is_all_ok(cluster: Cluster) -> None:
    stack = cluster.stack
    workers = cluster.workers(2)
    cluster.beats(1)
    wait_for_a_reclaim_pass(stack)
    code, output = doctor(stack)
    assert code == 0, "\n".join(output)
    assert output[-1] == "all good"
    assert not [line for line in output if line.startswith("FAIL")], "\n".join(output)
    (control, applies) = lines_of(output, "workers")
    for line, queue in ((control, "leasehold"), (applies, "leasehold.applies")):
        assert line.startswith(f"ok queue {queue!r}"), output
        for proc in workers:
            assert f"{proc.name}@" in line


def test_workers_that_serve_only_the_control_queue_fail_it(cluster: Cluster) -> None:
    stack = cluster.stack
    cluster.workers(1, queues=["leasehold"])
    cluster.beats(1)
    wait_for_a_reclaim_pass(stack)
    code, output = doctor(stack)
    assert code == 1, "\n".join(output)
    (control, applies) = lines_of(output, "workers")
    assert control.startswith("ok queue 'leasehold'")
    assert applies.startswith("FAIL no worker consumes queue 'leasehold.applies' (applies)")


def test_every_apply_slot_busy_is_said_not_failed(cluster: Cluster) -> None:
    stack, db = cluster.stack, cluster.stack.db
    cluster.workers(1, apply_slots=1)
    cluster.beats(1)
    holder = submit_task(stack, sleep_payload(120.0))
    wait_state(db, holder, "running", timeout=RESULT_TIMEOUT)
    waiting = submit_task(stack, sleep_payload(0.1))  # its run_apply makes the lane pause
    wait_for_a_reclaim_pass(stack)
    code, output = doctor(stack)
    assert code == 0, "\n".join(output)
    workers = lines_of(output, "workers")
    assert workers[1].startswith("ok queue 'leasehold.applies'"), output
    assert workers[2].startswith("warn every apply slot of every worker is busy"), output
    stack.client.send_task(
        "leasehold.control_apply", kwargs={"apply_id": holder, "action": "cancel"}
    ).get(timeout=RESULT_TIMEOUT)
    wait_state(db, waiting, "completed", timeout=RESULT_TIMEOUT)
