"""A narrow GitHub client over githubkit: exactly the calls leasehold makes, each one HTTP
request with a hard timeout, githubkit's own retries off (retries happen in the publisher, each
attempt inside the fence), and errors translated into leasehold's hierarchy.

Tokens and keys never appear in messages: githubkit's exceptions name the method and URL only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
from githubkit import AppInstallationAuthStrategy, GitHub, TokenAuthStrategy
from githubkit.cache import MemCacheStrategy
from githubkit.exception import (
    GitHubException,
    RateLimitExceeded,
    RequestFailed,
    RequestTimeout,
)

from storage.errors import ConfigurationError, LeaseholdError

T = TypeVar("T")
PER_PAGE = 100
MAX_PAGES = 50


class GitHubError(LeaseholdError):
    """A GitHub call failed."""


class GitHubRetryable(GitHubError):
    """5xx, a timeout, a dropped connection or a rate limit: worth another attempt later.

    ``answered``: GitHub answered (a 5xx, a rate limit), so the request is over; False when no
    answer came (a timeout, a dropped connection), and GitHub may still apply it later."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, answered: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.answered = answered


class GitHubRejected(GitHubError):
    """GitHub refused the request (4xx other than rate limits): retrying will not help."""


@dataclass(frozen=True, slots=True)
class GitHubConfig:
    api_url: str = "https://api.github.com"
    token: str | None = field(default=None, repr=False)
    app_id: str | None = None
    private_key: str | None = field(default=None, repr=False)
    installation_id: str | None = None
    timeout: float = 10.0

    @property
    def enabled(self) -> bool:
        return bool(self.token) or bool(self.app_id and self.private_key and self.installation_id)


class GitHubClient:
    def __init__(self, config: GitHubConfig) -> None:
        if not config.enabled:
            raise ConfigurationError("no GitHub credentials configured")
        auth: Any
        if config.token:
            auth = TokenAuthStrategy(config.token)
        else:
            key = str(config.private_key)
            if not key.lstrip().startswith("-----BEGIN"):
                try:
                    key = Path(key).read_text()
                except OSError as exc:
                    raise ConfigurationError(
                        f"LEASEHOLD_GITHUB_APP_PRIVATE_KEY: cannot read key file: {exc.strerror}"
                    ) from None
            auth = AppInstallationAuthStrategy(
                str(config.app_id), key, int(str(config.installation_id))
            )
        self._open = ExitStack()
        self._gh: GitHub[Any] = GitHub(
            auth,
            base_url=config.api_url.rstrip("/") + "/",
            timeout=_budget(config.timeout),
            auto_retry=False,
            http_cache=False,
            # githubkit's default token cache is process-wide and not keyed by API URL; a
            # client of its own keeps App installation tokens apart per configuration.
            cache_strategy=MemCacheStrategy(),
            user_agent="leasehold",
            transport=_DeadlineTransport(),
        )

    def open(self) -> GitHubClient:
        """Keep one HTTP connection pool for the calls that follow (on this thread), instead of
        a new client, and a new TLS handshake made while the apply row is locked, per call."""
        self._open.enter_context(self._gh)
        return self

    def close(self) -> None:
        self._open.close()

    @staticmethod
    @contextmanager
    def send_before(deadline: float) -> Iterator[None]:
        """Requests made on this thread inside the block are sent only before ``deadline``
        (``time.monotonic``), checked by the transport as the last step before the connection
        is used: a thread frozen (SIGSTOP, a long GC pause) after its effect window opened, and
        woken after the window ended, does not send a stale edit. A request refused this way
        raises ``GitHubRetryable`` with ``answered=True``: it never left, so it is over."""
        previous = getattr(_SEND_DEADLINE, "at", None)
        _SEND_DEADLINE.at = deadline
        try:
            yield
        finally:
            _SEND_DEADLINE.at = previous

    # --- issue comments --------------------------------------------------------------------------

    def find_comment(self, repository: str, number: int, needle: str) -> int | None:
        """The id of the first comment on the PR whose body contains ``needle``."""
        owner, repo = _split(repository)
        for page in self._pages(
            lambda p: self._gh.rest.issues.list_comments(
                owner, repo, number, per_page=PER_PAGE, page=p
            )
        ):
            for comment in page:
                if needle in (comment.get("body") or ""):
                    return int(comment["id"])
        return None

    def create_comment(self, repository: str, number: int, body: str) -> int:
        owner, repo = _split(repository)
        data = self._call(
            lambda: self._gh.rest.issues.create_comment(owner, repo, number, data={"body": body})
        )
        return int(data["id"])

    def comment_body(self, repository: str, comment_id: int) -> str:
        owner, repo = _split(repository)
        data = self._call(lambda: self._gh.rest.issues.get_comment(owner, repo, comment_id))
        return str(data.get("body") or "")

    def edit_comment(self, repository: str, comment_id: int, body: str) -> None:
        owner, repo = _split(repository)
        self._call(
            lambda: self._gh.rest.issues.update_comment(
                owner, repo, comment_id, data={"body": body}
            )
        )

    # --- check runs ------------------------------------------------------------------------------

    def find_check_run(self, repository: str, sha: str, name: str, external_id: str) -> int | None:
        owner, repo = _split(repository)
        for page in self._pages(
            lambda p: self._gh.rest.checks.list_for_ref(
                owner, repo, sha, check_name=name, filter_="all", per_page=PER_PAGE, page=p
            ),
            key="check_runs",
        ):
            for run in page:
                if run.get("external_id") == external_id:
                    return int(run["id"])
        return None

    def create_check_run(
        self, repository: str, sha: str, *, name: str, external_id: str, summary: str
    ) -> int:
        owner, repo = _split(repository)
        payload: Any = {
            "name": name,
            "head_sha": sha,
            "external_id": external_id,
            "status": "in_progress",
            "output": {"title": name, "summary": summary},
        }
        data = self._call(lambda: self._gh.rest.checks.create(owner, repo, data=payload))
        return int(data["id"])

    def check_run_state(self, repository: str, check_run_id: int) -> tuple[str, str | None]:
        """(status, conclusion) of a check run as GitHub shows it now."""
        owner, repo = _split(repository)
        data = self._call(lambda: self._gh.rest.checks.get(owner, repo, check_run_id))
        conclusion = data.get("conclusion")
        return str(data["status"]), None if conclusion is None else str(conclusion)

    def update_check_run(
        self,
        repository: str,
        check_run_id: int,
        *,
        name: str,
        summary: str,
        conclusion: str | None = None,
    ) -> None:
        owner, repo = _split(repository)
        payload: Any = {"output": {"title": name, "summary": summary}}
        if conclusion is None:
            payload["status"] = "in_progress"
        else:
            payload.update(status="completed", conclusion=conclusion)
        self._call(lambda: self._gh.rest.checks.update(owner, repo, check_run_id, data=payload))

    # --- plumbing --------------------------------------------------------------------------------

    def _pages(
        self, fetch: Callable[[int], Any], *, key: str | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        for page in range(1, MAX_PAGES + 1):
            data = self._call(partial(fetch, page))
            items: list[dict[str, Any]] = data[key] if key else data
            yield items
            if len(items) < PER_PAGE:
                return

    @staticmethod
    def _call(request: Callable[[], Any]) -> Any:
        try:
            return request().json()
        except RateLimitExceeded as exc:
            raise GitHubRetryable(
                f"rate limited: {exc!r}",
                retry_after=exc.retry_after.total_seconds(),
                answered=True,
            ) from exc
        except RequestFailed as exc:
            status = exc.response.status_code
            if status >= 500 or status in (403, 429):
                after = _retry_after(exc.response.raw_response.headers)
                raise GitHubRetryable(
                    f"GitHub answered {status}: {exc!r}", retry_after=after, answered=True
                ) from exc
            raise GitHubRejected(f"GitHub answered {status}: {exc!r}") from exc
        except RequestTimeout as exc:
            raise GitHubRetryable(f"timed out: {exc!r}") from exc
        except GitHubException as exc:
            if isinstance(exc.__cause__, NotSent):
                raise GitHubRetryable(str(exc.__cause__), answered=True) from exc
            raise GitHubRetryable(f"request failed: {exc!r}") from exc


class NotSent(Exception):
    """A request the transport refused to send: its sender's deadline had passed."""


_SEND_DEADLINE = threading.local()


class _DeadlineTransport(httpx.HTTPTransport):
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        deadline: float | None = getattr(_SEND_DEADLINE, "at", None)
        if deadline is not None and (late := time.monotonic() - deadline) > 0:
            raise NotSent(
                f"{request.method} not sent: {late:.2f}s past its effect window's start margin "
                "(the worker was paused)"
            )
        return super().handle_request(request)


def _budget(total: float) -> httpx.Timeout:
    """httpx times each phase separately; split ``total`` across them so that a call (one
    connection, one request, a small response) cannot outlast ``total``, which the lock-delay
    bound relies on. A response trickled in many reads could still exceed it: GitHub's answers
    here are a few KiB."""
    return httpx.Timeout(connect=total * 0.3, write=total * 0.2, read=total * 0.4, pool=total * 0.1)


def _split(repository: str) -> tuple[str, str]:
    owner, _, repo = repository.partition("/")
    return owner, repo


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date) or ``x-ratelimit-reset``."""
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    reset = headers.get("x-ratelimit-reset")
    if reset and headers.get("x-ratelimit-remaining") == "0":
        try:
            return max(0.0, float(reset) - time.time())
        except ValueError:
            return None
    return None
