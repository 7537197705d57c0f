from __future__ import annotations

from leases import fence
from storage import fenced
from storage.engine import Database
from tests import support


def test_fenced_write_lands_with_current_lease(db: Database) -> None:
    lease = support.running_lease(db)
    (task, _) = support.task_ids(db, lease.apply_id)
    with fence(db, lease) as fx:
        fenced.update_task(fx, task, progress=40)
    rows = support.snapshot(db)["apply_tasks"]
    assert rows[0][0] == task
