"""Submission payloads for the tests of ``tasks/payload.py`` and of submitting through the service:
a good one, variations on it, and every rejected shape with the fragment its error must name."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.payload import MAX_DDL, MAX_PAYLOAD_BYTES

TARGETS = {"shop": "mysql+mysqldb://root@127.0.0.1:3306/shop"}


SHA = "0123456789abcdef0123456789abcdef01234567"


def good(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "database": "shop",
        "environment": "staging",
        "engine": "sleep",
        "tasks": [
            {"table": "orders", "ddl": "ALTER TABLE orders ADD COLUMN n INT", "options": {}},
        ],
    }
    payload.update(changes)
    return payload


def with_task(**changes: Any) -> dict[str, Any]:
    payload = good()
    task = dict(payload["tasks"][0])
    task.update(changes)
    payload["tasks"] = [task]
    return payload


def without(key: str) -> dict[str, Any]:
    payload = good()
    del payload[key]
    return payload


def github(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"repository": "acme/shop", "pull_request": 42, "head_sha": SHA}
    fields.update(changes)
    return good(**{k: v for k, v in fields.items() if v is not ...})


REJECTED = [
    # the payload as a whole
    pytest.param(["not", "a", "dict"], "payload must be a JSON object", id="not-an-object"),
    pytest.param(good(extra=1), "unknown payload keys: ['extra']", id="unknown-key"),
    pytest.param(good(callback_url="x"), "unknown payload keys", id="unknown-key-2"),
    pytest.param(good(database={1, 2}), "not JSON-serializable", id="not-json"),
    pytest.param(
        good(environment="x" * (MAX_PAYLOAD_BYTES + 1)),
        f"the limit is {MAX_PAYLOAD_BYTES}",
        id="oversize",
    ),
    # missing keys
    pytest.param(without("database"), "missing required key 'database'", id="missing-database"),
    pytest.param(
        without("environment"), "missing required key 'environment'", id="missing-environment"
    ),
    pytest.param(without("engine"), "missing required key 'engine'", id="missing-engine"),
    pytest.param(without("tasks"), "missing required key 'tasks'", id="missing-tasks"),
    # wrong types
    pytest.param(good(database=5), "database must be a str, not int", id="database-int"),
    pytest.param(good(environment=None), "environment must be a str", id="environment-null"),
    pytest.param(good(engine=["sleep"]), "engine must be a str, not list", id="engine-list"),
    pytest.param(good(tasks={"table": "t"}), "tasks must be a list, not dict", id="tasks-dict"),
    pytest.param(good(tasks="t"), "tasks must be a list, not str", id="tasks-str"),
    # shapes and lengths
    pytest.param(good(database=""), "database '' is malformed", id="database-empty"),
    pytest.param(good(database="x" * 129), "database", id="database-too-long"),
    pytest.param(good(database="shop; DROP"), "is malformed", id="database-bad-chars"),
    pytest.param(good(environment="st aging"), "environment", id="environment-space"),
    # 65 characters passed validation and failed at MySQL's insert ("Data too long"), uncaught.
    pytest.param(good(environment="e" * 65), "environment", id="environment-too-long"),
    pytest.param(good(request_id="a b"), "request_id", id="request-id-space"),
    pytest.param(good(request_id="r" * 129), "request_id", id="request-id-too-long"),
    pytest.param(good(request_id=7), "request_id must be a str", id="request-id-int"),
    # counts
    pytest.param(good(tasks=[]), "tasks must hold 1 to 100 entries, not 0", id="no-tasks"),
    pytest.param(
        good(tasks=[{"table": f"t{i}", "ddl": "ALTER TABLE t ADD c INT"} for i in range(101)]),
        "tasks must hold 1 to 100 entries, not 101",
        id="101-tasks",
    ),
    # engines
    pytest.param(good(engine="gh-ost"), "unknown engine 'gh-ost'", id="unknown-engine"),
    pytest.param(
        good(engine="mysql", database="billing"),
        "database 'billing' is not a configured target",
        id="mysql-target-not-configured",
    ),
    pytest.param(
        with_task(options={"seconds": 1}) | {"engine": "mysql"},
        "tasks[0].options: mysql engine takes no options",
        id="mysql-options",
    ),
    # apply tasks
    pytest.param(
        good(tasks=["ALTER TABLE t ADD c INT"]), "tasks[0] must be an object", id="task-str"
    ),
    pytest.param(
        with_task(columns=["x"]), "tasks[0]: unknown keys ['columns']", id="task-unknown-key"
    ),
    pytest.param(with_task(table=None), "tasks[0].table must be a table name", id="table-null"),
    pytest.param(with_task(table="a b"), "tasks[0].table must be a table name", id="table-space"),
    pytest.param(with_task(table="t" * 129), "tasks[0].table", id="table-too-long"),
    pytest.param(with_task(ddl=None), "tasks[0].ddl must be a non-empty string", id="ddl-null"),
    pytest.param(with_task(ddl="   "), "tasks[0].ddl must be a non-empty string", id="ddl-blank"),
    pytest.param(with_task(ddl="x" * (MAX_DDL + 1)), "at most 65536", id="ddl-too-long"),
    pytest.param(with_task(options=[1]), "tasks[0].options must be an object", id="options-list"),
    pytest.param(
        with_task(options={"seconds": 1, "note": "n" * 5000}), "over 4096 bytes", id="options-big"
    ),
    # sleep options
    pytest.param(
        with_task(options={"sleep": 1}), "sleep engine: unknown options ['sleep']", id="sleep-key"
    ),
    pytest.param(
        with_task(options={"seconds": "3"}), "options.seconds must be a number", id="seconds-str"
    ),
    pytest.param(
        with_task(options={"seconds": True}), "options.seconds must be a number", id="seconds-bool"
    ),
    pytest.param(with_task(options={"seconds": -1}), "options.seconds must be within", id="neg"),
    pytest.param(
        with_task(options={"seconds": 10**9}), "options.seconds must be within", id="too-long"
    ),
    pytest.param(
        with_task(options={"seconds": float("nan")}), "options.seconds must be within", id="nan"
    ),
    pytest.param(
        with_task(options={"fail": "yes"}), "options.fail must be true or false", id="fail-str"
    ),
    pytest.param(with_task(options={"fail": 1}), "options.fail must be true or false", id="fail-1"),
    # GitHub fields: all or none, well formed
    pytest.param(
        github(head_sha=..., pull_request=...),
        "go together; missing ['head_sha', 'pull_request']",
        id="github-only-repository",
    ),
    pytest.param(github(repository=...), "missing ['repository']", id="github-no-repository"),
    pytest.param(github(head_sha=...), "missing ['head_sha']", id="github-no-sha"),
    pytest.param(github(repository="shop"), "repository 'shop' is malformed", id="repo-no-owner"),
    pytest.param(github(repository="a/b/c"), "repository", id="repo-three-parts"),
    pytest.param(github(repository="-acme/shop"), "repository", id="repo-leading-dash"),
    pytest.param(github(head_sha=SHA[:39]), "head_sha", id="sha-short"),
    pytest.param(github(head_sha=SHA.upper()), "head_sha", id="sha-uppercase"),
    pytest.param(github(head_sha="g" * 40), "head_sha", id="sha-not-hex"),
    pytest.param(github(head_sha=12), "head_sha must be a str", id="sha-int"),
    pytest.param(github(pull_request="42"), "pull_request must be a positive integer", id="pr-str"),
    pytest.param(
        github(pull_request=True), "pull_request must be a positive integer", id="pr-bool"
    ),
    pytest.param(github(pull_request=0), "pull_request must be a positive integer", id="pr-zero"),
    pytest.param(github(pull_request=2**31), "pull_request must be a positive", id="pr-huge"),
    pytest.param(github(pull_request=4.0), "pull_request must be a positive", id="pr-float"),
]
