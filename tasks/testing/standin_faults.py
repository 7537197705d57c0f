"""Fault injection for the GitHub stand-in: latency, 5xx, rate limits and gates that hold a
request inside the server. Every rule is scoped by HTTP method and a path regex (``re.search``
on the path without its query); ``"*"`` matches any method. Thread-safe."""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Literal

from tasks.testing.standin_store import ApiError

RateLimitKind = Literal["secondary", "primary", "429"]
Apply = Literal["on_release", "on_arrival"]
SECONDARY_DOCS = (
    "https://docs.github.com/rest/using-the-rest-api/rate-limits-for-the-rest-api"
    "#about-secondary-rate-limits"
)
PRIMARY_DOCS = (
    "https://docs.github.com/rest/using-the-rest-api/rate-limits-for-the-rest-api"
    "#about-primary-rate-limits"
)
SERVER_ERRORS = {500: "Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass
class _Rule:
    method: str
    pattern: re.Pattern[str]
    remaining: int | None  # None: until cleared

    def take(self, method: str, path: str) -> bool:
        """Whether this rule fires for the request; consumes one use if it does."""
        if self.remaining == 0 or self.method not in ("*", method.upper()):
            return False
        if not self.pattern.search(path):
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True


def _rule(method: str, path: str, count: int | None) -> _Rule:
    if count is not None and count < 1:
        raise ValueError("count must be at least 1 (or None for every matching request)")
    return _Rule(method.upper(), re.compile(path), count)


def rate_limit_error(kind: RateLimitKind, retry_after: int) -> ApiError:
    """GitHub's answers when a rate limit is exceeded, with the headers clients act on."""
    if kind == "primary":
        return ApiError(
            403,
            "API rate limit exceeded for installation. If you reach out to GitHub Support "
            "for help, please include the request ID.",
            headers={
                "x-ratelimit-limit": "5000",
                "x-ratelimit-remaining": "0",
                "x-ratelimit-used": "5000",
                "x-ratelimit-reset": str(math.ceil(time.time() + retry_after)),
                "x-ratelimit-resource": "core",
            },
            documentation_url=PRIMARY_DOCS,
        )
    return ApiError(
        403 if kind == "secondary" else 429,
        "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
        headers={"Retry-After": str(retry_after)},
        documentation_url=SECONDARY_DOCS,
    )


class Gate:
    """Matching requests block inside the server until :meth:`release`.

    ``apply="on_release"``: the request takes effect only once released (a call that lands
    late). ``apply="on_arrival"``: it takes effect at once and only its answer is held (a call
    that landed at GitHub while the client timed out waiting)."""

    def __init__(self, rule: _Rule, apply: Apply) -> None:
        self._rule = rule
        self.apply: Apply = apply
        self._cond = threading.Condition()
        self._arrived = 0
        self._answered = 0
        self._released = False

    @property
    def arrived(self) -> int:
        with self._cond:
            return self._arrived

    @property
    def answered(self) -> int:
        with self._cond:
            return self._answered

    @property
    def released(self) -> bool:
        with self._cond:
            return self._released

    def wait_arrived(self, timeout: float, count: int = 1) -> bool:
        """Wait until ``count`` requests are held (or have passed) here; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._arrived >= count, timeout)

    def wait_answered(self, timeout: float, count: int = 1) -> bool:
        """Wait until ``count`` requests caught here have been answered; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._answered >= count, timeout)

    def release(self) -> None:
        """Let every held request (and every later match) through. Idempotent."""
        with self._cond:
            self._released = True
            self._cond.notify_all()

    # server side
    def _catch(self, method: str, path: str) -> bool:
        with self._cond:
            if self._released or not self._rule.take(method, path):
                return False
            self._arrived += 1
            self._cond.notify_all()
            return True

    def _block(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._released)

    def _done(self) -> None:
        with self._cond:
            self._answered += 1
            self._cond.notify_all()


class Faults:
    """The fault-injection half of the stand-in's API (mixed into ``GitHubStandIn``)."""

    def __init__(self) -> None:
        self._faults_lock = threading.Lock()
        self._latency: list[tuple[_Rule, float]] = []
        self._canned: list[tuple[_Rule, str, int, RateLimitKind | None]] = []
        self._gates: list[Gate] = []

    def add_latency(
        self, seconds: float, method: str = "*", path: str = ".*", count: int | None = None
    ) -> None:
        """Delay matching requests by ``seconds`` before answering (the next ``count``, or all)."""
        with self._faults_lock:
            self._latency.append((_rule(method, path, count), seconds))

    def fail_next(self, n: int = 1, status: int = 502, method: str = "*", path: str = ".*") -> None:
        """Answer the next ``n`` matching requests with ``status`` (5xx) without applying them."""
        if not 500 <= status <= 599:
            raise ValueError("fail_next injects 5xx answers; use rate_limit_next for 403/429")
        with self._faults_lock:
            self._canned.append((_rule(method, path, n), "fail", status, None))

    def rate_limit_next(
        self,
        n: int = 1,
        kind: RateLimitKind = "secondary",
        retry_after: int = 1,
        method: str = "*",
        path: str = ".*",
    ) -> None:
        """Answer the next ``n`` matching requests as rate limited, without applying them:
        ``secondary`` is 403 + ``Retry-After``; ``primary`` is 403 + ``x-ratelimit-remaining: 0``
        and ``x-ratelimit-reset`` (now + ``retry_after``); ``429`` is 429 + ``Retry-After``."""
        with self._faults_lock:
            self._canned.append((_rule(method, path, n), "rate_limit", retry_after, kind))

    def hold(
        self, method: str, path: str, *, apply: Apply = "on_release", count: int | None = None
    ) -> Gate:
        """Hold matching requests (the next ``count``, or all until released) inside the server."""
        gate = Gate(_rule(method, path, count), apply)
        with self._faults_lock:
            self._gates.append(gate)
        return gate

    def clear_faults(self) -> None:
        """Drop every rule and release every gate."""
        with self._faults_lock:
            gates, self._gates = self._gates, []
            self._latency.clear()
            self._canned.clear()
        for gate in gates:
            gate.release()

    # server side
    def _latency_for(self, method: str, path: str) -> float:
        with self._faults_lock:
            return sum(seconds for rule, seconds in self._latency if rule.take(method, path))

    def _canned_for(self, method: str, path: str) -> tuple[str, ApiError] | None:
        with self._faults_lock:
            for rule, what, number, kind in self._canned:
                if rule.take(method, path):
                    if kind is None:
                        return what, ApiError(number, SERVER_ERRORS.get(number, "Server Error"))
                    return f"{what}:{kind}", rate_limit_error(kind, number)
            return None

    def _gate_for(self, method: str, path: str) -> Gate | None:
        with self._faults_lock:
            return next((gate for gate in self._gates if gate._catch(method, path)), None)
