"""A worker's heartbeat: one thread per worker process renews every lease the process holds.

Every ``interval`` seconds it renews ``heartbeat_at`` of all of them and picks up their pending
control requests in one transaction of three statements (``leases.heartbeat_all``), whatever
their number: a worker's liveness costs O(1) store round trips per interval, not O(applies).

Per lease, nothing changes from a heartbeat of its own:

- ``LeaseLost`` proven by a row read under the lock interrupts that apply's run at once; the
  others of the batch are renewed in the same statement.
- Errors reaching the database are retried: they are not proof of loss. But once no heartbeat of
  a lease has succeeded for ``stale_after`` seconds the worker presumes it lost, because by then a
  reclaimer may have rotated it: the same window bounds both sides. A lease's window starts from
  the moment its last successful beat was *sent*, never later than the database clock stamped it.
- A statement can hang rather than fail (a partition drops packets silently, and the MySQL
  driver has no read timeout). A watchdog thread makes the presumption whatever the heartbeat
  thread is blocked in.

Beats keep their period: the next one is due ``interval`` after the last one was due, not after
it finished, so that the time a beat takes (or a CPU-bound engine in the same process, holding
the GIL between switch intervals) does not add up over a run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from leases import Lease, Renewal, heartbeat_all
from storage.database import Database
from storage.errors import LeaseLost, StorageError
from tasks.interrupts import Interrupts

log = logging.getLogger(__name__)

# A lease skipped because its row was held is tried again within the beat, this many times, after
# this fraction of the interval each time.
BUSY_RETRIES: Final = 3
BUSY_PAUSE: Final = 0.05


@dataclass(slots=True)
class _Held:
    lease: Lease
    interrupts: Interrupts
    last_ok: float  # monotonic: when the last successful beat of this lease was sent


class Heartbeats:
    """The heartbeat of one worker process: every lease it holds, renewed in one transaction."""

    def __init__(
        self,
        db: Database,
        *,
        interval: float,
        stale_after: float,
        monotonic: Callable[[], float] = time.monotonic,
        name: str = "heartbeat",
    ) -> None:
        self.db = db
        self.interval = interval
        self.stale_after = stale_after
        self.name = name
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._held: dict[int, _Held] = {}
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self.beats = 0  # beats the store answered (with at least one lease in them)
        self.failures = 0  # beats that failed (a storage error, or an unexpected one)
        self.busy = 0  # leases skipped because another transaction held their row
        self.lates: list[float] = []  # how late each beat started, seconds (the last 1,000)

    # --- what the worker holds --------------------------------------------------------------

    def hold(self, lease: Lease, interrupts: Interrupts) -> None:
        """Renew ``lease`` from now on; its run is interrupted when it is lost."""
        with self._lock:
            self._held[lease.apply_id] = _Held(lease, interrupts, self._monotonic())

    def release(self, lease: Lease) -> None:
        with self._lock:
            held = self._held.get(lease.apply_id)
            if held is not None and held.lease == lease:
                del self._held[lease.apply_id]

    @contextmanager
    def holding(self, lease: Lease, interrupts: Interrupts) -> Iterator[None]:
        self.hold(lease, interrupts)
        try:
            yield
        finally:
            self.release(lease)

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def _holds(self, held: _Held) -> bool:
        with self._lock:
            return self._held.get(held.lease.apply_id) is held

    def _live(self) -> list[_Held]:
        with self._lock:
            return [h for h in self._held.values() if h.interrupts.lost is None]

    # --- the threads ------------------------------------------------------------------------

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._run, name=self.name, daemon=True),
            threading.Thread(target=self._watch, name=f"{self.name}-watch", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def is_alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _run(self) -> None:
        due = self._monotonic() + self.interval
        while not self._stopped.wait(min(self.interval, max(0.0, due - self._monotonic()))):
            now = self._monotonic()
            self._late(now - due)
            try:
                self.beat_once()
            except Exception:
                # Not a storage error (those are retried in beat_once): a bug or a row it cannot
                # read. The thread must outlive it, or every lease of this worker, today's and
                # tomorrow's, would be presumed lost stale_after after its redemption.
                self.failures += 1
                log.exception("heartbeat of this worker failed unexpectedly; will retry")
            self.presume_stale()
            if self._done():
                return
            # Drift-free: due every interval; a beat that overran skips the beats it missed.
            due += self.interval
            if due <= self._monotonic():
                due = self._monotonic() + self.interval

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval):
            self.presume_stale()
            if self._done():
                return

    def _done(self) -> bool:
        """A heartbeat of its own ends when its lease is lost (:class:`Heartbeat`); the worker's
        runs for as long as the worker."""
        return False

    def _late(self, seconds: float) -> None:
        self.lates.append(seconds)
        if len(self.lates) > 1000:
            del self.lates[:500]

    # --- one beat ---------------------------------------------------------------------------

    def beat_once(self) -> bool:
        """One batched heartbeat and control poll. True if every lease held was renewed.

        A lease whose row another transaction holds (as a rule its own run's checkpoint, a
        fenced write of milliseconds) is tried again a few times within the beat, alone with the
        others so skipped: under load a worker's runs write all the time, and a lease skipped
        beat after beat would be presumed lost while its worker is alive (issue 13's bench)."""
        pending = self._live()
        if not pending:
            return True
        clean = True  # nothing lost so far
        for attempt in range(1 + BUSY_RETRIES):
            if attempt:
                if self._stopped.wait(self.interval * BUSY_PAUSE):
                    return False
                pending = [h for h in pending if self._holds(h)]
            sent = self._monotonic()
            try:
                renewal = heartbeat_all(self.db, [h.lease for h in pending])
            except StorageError as exc:
                self.failures += 1
                log.warning("heartbeat of %d applies failed, will retry: %s", len(pending), exc)
                return False
            self.busy += len(renewal.busy)
            clean = clean and not renewal.lost
            self._settle(pending, renewal, sent)
            pending = [h for h in pending if h.lease.apply_id in renewal.busy]
            if not pending:
                break
        self.beats += 1
        return clean and not pending

    def _settle(self, held: list[_Held], renewal: Renewal, sent: float) -> None:
        for h in held:
            apply_id = h.lease.apply_id
            lost = renewal.lost.get(apply_id)
            if lost is not None:
                if not self._holds(h):
                    continue  # its run ended (its last write ends the lease) during this beat
                # A run rotating its lease away itself (a mass cancel: hundreds at once) is no
                # news for an operator: the run says how it ended, or that it found the lease
                # lost. It is interrupted alike, so nothing else changes.
                level = logging.INFO if h.interrupts.ending else logging.WARNING
                log.log(level, "heartbeat: %s; stopping its run", lost)
                h.interrupts.lease_lost(lost)
            elif apply_id in renewal.renewed:
                h.last_ok = max(h.last_ok, sent)
                h.interrupts.requested(renewal.requests.get(apply_id, ()))

    def presume_stale(self) -> None:
        """Presume lost every held lease with no successful heartbeat for ``stale_after``."""
        now = self._monotonic()
        for h in self._live():
            if now - h.last_ok < self.stale_after:
                continue
            log.warning(
                "apply %s: lease presumed lost: no heartbeat succeeded for %gs; stopping its run",
                h.lease.apply_id,
                self.stale_after,
            )
            h.interrupts.lease_lost(
                LeaseLost(
                    h.lease.apply_id,
                    h.lease.epoch,
                    reason=f"presumed lost: no heartbeat succeeded for {self.stale_after:g}s",
                )
            )


class Heartbeat(Heartbeats):
    """The heartbeat of one lease alone, on threads of its own that end when it is lost (tests,
    and code that runs one apply outside a worker)."""

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
        super().__init__(
            db,
            interval=interval,
            stale_after=stale_after,
            monotonic=monotonic,
            name=f"heartbeat-{lease.apply_id}",
        )
        self.lease = lease
        self.interrupts = interrupts
        self.hold(lease, interrupts)

    def start(self) -> None:
        with self._lock:  # the window starts with the thread, as the worker's starts at hold()
            for h in self._held.values():
                h.last_ok = self._monotonic()
        super().start()

    def _done(self) -> bool:
        return self.interrupts.lost is not None
