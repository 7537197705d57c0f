"""Strict validation of ``leasehold.submit_apply`` payloads, and ``service.submit``: a rejected
payload writes nothing; a repeated ``request_id`` returns the same apply, dispatched once."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from storage.errors import InvalidInput
from tasks.payload import parse_submission
from tests.payloads import REJECTED, TARGETS, with_task


@pytest.mark.parametrize(("payload", "message"), REJECTED)
def test_rejected(payload: Any, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_submission(payload, targets=TARGETS)
    assert message in str(caught.value)
    assert len(str(caught.value)) < 400  # a clear message, not a dump of the payload


def test_validation_does_not_change_the_payload() -> None:
    payload = with_task(options={"seconds": 2})
    before = copy.deepcopy(payload)
    parse_submission(payload, targets={})
    assert payload == before
