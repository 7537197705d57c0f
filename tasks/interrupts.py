"""Why a running apply must stop early: an operator's stop or cancel, a warm shutdown, or a lost
lease. Set from the heartbeat thread or a signal handler; read by the runner at safe points and
by the engine through ``event``."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from enum import StrEnum
from typing import Final

from storage.control import ControlRequest
from storage.errors import LeaseLost
from storage.states import ControlAction


class Reason(StrEnum):
    STOP = "stop"
    CANCEL = "cancel"
    HANDOVER = "handover"
    LEASE_LOST = "lease_lost"


# A lost lease outranks everything (nothing may be written any more); cancel outranks stop and
# handover (an operator asked for a terminal state); stop outranks handover.
_RANK = {Reason.HANDOVER: 0, Reason.STOP: 1, Reason.CANCEL: 2, Reason.LEASE_LOST: 3}

# The control requests a running apply's owner acts on, by interrupting itself. A resume is not
# one: leases.control settles it where it is requested, the owner never sees it pending.
_CONTROL_REASONS: Final = {ControlAction.STOP: Reason.STOP, ControlAction.CANCEL: Reason.CANCEL}


def reason_for(action: ControlAction) -> Reason | None:
    """The interrupt a control request asks of the apply's running owner, if any."""
    return _CONTROL_REASONS.get(action)


class Interrupts:
    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self.reason: Reason | None = None
        self.request_id: int | None = None
        self.lost: LeaseLost | None = None
        # Set by the runner just before the transaction that rotates its own lease away (stop,
        # hand back, end): a loss the heartbeat then sees is as a rule that very rotation.
        self.ending = False

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

    def requested(self, requests: Iterable[ControlRequest]) -> None:
        """Interrupt for each pending control request that asks it of the owner."""
        for request in requests:
            reason = reason_for(request.action)
            if reason is not None:
                self.interrupt(reason, request_id=request.id)

    def lease_lost(self, lost: LeaseLost) -> None:
        self.interrupt(Reason.LEASE_LOST, lost=lost)

    def raise_if_lost(self) -> None:
        if self.lost is not None:
            raise self.lost
