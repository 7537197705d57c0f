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
        self._last_ok = monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        self._last_ok = self._monotonic()
        # Issue 10 (partition): a heartbeat statement can hang rather than fail. A partition
        # drops packets silently, and the MySQL driver has no read timeout, so ``beat_once``
        # may not return for many minutes (TCP retransmissions). The presumption of loss must
        # not wait for it: a watchdog thread makes it once stale_after has passed without a
        # successful heartbeat, whatever the heartbeat thread is blocked in.
        watchdog = threading.Thread(
            target=self._watch, name=f"heartbeat-watch-{self.lease.apply_id}", daemon=True
        )
        watchdog.start()
        while not self._stopped.wait(self.interval):
            if self.beat_once():
                self._last_ok = self._monotonic()
            elif self.interrupts.lost is not None or self._presume_if_stale():
                return

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval):
            if self.interrupts.lost is not None or self._presume_if_stale():
                return

    def _presume_if_stale(self) -> bool:
        """Presume the lease lost if no heartbeat succeeded for ``stale_after``."""
        if self._monotonic() - self._last_ok < self.stale_after:
            return False
        if self.interrupts.lost is None:
            log.warning(
                "apply %s: lease presumed lost: no heartbeat succeeded for %gs; stopping its run",
                self.lease.apply_id,
                self.stale_after,
            )
        self.interrupts.lease_lost(
            LeaseLost(
                self.lease.apply_id,
                self.lease.epoch,
                reason=f"presumed lost: no heartbeat succeeded for {self.stale_after:g}s",
            )
        )
        return True

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
