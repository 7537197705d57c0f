"""Leases: the right to act for one apply, and the fence that makes every owned write check it.

Knows nothing of Celery; imports only ``storage``.
"""

from leases.errors import (
    ApplyNotFound,
    InvalidLease,
    InvalidTransition,
    LeaseError,
    LeaseholdError,
    LeaseLost,
)
from leases.fence import fence
from leases.lease import Lease, mint_token
from leases.lifecycle import check, dispatch, hand_back, heartbeat, redeem, release
from leases.lines import Submitted, dispatch_waiting, submit
from leases.reclaim import Reclaimed, ReclaimPolicy, reclaim

__all__ = [
    "ApplyNotFound",
    "InvalidLease",
    "InvalidTransition",
    "Lease",
    "LeaseError",
    "LeaseLost",
    "LeaseholdError",
    "ReclaimPolicy",
    "Reclaimed",
    "Submitted",
    "check",
    "dispatch",
    "dispatch_waiting",
    "fence",
    "hand_back",
    "heartbeat",
    "mint_token",
    "reclaim",
    "redeem",
    "release",
    "submit",
]
