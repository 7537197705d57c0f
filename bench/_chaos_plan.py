"""The plan of a chaos campaign (``bench/chaos.py``), drawn from its seed before anything starts,
and the submitter that carries out the applies' half of it: each apply sent as another app would
send it, and sent again with the same ``request_id`` until it is in the store.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from bench._chaos_faults import KINDS, WEIGHTS, draw
from storage.tables import metadata
from tests.e2e.helpers import Stack, sleep_payload
from tests.e2e.test_github_chaos import OWNER, PULL_REQUEST, REPO

DATABASES = [f"chaos_db{i}" for i in range(6)]
TARGETS = ["tgt_a", "tgt_b"]
MYSQL_SHARE = 1 / 6
RESEND_AFTER = 10.0  # seconds without the apply in the store before the same submit is resent


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the start
    kind: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Submission:
    at: float
    request_id: str
    payload: dict[str, Any]


# --- the plan -----------------------------------------------------------------------------------


def plan_faults(rng: random.Random, seconds: float, interval: float) -> list[Planned]:
    """Every kind once in a seeded order, then weighted draws, about ``interval`` apart."""
    first = list(KINDS)
    rng.shuffle(first)
    out: list[Planned] = []
    at = min(5.0, seconds * 0.05)  # let the first applies start
    while True:
        at += rng.uniform(0.5, 1.5) * interval
        if at >= seconds:
            return out
        kind = first.pop(0) if first else rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
        args = {k: round(v, 2) if isinstance(v, float) else v for k, v in draw(kind, rng).items()}
        out.append(Planned(round(at, 3), kind, args))


def plan_applies(
    rng: random.Random, count: int, seconds: float, seed: int, targets: bool
) -> list[Submission]:
    times = sorted(rng.uniform(0.0, seconds * 0.8) for _ in range(count))
    out = []
    for i, at in enumerate(times):
        if targets and rng.random() < MYSQL_SHARE:
            tasks = [
                {"table": f"ch{i}", "ddl": f"ALTER TABLE ch{i} ADD COLUMN c{j} INT"}
                for j in range(rng.randint(1, 2))
            ]
            payload: dict[str, Any] = {
                "database": rng.choice(TARGETS),
                "environment": "chaos",
                "engine": "mysql",
                "tasks": tasks,
            }
        else:
            seconds_each = [round(rng.uniform(0.2, 1.2), 2) for _ in range(rng.randint(1, 3))]
            payload = sleep_payload(*seconds_each, database=rng.choice(DATABASES))
            payload["environment"] = "chaos"
        request_id = f"chaos-{seed}-{i}"
        payload |= {
            "request_id": request_id,
            "repository": f"{OWNER}/{REPO}",
            "pull_request": PULL_REQUEST,
            "head_sha": f"{rng.getrandbits(160):040x}",
        }
        out.append(Submission(round(at, 3), request_id, payload))
    return out


# --- submitting ---------------------------------------------------------------------------------


def found_in_store(stack: Stack, request_ids: Sequence[str]) -> dict[str, int]:
    """request_id -> apply id of those already in the store; {} while the store is down."""
    table = metadata.tables["applies"]
    try:
        with stack.db.transaction() as conn:
            rows = conn.execute(
                select(table.c.request_id, table.c.id).where(table.c.request_id.in_(request_ids))
            )
            return {str(r[0]): int(r[1]) for r in rows}
    except Exception:  # the store is down or a session was killed: ask again later
        return {}


class Submitter(threading.Thread):
    """Sends every planned submission at its time, and again (same ``request_id``) until the
    apply is in the store. ``ignore_result``: a sender outside a worker would otherwise wait
    ~20 s on Redis's result subscription during a broker outage."""

    def __init__(
        self, stack: Stack, plan: list[Submission], start: float, log: Callable[[str], None]
    ) -> None:
        super().__init__(name="chaos-submitter", daemon=True)
        self.stack, self.plan, self.start_at, self.log = stack, plan, start, log
        self.stop = threading.Event()
        self.ids: dict[str, int] = {}
        self.sends = 0
        self.failed_sends = 0

    def run(self) -> None:
        pending: dict[str, tuple[float, Submission]] = {}
        due = list(self.plan)
        while not self.stop.is_set() and (due or pending):
            while due and due[0].at <= time.monotonic() - self.start_at:
                sub = due.pop(0)
                pending[sub.request_id] = self._send(sub)
            if pending:
                for request_id, apply_id in found_in_store(self.stack, list(pending)).items():
                    self.ids[request_id] = apply_id
                    del pending[request_id]
            for request_id, (sent, sub) in list(pending.items()):
                if time.monotonic() - sent > RESEND_AFTER:
                    self.log(f"submit {request_id}: not in the store yet, sending it again")
                    pending[request_id] = self._send(sub)
            self.stop.wait(0.3)

    def _send(self, sub: Submission) -> tuple[float, Submission]:
        self.sends += 1
        try:
            self.stack.client.send_task(
                "leasehold.submit_apply", kwargs=sub.payload, ignore_result=True
            )
        except Exception as exc:  # the broker is down: try again in a second
            self.failed_sends += 1
            self.log(f"submit {sub.request_id}: send failed ({type(exc).__name__}), retrying")
            return time.monotonic() - RESEND_AFTER + 1.0, sub
        return time.monotonic(), sub
