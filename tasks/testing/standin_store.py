"""State behind the GitHub stand-in: issue comments and check runs with every version kept, and
the request log. Thread-safe; the HTTP layer lives in ``tasks.testing.standin``."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

JSON = dict[str, Any]
DOCS = "https://docs.github.com/rest"
RUN_STATUSES = ("queued", "in_progress", "completed")
CONCLUSIONS = (
    "action_required",
    "cancelled",
    "failure",
    "neutral",
    "success",
    "skipped",
    "timed_out",
)
MAX_COMMENT_BODY = 65536  # GitHub refuses longer comment bodies with a 422


class ApiError(Exception):
    """A non-2xx answer: its status, GitHub's error JSON and any extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[Any] | None = None,
        documentation_url: str = DOCS,
    ) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.headers = dict(headers or {})
        self.body: JSON = {
            "message": message,
            "documentation_url": documentation_url,
            "status": str(status),
        }
        if errors is not None:
            self.body["errors"] = errors


def invalid(resource: str, field: str, code: str = "missing_field") -> ApiError:
    return ApiError(
        422, "Validation Failed", errors=[{"resource": resource, "field": field, "code": code}]
    )


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in saw it. Never holds the credential itself."""

    seq: int
    method: str
    path: str
    query: dict[str, str]
    body: Any  # the parsed JSON body, None when empty or not JSON
    auth: str  # "none", "invalid", "token", "installation" or "app" (a JWT)
    received_at: datetime
    status: int | None = None  # None while the request is still in flight
    answered_at: datetime | None = None
    fault: str | None = None  # "latency", "fail", "rate_limit:<kind>", "held"

    @property
    def auth_present(self) -> bool:
        return self.auth != "none"


@dataclass(frozen=True)
class Comment:
    """One version of an issue comment."""

    id: int
    owner: str
    repo: str
    issue_number: int
    body: str
    user: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class CheckRun:
    """One version of a check run."""

    id: int
    owner: str
    repo: str
    name: str
    head_sha: str
    external_id: str | None
    details_url: str | None
    status: str
    conclusion: str | None
    started_at: datetime | None
    completed_at: datetime | None
    output_title: str | None
    output_summary: str | None
    output_text: str | None
    updated_at: datetime


def _optional_str(data: JSON, key: str, resource: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise invalid(resource, key, "invalid")
    return value


def _optional_time(data: JSON, key: str) -> datetime | None:
    value = data.get(key)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise invalid("CheckRun", key, "invalid") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _apply_run_fields(run: CheckRun, data: Any, *, creating: bool) -> CheckRun:
    """GitHub's rules: a conclusion implies ``completed``; ``completed`` needs a conclusion."""
    if not isinstance(data, dict):
        raise ApiError(400, "Problems parsing JSON")
    changes: dict[str, Any] = {"updated_at": now()}
    for key in ("name", "external_id", "details_url"):
        if key in data:
            changes[key] = _optional_str(data, key, "CheckRun")
    if "name" in changes and not changes["name"]:
        raise invalid("CheckRun", "name")
    status = data.get("status", None if not creating else "queued")
    conclusion = data.get("conclusion")
    if status is not None and status not in RUN_STATUSES:
        raise invalid("CheckRun", "status", "invalid")
    if conclusion is not None and conclusion not in CONCLUSIONS:
        raise invalid("CheckRun", "conclusion", "invalid")
    if conclusion is not None:
        status = "completed"
    if status == "completed" and conclusion is None:
        raise ApiError(
            422,
            'Invalid request.\n\nNo subschema in "anyOf" matched.\n"conclusion" wasn\'t supplied.',
            documentation_url="https://docs.github.com/rest/checks/runs#update-a-check-run",
        )
    if status is not None:
        changes["status"] = status
        changes["conclusion"] = conclusion
        if status == "completed":
            changes["completed_at"] = _optional_time(data, "completed_at") or now()
        else:
            changes["completed_at"] = None
    if "started_at" in data:
        changes["started_at"] = _optional_time(data, "started_at")
    if "output" in data:
        output = data["output"]
        if not isinstance(output, dict) or not all(
            isinstance(output.get(k), str) for k in ("title", "summary")
        ):
            raise invalid("CheckRun", "output")
        changes["output_title"] = output["title"]
        changes["output_summary"] = output["summary"]
        changes["output_text"] = _optional_str(output, "text", "CheckRun")
    return replace(run, **changes)


class Store:
    """Comments, check runs and the request log, guarded by one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._comment_ids = itertools.count(1_000_001)
        self._run_ids = itertools.count(2_000_001)
        self._comments: dict[int, list[Comment]] = {}
        self._runs: dict[int, list[CheckRun]] = {}
        self._log: list[RecordedRequest] = []

    # request log
    def arrive(self, method: str, path: str, query: dict[str, str], body: Any, auth: str) -> int:
        with self._lock:
            seq = len(self._log)
            self._log.append(RecordedRequest(seq, method, path, query, body, auth, now()))
            return seq

    def answer(self, seq: int, status: int, fault: str | None) -> None:
        with self._lock:
            self._log[seq] = replace(self._log[seq], status=status, answered_at=now(), fault=fault)

    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._log)

    # issue comments
    def create_comment(self, owner: str, repo: str, number: int, data: Any, user: str) -> Comment:
        body = self._comment_body(data)
        with self._lock:
            at = now()
            comment = Comment(next(self._comment_ids), owner, repo, number, body, user, at, at)
            self._comments[comment.id] = [comment]
            return comment

    def edit_comment(self, owner: str, repo: str, comment_id: int, data: Any) -> Comment:
        body = self._comment_body(data)
        with self._lock:
            current = self._comment(owner, repo, comment_id)
            edited = replace(current, body=body, updated_at=now())
            self._comments[comment_id].append(edited)
            return edited

    def get_comment(self, owner: str, repo: str, comment_id: int) -> Comment:
        with self._lock:
            return self._comment(owner, repo, comment_id)

    def comments(self, owner: str, repo: str, number: int) -> list[Comment]:
        with self._lock:
            return [
                versions[-1]
                for _, versions in sorted(self._comments.items())
                if (versions[0].owner, versions[0].repo, versions[0].issue_number)
                == (owner, repo, number)
            ]

    def all_comments(self) -> list[Comment]:
        with self._lock:
            return [versions[-1] for _, versions in sorted(self._comments.items())]

    def comment_history(self, comment_id: int) -> list[Comment]:
        with self._lock:
            return list(self._comments.get(comment_id, []))

    def _comment(self, owner: str, repo: str, comment_id: int) -> Comment:
        versions = self._comments.get(comment_id)
        if not versions or (versions[0].owner, versions[0].repo) != (owner, repo):
            raise ApiError(404, "Not Found")
        return versions[-1]

    @staticmethod
    def _comment_body(data: Any) -> str:
        if not isinstance(data, dict) or not isinstance(data.get("body"), str):
            raise ApiError(422, 'Invalid request.\n\n"body" wasn\'t supplied.')
        body: str = data["body"]
        if len(body) > MAX_COMMENT_BODY:
            raise invalid("IssueComment", "data", "custom")
        return body

    # check runs
    def create_run(self, owner: str, repo: str, data: Any) -> CheckRun:
        if not isinstance(data, dict):
            raise ApiError(400, "Problems parsing JSON")
        for key in ("name", "head_sha"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise invalid("CheckRun", key)
        blank = CheckRun(
            id=0,
            owner=owner,
            repo=repo,
            name=data["name"],
            head_sha=data["head_sha"],
            external_id=None,
            details_url=None,
            status="queued",
            conclusion=None,
            started_at=now(),
            completed_at=None,
            output_title=None,
            output_summary=None,
            output_text=None,
            updated_at=now(),
        )
        run = _apply_run_fields(blank, data, creating=True)
        with self._lock:
            run = replace(run, id=next(self._run_ids))
            self._runs[run.id] = [run]
            return run

    def update_run(self, owner: str, repo: str, run_id: int, data: Any) -> CheckRun:
        with self._lock:
            updated = _apply_run_fields(self._run(owner, repo, run_id), data, creating=False)
            self._runs[run_id].append(updated)
            return updated

    def get_run(self, owner: str, repo: str, run_id: int) -> CheckRun:
        with self._lock:
            return self._run(owner, repo, run_id)

    def check_runs(
        self,
        owner: str | None = None,
        repo: str | None = None,
        head_sha: str | None = None,
        name: str | None = None,
    ) -> list[CheckRun]:
        wanted = {"owner": owner, "repo": repo, "head_sha": head_sha, "name": name}
        with self._lock:
            return [
                versions[-1]
                for _, versions in sorted(self._runs.items())
                if all(v is None or getattr(versions[-1], k) == v for k, v in wanted.items())
            ]

    def check_run_history(self, run_id: int) -> list[CheckRun]:
        with self._lock:
            return list(self._runs.get(run_id, []))

    def _run(self, owner: str, repo: str, run_id: int) -> CheckRun:
        versions = self._runs.get(run_id)
        if not versions or (versions[0].owner, versions[0].repo) != (owner, repo):
            raise ApiError(404, "Not Found")
        return versions[-1]

    def contains(self, secret: str) -> bool:
        """Whether ``secret`` appears anywhere the stand-in keeps: log, comments, check runs."""
        with self._lock:
            kept: list[object] = [*self._log, *self._comments.values(), *self._runs.values()]
        return any(secret in repr(item) for item in kept)
