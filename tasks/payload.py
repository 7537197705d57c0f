"""Strict validation of what other apps send to ``leasehold.submit_apply``.

A rejected payload raises ``InvalidInput`` with a message naming the field, before anything is
written. Limits keep one message from filling the database or a worker's memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from storage.applies import NewApply, NewTask
from storage.errors import InvalidInput
from storage.notifications import Notify
from tasks.engines import engine_class

MAX_PAYLOAD_BYTES: Final = 256 * 1024
MAX_TASKS: Final = 100
MAX_DDL: Final = 64 * 1024
MAX_OPTIONS_BYTES: Final = 4096
MAX_REQUESTED_BY: Final = 255  # applies.requested_by and control_requests.requested_by

_FIELDS: Final = frozenset(
    {
        "database",
        "environment",
        "engine",
        "tasks",
        "repository",
        "pull_request",
        "head_sha",
        "request_id",
        "notify",
        "requested_by",
    }
)
_TASK_FIELDS: Final = frozenset({"table", "ddl", "options"})
_NOTIFY_FIELDS: Final = frozenset({"task", "queue"})
# Celery task names and queue names as other apps write them.
_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}")
_QUEUE = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_ENVIRONMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")  # applies.environment is 64 wide
_TABLE = re.compile(r"[A-Za-z0-9_$][A-Za-z0-9_$.\-]{0,127}")
_REPOSITORY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,38})/[A-Za-z0-9._\-]{1,100}")
_SHA = re.compile(r"[0-9a-f]{40}")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces


def parse_submission(payload: Mapping[str, Any], *, targets: Mapping[str, str]) -> NewApply:
    if not isinstance(payload, Mapping):
        raise InvalidInput(f"payload must be a JSON object, not {type(payload).__name__}")
    try:
        size = len(json.dumps(payload, separators=(",", ":")).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"payload is not JSON-serializable: {exc}") from None
    if size > MAX_PAYLOAD_BYTES:
        raise InvalidInput(f"payload is {size} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    unknown = set(payload) - _FIELDS
    if unknown:
        raise InvalidInput(f"unknown payload keys: {sorted(unknown)}")

    database = _string(payload, "database", _NAME)
    environment = _string(payload, "environment", _ENVIRONMENT)
    engine_name = _required(payload, "engine", str)
    engine = engine_class(engine_name)
    if engine_name == "mysql" and database not in targets:
        raise InvalidInput(
            f"database {database!r} is not a configured target (LEASEHOLD_TARGETS names "
            f"{sorted(targets) or 'none'})"
        )

    raw_tasks = _required(payload, "tasks", list)
    if not 1 <= len(raw_tasks) <= MAX_TASKS:
        raise InvalidInput(f"tasks must hold 1 to {MAX_TASKS} entries, not {len(raw_tasks)}")
    tasks = [_task(i, raw, engine) for i, raw in enumerate(raw_tasks)]

    github = {k: payload.get(k) for k in ("repository", "pull_request", "head_sha")}
    given = [k for k, v in github.items() if v is not None]
    if given and len(given) != 3:
        missing = sorted(set(github) - set(given))
        raise InvalidInput(f"repository, pull_request and head_sha go together; missing {missing}")
    repository = _optional_string(payload, "repository", _REPOSITORY)
    head_sha = _optional_string(payload, "head_sha", _SHA)
    pull_request = payload.get("pull_request")
    if pull_request is not None and (
        isinstance(pull_request, bool)
        or not isinstance(pull_request, int)
        or pull_request < 1
        or pull_request > 2**31 - 1
    ):
        raise InvalidInput("pull_request must be a positive integer")

    return NewApply(
        database_name=database,
        environment=environment,
        engine=engine_name,
        tasks=tasks,
        repository=repository,
        pull_request=pull_request,
        head_sha=head_sha,
        request_id=_optional_string(payload, "request_id", _REQUEST_ID),
        notify=_notify(payload.get("notify")),
        requested_by=requested_by(payload.get("requested_by")),
    )


def requested_by(raw: object) -> str | None:
    """``requested_by``: free text naming who asked, 1 to 255 printable characters. It is shown
    in terminals and on pull requests, so line breaks and control characters (which could forge
    lines of ``leasehold logs`` or move a terminal's cursor) are refused, not stored."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidInput(f"requested_by must be a string, not {type(raw).__name__}")
    if not 1 <= len(raw) <= MAX_REQUESTED_BY or not raw.strip():
        raise InvalidInput(
            f"requested_by must hold 1 to {MAX_REQUESTED_BY} characters, not only spaces "
            f"(it has {len(raw)})"
        )
    if not raw.isprintable():
        raise InvalidInput(
            "requested_by must be printable text: no line breaks or control characters"
        )
    return raw


def _notify(raw: object) -> Notify | None:
    """``notify: {"task": ..., "queue": ...}``: what to send the caller when the apply ends. The
    queue is required: sent without one, the task would go to leasehold's own queue, where no
    worker knows it."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) != _NOTIFY_FIELDS:
        keys = sorted(map(str, raw)) if isinstance(raw, Mapping) else type(raw).__name__
        raise InvalidInput(f"notify must be an object with keys task and queue, not {keys}")
    task, queue = raw["task"], raw["queue"]
    if not isinstance(task, str) or not _TASK_NAME.fullmatch(task):
        raise InvalidInput(f"notify.task must be a Celery task name, not {str(task)[:40]!r}")
    if task.startswith("leasehold."):
        raise InvalidInput(f"notify.task {task!r} is leasehold's own: name a task of yours")
    if not isinstance(queue, str) or not _QUEUE.fullmatch(queue):
        raise InvalidInput(f"notify.queue must be a queue name, not {str(queue)[:40]!r}")
    return Notify(task, queue)


def _task(index: int, raw: object, engine: Any) -> NewTask:
    where = f"tasks[{index}]"
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"{where} must be an object")
    unknown = set(raw) - _TASK_FIELDS
    if unknown:
        raise InvalidInput(f"{where}: unknown keys {sorted(unknown)}")
    table = raw.get("table")
    if not isinstance(table, str) or not _TABLE.fullmatch(table):
        raise InvalidInput(f"{where}.table must be a table name (letters, digits, _ $ . -)")
    ddl = raw.get("ddl")
    if not isinstance(ddl, str) or not ddl.strip() or len(ddl) > MAX_DDL:
        raise InvalidInput(f"{where}.ddl must be a non-empty string of at most {MAX_DDL} chars")
    options = raw.get("options", {})
    if not isinstance(options, Mapping):
        raise InvalidInput(f"{where}.options must be an object")
    if len(json.dumps(options)) > MAX_OPTIONS_BYTES:
        raise InvalidInput(f"{where}.options is over {MAX_OPTIONS_BYTES} bytes")
    try:
        clean = engine.validate_options(options)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}.options: {exc}") from None
    return NewTask(table_name=table, ddl=ddl, options=clean)


def _required(payload: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in payload:
        raise InvalidInput(f"missing required key {key!r}")
    value = payload[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidInput(f"{key} must be a {kind.__name__}, not {type(value).__name__}")
    return value


def _string(payload: Mapping[str, Any], key: str, shape: re.Pattern[str]) -> str:
    value: str = _required(payload, key, str)
    if not shape.fullmatch(value):
        raise InvalidInput(f"{key} {value[:40]!r} is malformed")
    return value


def _optional_string(payload: Mapping[str, Any], key: str, shape: re.Pattern[str]) -> str | None:
    if payload.get(key) is None:
        return None
    return _string(payload, key, shape)
