"""Completion for callers (issue 8): a submit may ask for a task of its own to be sent when the
apply ends. The notification is made due in the transaction that ends the apply, whatever ends
it; it is delivered at least once (claim, send, record), retried while the broker is down, and
sent again after a crash only if it was never recorded as sent. On SQLite and MariaDB.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text, update

import leases
from leases import redeem
from storage import applies, clock, notifications
from storage.applies import NewApply, NewTask
from storage.database import Database
from storage.errors import InvalidInput
from storage.notifications import Notice, Notify
from storage.tables import metadata
from tasks import notify as notifier
from tasks import service
from tasks.engines.sleep import SleepEngine
from tasks.interrupts import Interrupts, Reason
from tasks.runner import ApplyRunner
from tasks.settings import Settings
from tests import support
from tests.celery_fixtures import RecordingReporter, SentLeases

WHERE = Notify("deploys.apply_finished", "deploys")


@dataclass
class Outbox:
    """A ``send`` for notifications: records each one; ``down`` plays a broker that is down."""

    down: bool = False
    sent: list[Notice] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, notice: Notice) -> bool:
        if self.down:
            return False
        with self._lock:
            self.sent.append(notice)
        return True

    def kwargs(self) -> list[dict[str, Any]]:
        return [{"apply_id": n.apply_id, "state": n.state, "error": n.error} for n in self.sent]


def submitted(db: Database, *, notify: Notify | None = WHERE, seconds: float = 0.01) -> int:
    new = NewApply(
        database_name=support.new_database(),
        environment="production",
        engine="sleep",
        tasks=[NewTask("orders", "ALTER TABLE orders ADD c INT", {"seconds": seconds})],
        notify=notify,
    )
    return leases.submit(db, new).apply_id


def running(db: Database, **kwargs: Any) -> leases.Lease:
    apply_id = submitted(db, **kwargs)
    row = applies.get(db, apply_id)
    lease = leases.Lease(apply_id, int(row["lease_epoch"]), str(row["lease_token"]))
    redeem(db, lease, "worker-1")
    return lease


def notification(db: Database, apply_id: int) -> dict[str, Any]:
    table = metadata.tables["notifications"]
    with db.transaction() as conn:
        row = conn.execute(table.select().where(table.c.apply_id == apply_id)).mappings().one()
    return dict(row)


def age_claim(db: Database, apply_id: int, seconds: float) -> None:
    """Move the notification's claim ``seconds`` into the past by the database clock."""
    table = metadata.tables["notifications"]
    value = clock.now_minus(float(seconds))
    with db.transaction() as conn:
        conn.execute(update(table).where(table.c.apply_id == apply_id).values(claimed_at=value))


def settings(db: Database, **overrides: Any) -> Settings:
    return support.settings(str(db.engine.url), **overrides)


# --- recorded at submit, due when the apply ends --------------------------------------------------


def test_a_notification_is_recorded_and_owed_only_once_the_apply_ends(db: Database) -> None:
    lease = running(db)
    row = notification(db, lease.apply_id)
    assert (row["task"], row["queue"], row["due_at"], row["sent_at"]) == (
        WHERE.task,
        WHERE.queue,
        None,
        None,
    )
    outbox = Outbox()
    assert notifier.deliver(db, outbox, [lease.apply_id]) == 0  # running: nothing owed yet
    assert notifications.owed(db) == []

    outcome = ApplyRunner(db, lease, SleepEngine(), Interrupts(), RecordingReporter()).run()
    assert outcome.state == "completed"
    assert notification(db, lease.apply_id)["due_at"] is not None  # in the ending transaction
    assert notifications.owed(db) == [lease.apply_id]
    assert notifier.deliver(db, outbox, [lease.apply_id]) == 1
    assert outbox.kwargs() == [{"apply_id": lease.apply_id, "state": "completed", "error": None}]
    assert (outbox.sent[0].task, outbox.sent[0].queue) == (WHERE.task, WHERE.queue)
    row = notification(db, lease.apply_id)
    assert row["sent_at"] is not None
    assert row["attempts"] == 1
    # Recorded as sent: never sent again, by anyone.
    assert notifier.deliver(db, outbox, [lease.apply_id]) == 0
    assert notifier.deliver(db, outbox) == 0
    assert len(outbox.sent) == 1


def test_an_apply_without_notify_has_nothing_to_deliver(db: Database) -> None:
    lease = running(db, notify=None)
    ApplyRunner(db, lease, SleepEngine(), Interrupts(), RecordingReporter()).run()
    outbox = Outbox()
    assert notifier.deliver(db, outbox, [lease.apply_id]) == 0
    assert notifications.get(db, lease.apply_id) is None
    assert outbox.sent == []


def test_stop_and_handover_owe_nothing(db: Database) -> None:
    for reason in (Reason.STOP, Reason.HANDOVER):
        lease = running(db)
        interrupts = Interrupts()
        interrupts.interrupt(reason)
        ApplyRunner(db, lease, SleepEngine(), interrupts, RecordingReporter()).run()
        assert notification(db, lease.apply_id)["due_at"] is None


def test_every_way_an_apply_ends_makes_its_notification_due(db: Database) -> None:
    outbox = Outbox()
    # failed by its engine
    failing = running(db)
    with db.transaction() as conn:
        conn.execute(
            text("UPDATE apply_tasks SET options = :o WHERE apply_id = :a"),
            {"o": '{"seconds": 0.01, "fail": true}', "a": failing.apply_id},
        )
    ApplyRunner(db, failing, SleepEngine(), Interrupts(), RecordingReporter()).run()
    # cancelled while nobody owns it (a CAS in control_apply), delivered there at once
    cancelled = submitted(db)
    answer = service.control_apply(db, cancelled, "cancel", "ops", SentLeases(), outbox)
    assert answer["apply_state"] == "cancelled"
    assert outbox.kwargs() == [{"apply_id": cancelled, "state": "cancelled", "error": None}]
    # abandoned by reclaim (after max_reclaims), delivered by the same pass
    abandoned = running(db)
    support.age_heartbeat(db, abandoned.apply_id, 120)
    rotated = service.reclaim_stale(
        db, settings(db, stale_after=30.0, max_reclaims=0), SentLeases(), outbox
    )
    assert rotated == 1
    by_apply = {n.apply_id: n for n in outbox.sent}
    assert by_apply[abandoned.apply_id].state == "failed"
    assert "abandoned" in str(by_apply[abandoned.apply_id].error)
    # ...and the engine failure was owed too: the same pass delivered it
    assert by_apply[failing.apply_id].state == "failed"
    assert len(outbox.sent) == 3


# --- at least once --------------------------------------------------------------------------------


def test_a_broker_outage_leaves_it_owed_and_the_next_pass_sends_it(db: Database) -> None:
    lease = running(db)
    ApplyRunner(db, lease, SleepEngine(), Interrupts(), RecordingReporter()).run()
    outbox = Outbox(down=True)
    assert notifier.deliver(db, outbox, [lease.apply_id]) == 0
    row = notification(db, lease.apply_id)
    assert (row["sent_at"], row["claimed_at"], row["attempts"]) == (None, None, 1)  # released
    assert service.reclaim_stale(db, settings(db), SentLeases(), outbox) == 0
    assert notification(db, lease.apply_id)["attempts"] == 2
    outbox.down = False
    service.reclaim_stale(db, settings(db), SentLeases(), outbox)
    assert outbox.kwargs() == [{"apply_id": lease.apply_id, "state": "completed", "error": None}]
    assert notification(db, lease.apply_id)["sent_at"] is not None


def test_a_sender_that_died_before_recording_leaves_it_to_be_sent_again(db: Database) -> None:
    """It claimed (and maybe sent) the notification, then died: until its claim expires nobody
    sends it; then the next pass does, so it arrives at least once (perhaps twice)."""
    lease = running(db)
    ApplyRunner(db, lease, SleepEngine(), Interrupts(), RecordingReporter()).run()
    assert notifications.claim(db, lease.apply_id) is not None  # ... and the sender dies
    outbox = Outbox()
    assert notifier.deliver(db, outbox) == 0
    assert notifier.deliver(db, outbox, [lease.apply_id]) == 0
    age_claim(db, lease.apply_id, notifications.CLAIM_EXPIRY + 1)
    assert notifier.deliver(db, outbox) == 1
    assert [n.apply_id for n in outbox.sent] == [lease.apply_id]
    assert notification(db, lease.apply_id)["attempts"] == 2


def test_senders_racing_send_it_once(db: Database, open_db: Any) -> None:
    lease = running(db)
    ApplyRunner(db, lease, SleepEngine(), Interrupts(), RecordingReporter()).run()
    outbox = Outbox()
    senders = [open_db() for _ in range(8)]
    barrier = threading.Barrier(len(senders))
    results: list[int] = []

    def deliver(sender: Database) -> None:
        barrier.wait(timeout=30)
        results.append(notifier.deliver(sender, outbox))

    threads = [threading.Thread(target=deliver, args=(s,)) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [0] * 7 + [1]
    assert len(outbox.sent) == 1


# --- the payload ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "fragment"),
    [
        ("deploys.done", "notify must be an object with keys task and queue"),
        ({"task": "deploys.done"}, "keys task and queue, not ['task']"),
        ({"task": "deploys.done", "queue": "q", "x": 1}, "not ['queue', 'task', 'x']"),
        ({"task": "a b", "queue": "q"}, "notify.task must be a Celery task name"),
        ({"task": 5, "queue": "q"}, "notify.task must be a Celery task name"),
        ({"task": "t" * 201, "queue": "q"}, "notify.task must be a Celery task name"),
        ({"task": "leasehold.submit_apply", "queue": "q"}, "is leasehold's own"),
        ({"task": "deploys.done", "queue": ""}, "notify.queue must be a queue name"),
        ({"task": "deploys.done", "queue": "q; x"}, "notify.queue must be a queue name"),
    ],
)
def test_a_malformed_notify_is_refused_and_nothing_is_written(
    db: Database, notify: object, fragment: str
) -> None:
    payload = {
        "database": "shop",
        "environment": "production",
        "engine": "sleep",
        "tasks": [{"table": "orders", "ddl": "ALTER TABLE orders ADD c INT"}],
        "notify": notify,
    }
    before = support.snapshot(db)
    with pytest.raises(InvalidInput, match=re.escape(fragment)):
        service.submit(db, settings(db), payload, SentLeases())
    assert support.snapshot(db) == before


def test_get_apply_shows_the_notification(db: Database) -> None:
    lease = running(db)
    view = service.get_apply(db, lease.apply_id)
    assert view["notification"] == {"task": WHERE.task, "queue": WHERE.queue, "sent": False}
    ApplyRunner(db, lease, SleepEngine(), Interrupts(), RecordingReporter()).run()
    notifier.deliver(db, Outbox(), [lease.apply_id])
    assert service.get_apply(db, lease.apply_id)["notification"]["sent"] is True
