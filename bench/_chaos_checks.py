"""The invariant checks run at the end of a chaos campaign (``bench/chaos.py``). Each check
returns the violations it found as lines instead of raising, so that one broken apply does not
hide another and the campaign can count them.

Three sources, each reported on its own line:

- ``leasehold audit`` (``storage.audit.audit``): the stored history alone;
- the e2e suite's history helpers (``tests/e2e/helpers.py``): log epochs never decrease, no
  control request outlives its apply, each apply task completed once and one terminal event;
- the GitHub stand-in (``tests/e2e/test_github_chaos.assert_pull_request_consistent``): per apply,
  comment marker epochs never decrease, one terminal body and it is the last edit, one check run
  concluded once, and leasehold's records agree with what GitHub shows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

from storage import audit as storage_audit
from storage.database import Database
from tasks.testing.standin import GitHubStandIn
from tests.e2e.faults import assert_each_task_done_once
from tests.e2e.helpers import (
    Stack,
    assert_epochs_non_decreasing,
    assert_requests_ended,
    describe,
)
from tests.e2e.test_github_chaos import assert_pull_request_consistent


def _collect(label: str, check: Callable[[], object]) -> list[str]:
    try:
        check()
    except AssertionError as exc:
        # The first line names the violation; describe() output after it is for the log file.
        return [f"{label}: {str(exc).splitlines()[0] if str(exc) else 'assertion failed'}"]
    return []


def audit(db: Database) -> tuple[str, list[str]]:
    """``storage.audit.audit(db)`` as lines."""
    found = storage_audit.audit(db)
    return f"{len(found)} violations", [f"audit: {v}" for v in found]


def history(stack: Stack, apply_ids: Iterable[int], completed: set[int]) -> list[str]:
    """The e2e helpers' history checks, per apply; done-once for the completed ones (an apply
    that did not complete is counted by the campaign's ``applies_completed``)."""
    out: list[str] = []
    for apply_id in apply_ids:
        label = f"apply {apply_id}"
        out += _collect(label, partial(assert_epochs_non_decreasing, stack.db, apply_id))
        out += _collect(label, partial(assert_requests_ended, stack.db, apply_id))
        if apply_id in completed:
            out += _collect(label, partial(assert_each_task_done_once, stack, apply_id))
    return out


def pull_requests(github: GitHubStandIn, db: Database, shas: dict[int, str]) -> list[str]:
    """The stand-in's invariants for every completed apply that asked for GitHub effects."""
    out: list[str] = []
    for apply_id, sha in sorted(shas.items()):
        out += _collect(
            f"apply {apply_id} on GitHub",
            partial(assert_pull_request_consistent, github, db, apply_id, sha),
        )
    return out


def details(db: Database, violations: list[str], apply_ids: Iterable[int]) -> str:
    """What the log file keeps about every apply named in ``violations``."""
    named = {
        i for i in apply_ids if any(f"apply {i} " in v or f"apply {i}:" in v for v in violations)
    }
    return "\n".join(describe(db, i) for i in sorted(named))
