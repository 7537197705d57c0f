"""Why a running apply must stop early: an operator's stop or cancel, a warm shutdown, or a lost
lease. Set from the heartbeat thread or a signal handler; read by the runner at safe points and
by the engine through ``event``."""

from __future__ import annotations

import threading
from enum import StrEnum

from storage.errors import LeaseLost


class Reason(StrEnum):
    STOP = "stop"
    CANCEL = "cancel"
    HANDOVER = "handover"
    LEASE_LOST = "lease_lost"


# A lost lease outranks everything (nothing may be written any more); cancel outranks stop and
# handover (an operator asked for a terminal state); stop outranks handover.
_RANK = {Reason.HANDOVER: 0, Reason.STOP: 1, Reason.CANCEL: 2, Reason.LEASE_LOST: 3}


class Interrupts:
    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self.reason: Reason | None = None
        self.request_id: int | None = None
        self.lost: LeaseLost | None = None

    def interrupt(
        self, reason: Reason, *, request_id: int | None = None, lost: LeaseLost | None = None
    ) -> None:
        with self._lock:
            if self.reason is not None and _RANK[self.reason] >= _RANK[reason]:
                return
            self.reason = reason
            self.request_id = request_id
            self.lost = lost
            self.event.set()

    def lease_lost(self, lost: LeaseLost) -> None:
        self.interrupt(Reason.LEASE_LOST, lost=lost)

    def raise_if_lost(self) -> None:
        if self.lost is not None:
            raise self.lost
