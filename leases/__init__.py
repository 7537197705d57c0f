"""Leases: the right to act for one apply, and the fence that makes every owned write check it.

Knows nothing of Celery; imports only ``storage``. Its errors (``LeaseLost``, ...) are
``storage.errors``, imported from there everywhere: one import path per name.
"""

from leases.fence import fence
from leases.lease import Lease, mint_token
from leases.lifecycle import (
    Renewal,
    check,
    dispatch,
    dispatch_sent,
    heartbeat,
    heartbeat_all,
    owe_dispatch,
    owed_dispatches,
    redeem,
    redeem_for_run,
)
from leases.lines import Submitted, dispatch_waiting, submit
from leases.reclaim import Reclaimed, ReclaimPolicy, reclaim

__all__ = [
    "Lease",
    "ReclaimPolicy",
    "Reclaimed",
    "Renewal",
    "Submitted",
    "check",
    "dispatch",
    "dispatch_sent",
    "dispatch_waiting",
    "fence",
    "heartbeat",
    "heartbeat_all",
    "mint_token",
    "owe_dispatch",
    "owed_dispatches",
    "reclaim",
    "redeem",
    "redeem_for_run",
    "submit",
]
