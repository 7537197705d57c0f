"""The lease errors, under leasehold's single base (defined in ``storage.errors``)."""

from storage.errors import (
    ApplyNotFound,
    InvalidLease,
    InvalidTransition,
    LeaseError,
    LeaseholdError,
    LeaseLost,
)

__all__ = [
    "ApplyNotFound",
    "InvalidLease",
    "InvalidTransition",
    "LeaseError",
    "LeaseLost",
    "LeaseholdError",
]
