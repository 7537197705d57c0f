"""Submitting through the service on every store (issue 2, 8): a rejected payload writes nothing; a
valid one is inserted and dispatched once; the longest names fit their columns."""

from __future__ import annotations

from typing import Any

import pytest

from storage import applies
from storage.database import Database
from storage.errors import InvalidInput
from storage.states import ApplyState
from tasks import service
from tasks.payload import MAX_PAYLOAD_BYTES
from tasks.settings import Settings
from tests import support
from tests.celery_fixtures import SentLeases
from tests.payloads import TARGETS, github, good, with_task


def _settings(db: Database) -> Settings:
    return support.settings(str(db.engine.url), targets=TARGETS)


@pytest.mark.parametrize(
    "payload",
    [
        good(extra=1),
        good(tasks=[]),
        good(engine="mysql", database="billing"),
        with_task(options={"seconds": True}),
        github(head_sha=...),
        good(environment="x" * (MAX_PAYLOAD_BYTES + 1)),
    ],
    ids=["unknown-key", "no-tasks", "target", "bool-seconds", "github-partial", "oversize"],
)
def test_a_rejected_submission_writes_nothing(db: Database, payload: dict[str, Any]) -> None:
    support.new_apply(db)  # something already there, which must stay as it is
    before = support.snapshot(db)
    sent = SentLeases()
    with pytest.raises(InvalidInput):
        service.submit(db, _settings(db), payload, sent)
    assert support.snapshot(db) == before
    assert sent.leases == []


def test_submit_inserts_and_dispatches(db: Database) -> None:
    sent = SentLeases()
    payload = good(tasks=[{"table": f"t{i}", "ddl": "ALTER TABLE t ADD c INT"} for i in range(3)])
    apply_id = service.submit(db, _settings(db), payload, sent)
    row = applies.get(db, apply_id)
    assert row["state"] == ApplyState.DISPATCHED
    assert [lease.apply_id for lease in sent.leases] == [apply_id]
    assert sent.leases[0].epoch == row["lease_epoch"] == 1
    assert sent.leases[0].token == row["lease_token"]
    tasks = applies.tasks(db, apply_id)
    assert [(t["position"], t["table_name"], t["state"]) for t in tasks] == [
        (0, "t0", "pending"),
        (1, "t1", "pending"),
        (2, "t2", "pending"),
    ]


def test_a_repeated_request_id_returns_the_same_apply_dispatched_once(db: Database) -> None:
    sent = SentLeases()
    payload = good(request_id="deploy-123")
    first = service.submit(db, _settings(db), payload, sent)
    snapshot = support.snapshot(db)
    second = service.submit(db, _settings(db), payload, sent)
    # Even a different payload under the same request id is the same submission.
    third = service.submit(
        db, _settings(db), good(request_id="deploy-123", environment="prod"), sent
    )
    assert first == second == third
    assert len(sent.leases) == 1
    assert support.snapshot(db) == snapshot


def test_an_apply_an_older_leasehold_left_pending_is_dispatched_by_reclaim(db: Database) -> None:
    """Insert and dispatch are one transaction now; an apply that an older leasehold inserted but
    never dispatched (``pending``, its submitter died in between) heads its line waiting: a
    repeat of its submission returns it and sends nothing, and the next reclaim pass's sweep of
    waiting lines dispatches it."""
    apply_id = support.new_apply(db, request_id="deploy-9")
    support.set_state(db, apply_id, ApplyState.PENDING)
    sent = SentLeases()
    assert service.submit(db, _settings(db), good(request_id="deploy-9"), sent) == apply_id
    assert sent.leases == []
    assert service.reclaim_stale(db, _settings(db), sent) == 0  # rotated nothing stale
    assert [lease.apply_id for lease in sent.leases] == [apply_id]
    assert applies.get(db, apply_id)["state"] == ApplyState.DISPATCHED
    assert support.log_events(db, apply_id) == [(1, "dispatched")]
    assert service.reclaim_stale(db, _settings(db), sent) == 0
    assert len(sent.leases) == 1


def test_the_longest_names_accepted_fit_their_columns(db: Database) -> None:
    payload = good(database="d" * 128, environment="e" * 64, request_id="r" * 128)
    apply_id = service.submit(db, _settings(db), payload, SentLeases())
    row = applies.get(db, apply_id)
    assert (row["database_name"], row["environment"], row["request_id"]) == (
        "d" * 128,
        "e" * 64,
        "r" * 128,
    )


# --- who asked (issue 14) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "requested_by",
    [None, "alice@laptop", "CN=deploy-bot (as alice)", "é" * 255, "🚀" * 255],
    ids=["nobody", "plain", "composed", "longest-accented", "longest-astral"],
)
def test_submit_stores_who_asked(db: Database, requested_by: str | None) -> None:
    """What the caller says is stored as said, up to the column's 255 characters of any script;
    a caller that says nothing is recorded as nobody (the Celery task adds no default)."""
    payload = good() if requested_by is None else good(requested_by=requested_by)
    apply_id = service.submit(db, _settings(db), payload, SentLeases())
    assert applies.get(db, apply_id)["requested_by"] == requested_by
    assert service.get_apply(db, apply_id)["requested_by"] == requested_by


def test_a_repeated_request_id_keeps_the_first_requester(db: Database) -> None:
    first = service.submit(
        db, _settings(db), good(request_id="deploy-7", requested_by="alice"), SentLeases()
    )
    again = service.submit(
        db, _settings(db), good(request_id="deploy-7", requested_by="mallory"), SentLeases()
    )
    assert again == first
    assert applies.get(db, first)["requested_by"] == "alice"


@pytest.mark.parametrize(
    "requested_by",
    [7, ["ops"], "", "a" * 256, "alice\nforged", "\x1b[2Jalice"],
    ids=["int", "list", "empty", "too-long", "newline", "escape"],
)
def test_a_malformed_requester_writes_nothing(db: Database, requested_by: object) -> None:
    support.new_apply(db)  # something already there, which must stay as it is
    before = support.snapshot(db)
    sent = SentLeases()
    with pytest.raises(InvalidInput, match="requested_by must"):
        service.submit(db, _settings(db), good(requested_by=requested_by), sent)
    assert support.snapshot(db) == before
    assert sent.leases == []
