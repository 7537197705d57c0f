"""Whether a decoded call fits its task (``tasks/admission.py``): the same verdicts the task
itself would reach first, never stricter, and nothing that needs the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from leases import mint_token
from storage.errors import InvalidInput, InvalidLease
from tasks.admission import Admission
from tasks.envelope import Call, Refused
from tests import support


class FakeTask:
    """A registered task as Admission sees it: its ``run``."""

    def __init__(self, run: Any) -> None:
        self.run = run


def _run_apply(apply_id: Any, lease: Any) -> None: ...
def _submit_apply(**payload: Any) -> None: ...
def _control_apply(apply_id: Any, action: Any, requested_by: Any = None) -> None: ...
def _get_apply(apply_id: Any) -> None: ...
def _other(a: int, *, b: int = 0) -> None: ...


TASKS = {
    "leasehold.run_apply": FakeTask(_run_apply),
    "leasehold.submit_apply": FakeTask(_submit_apply),
    "leasehold.control_apply": FakeTask(_control_apply),
    "leasehold.get_apply": FakeTask(_get_apply),
    "someone.other": FakeTask(_other),
    "someone.builtin": FakeTask(max),  # a signature Python may not read: its body decides
}
TOKEN = mint_token()
LEASE = {"apply_id": 3, "epoch": 1, "token": TOKEN}


@pytest.fixture
def admission() -> Admission:
    return Admission(TASKS, {"shop": "sleep"})


def call(task: str, *args: Any, **kwargs: Any) -> Call:
    return Call(task=task, task_id="t-1", args=list(args), kwargs=kwargs)


def test_only_registered_tasks_are_known(admission: Admission) -> None:
    assert admission.known("leasehold.run_apply")
    assert not admission.known("someone.elses_task")


@pytest.mark.parametrize(
    "good",
    [
        call("leasehold.run_apply", apply_id=3, lease=LEASE),
        call("leasehold.run_apply", 3, LEASE),
        call("leasehold.control_apply", apply_id=3, action="retry", requested_by="ops"),
        call("leasehold.get_apply", apply_id=1),
        call("someone.other", 1, b=2),
        call("someone.builtin", "anything", "at", "all"),
    ],
)
def test_a_call_that_fits_is_admitted(admission: Admission, good: Call) -> None:
    admission.admit(good)


@pytest.mark.parametrize(
    ("bad", "error", "reason"),
    [
        (
            call("leasehold.get_apply", apply_id=1, who="x"),
            Refused,
            "arguments do not fit leasehold.get_apply(apply_id): got an unexpected keyword",
        ),
        (call("leasehold.run_apply", apply_id=3), Refused, "missing a required argument"),
        (call("someone.other"), Refused, "arguments do not fit someone.other(a, *, b=0)"),
        (call("leasehold.get_apply", apply_id="1"), InvalidInput, "apply_id must be a positive"),
        (call("leasehold.get_apply", apply_id=True), InvalidInput, "apply_id must be a positive"),
        (
            call("leasehold.run_apply", apply_id=3, lease=TOKEN),
            InvalidLease,
            "lease must be a JSON object, not str",
        ),
        (
            call("leasehold.run_apply", apply_id=4, lease=LEASE),
            InvalidLease,
            "lease is for apply 3, not 4",
        ),
        (
            call("leasehold.control_apply", apply_id=3, action="explode"),
            InvalidInput,
            "action must be one of stop, resume, cancel, retry; not 'explode'",
        ),
        (call("leasehold.submit_apply", database="shop"), InvalidInput, ""),
    ],
)
def test_a_call_that_does_not_fit_is_refused_in_the_tasks_words(
    admission: Admission, bad: Call, error: type[Exception], reason: str
) -> None:
    with pytest.raises(error) as refused:
        admission.admit(bad)
    assert reason in str(refused.value)


def test_a_lease_token_is_never_in_a_refusal(admission: Admission) -> None:
    lease = {**LEASE, "extra": 1}
    with pytest.raises(InvalidLease) as refused:
        admission.admit(call("leasehold.run_apply", apply_id=3, lease=lease))
    assert TOKEN not in str(refused.value)


_REAL = """
import json
from tasks.app import app
import tasks.entrypoints  # registers the tasks, as a worker does
from tasks.admission import Admission
from tasks.envelope import Call
admission = Admission(app.tasks, app.conf.leasehold_targets or {})
verdicts = {}
for name, kwargs in json.loads(CALLS):
    try:
        admission.admit(Call(task=name, task_id="t", args=[], kwargs=kwargs))
        verdicts[name + " " + json.dumps(kwargs)] = "ok"
    except Exception as exc:
        verdicts[name + " " + json.dumps(kwargs)] = type(exc).__name__
print(json.dumps(verdicts))
"""


def test_the_real_tasks_signatures_are_checked(tmp_path: Path) -> None:
    """With the worker's own registry (a subprocess: importing the app creates its var folder):
    the public tasks' parameters are what the checks expect."""
    calls = [
        ["leasehold.run_apply", {"apply_id": 3, "lease": LEASE}],
        ["leasehold.run_apply", {"apply_id": 3, "lease": "a string"}],
        ["leasehold.control_apply", {"apply_id": 3, "action": "stop"}],
        ["leasehold.get_apply", {"apply_id": 3}],
        ["leasehold.get_apply", {"apply_id": 3, "extra": 1}],
        ["leasehold.reclaim_stale_applies", {}],
        ["leasehold.reclaim_stale_applies", {"now": 1}],
    ]
    code = f"CALLS = {json.dumps(json.dumps(calls))}\n{_REAL}"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=support.environment(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    verdicts = list(json.loads(done.stdout).values())
    assert verdicts == ["ok", "InvalidLease", "ok", "ok", "Refused", "ok", "Refused"]
