"""The lease protocol against its model, on every store: hypothesis runs random sequences of
dispatch, redemption (duplicated and stale messages included), heartbeats, fenced writes, slow
writes with a reclaim pass forced between the fence's check and its write, reclaim, pausing and
resuming workers, handing back, stopping, finishing and moving the database clock, by three
simulated workers, and checks after every step that the store is what the model says
(``tests/lease_model.py`` has the model, its rules and its invariants).

Bounded for ``make test`` and derandomized, so that CI runs the same examples every time. Run it
longer with more examples and steps, e.g.::

    LEASEHOLD_MODEL_EXAMPLES=500 LEASEHOLD_MODEL_STEPS=80 \\
        .venv/bin/python -m pytest tests/contract/test_lease_model.py --timeout=0

and with ``LEASEHOLD_MODEL_RANDOM=1`` for fresh random examples on each run instead of the fixed
ones (hypothesis then prints how to reproduce a failure).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from storage.database import Database
from tests.lease_model import LeaseModel
from tests.races import Tap

EXAMPLES = int(os.environ.get("LEASEHOLD_MODEL_EXAMPLES", "100"))
STEPS = int(os.environ.get("LEASEHOLD_MODEL_STEPS", "30"))
RANDOM = os.environ.get("LEASEHOLD_MODEL_RANDOM") == "1"

SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,  # store round trips vary with the machine's load; the bound is the count
    derandomize=not RANDOM,
    database=None,  # no .hypothesis/ folder: the fixed examples need no memory of failures
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=RANDOM,
    report_multiple_bugs=False,  # one failure, shrunk: the first invariant broken is the story
)


def test_the_lease_protocol_keeps_its_invariants_under_any_interleaving(
    db: Database, open_db: Callable[..., Database]
) -> None:
    fencing, rotating = open_db(), open_db()
    tap = Tap(rotating)

    class OnThisStore(LeaseModel):
        def __init__(self) -> None:
            super().__init__(db, fencing, rotating, tap)

    run_state_machine_as_test(OnThisStore, settings=SETTINGS)
