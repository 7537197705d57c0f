"""The heartbeat thread of a running apply.

Every ``interval`` seconds it renews ``heartbeat_at`` (a fenced single statement, DB clock) and
picks up pending control requests. ``LeaseLost`` from a successful statement interrupts the run
at once. Errors reaching the database are retried: they are not proof of loss. But once no
heartbeat has succeeded for ``stale_after`` seconds the worker presumes its lease lost, because
by then a reclaimer may have rotated it: the same window bounds both sides.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from leases import Lease, heartbeat
from storage import control
from storage.database import Database
from storage.errors import LeaseLost, StorageError
from tasks.interrupts import Interrupts

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(
        self,
        db: Database,
        lease: Lease,
        interrupts: Interrupts,
        *,
        interval: float,
        stale_after: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name=f"heartbeat-{lease.apply_id}", daemon=True)
        self.db = db
        self.lease = lease
        self.interrupts = interrupts
        self.interval = interval
        self.stale_after = stale_after
        self._monotonic = monotonic
        self._stopped = threading.Event()
        self.beats = 0
        self.failures = 0

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        last_ok = self._monotonic()
        while not self._stopped.wait(self.interval):
            if self.beat_once():
                last_ok = self._monotonic()
            elif self.interrupts.lost is not None:
                return
            elif self._monotonic() - last_ok >= self.stale_after:
                self.interrupts.lease_lost(
                    LeaseLost(
                        self.lease.apply_id,
                        self.lease.epoch,
                        reason=f"presumed lost: no heartbeat succeeded for {self.stale_after:g}s",
                    )
                )
                return

    def beat_once(self) -> bool:
        """One heartbeat and control poll. True if the database answered."""
        try:
            heartbeat(self.db, self.lease)
            requests = control.pending(self.db, self.lease.apply_id)
        except LeaseLost as exc:
            log.warning("apply %s: %s", self.lease.apply_id, exc)
            self.interrupts.lease_lost(exc)
            return False
        except StorageError as exc:
            self.failures += 1
            log.warning("apply %s: heartbeat failed, will retry: %s", self.lease.apply_id, exc)
            return False
        self.beats += 1
        self.interrupts.requested(requests)
        return True
