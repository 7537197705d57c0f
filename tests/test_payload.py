"""Strict validation of ``leasehold.submit_apply`` payloads, and ``service.submit``: a rejected
payload writes nothing; a repeated ``request_id`` returns the same apply, dispatched once."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from storage import applies
from storage.engine import Database
from storage.errors import InvalidInput
from storage.states import ApplyState
from tasks import service
from tasks.payload import MAX_DDL, MAX_PAYLOAD_BYTES, MAX_TASKS, parse_submission
from tasks.settings import Settings
from tests import support
from tests.celery_fixtures import SentLeases

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


def test_a_good_payload() -> None:
    new = parse_submission(
        github(
            request_id="req-1", tasks=[{"table": "orders", "ddl": "ALTER TABLE orders ADD x INT"}]
        ),
        targets={},
    )
    assert (new.database_name, new.environment, new.engine) == ("shop", "staging", "sleep")
    assert (new.repository, new.pull_request, new.head_sha) == ("acme/shop", 42, SHA)
    assert new.request_id == "req-1"
    assert [(t.table_name, t.options) for t in new.tasks] == [
        ("orders", {"seconds": 1.0, "fail": False})
    ]


def test_sleep_options_are_normalised() -> None:
    new = parse_submission(with_task(options={"seconds": 2, "fail": True}), targets={})
    assert new.tasks[0].options == {"seconds": 2.0, "fail": True}


def test_mysql_engine_with_a_configured_target() -> None:
    new = parse_submission(good(engine="mysql"), targets=TARGETS)
    assert new.engine == "mysql"
    assert new.tasks[0].options == {}


def test_the_limits_themselves_pass() -> None:
    tasks = [{"table": f"t{i}", "ddl": "ALTER TABLE t ADD c INT"} for i in range(MAX_TASKS)]
    assert len(parse_submission(good(tasks=tasks), targets={}).tasks) == MAX_TASKS
    long_ddl = "-" * (MAX_DDL - 1) + "x"
    assert parse_submission(with_task(ddl=long_ddl), targets={}).tasks[0].ddl == long_ddl


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


# --- service.submit, on both backends -------------------------------------------------------------


def _settings(db: Database) -> Settings:
    return Settings(database_url=str(db.engine.url), targets=TARGETS)


@pytest.mark.parametrize(
    "payload",
    [
        good(extra=1),
        good(tasks=[]),
        good(engine="mysql", database="billing"),
        with_task(options={"seconds": True}),
        github(head_sha=...),
        good(environment="x" * (MAX_PAYLOAD_BYTES + 1)),
    ],
    ids=["unknown-key", "no-tasks", "target", "bool-seconds", "github-partial", "oversize"],
)
def test_a_rejected_submission_writes_nothing(db: Database, payload: dict[str, Any]) -> None:
    support.new_apply(db)  # something already there, which must stay as it is
    before = support.snapshot(db)
    sent = SentLeases()
    with pytest.raises(InvalidInput):
        service.submit(db, _settings(db), payload, sent)
    assert support.snapshot(db) == before
    assert sent.leases == []


def test_submit_inserts_and_dispatches(db: Database) -> None:
    sent = SentLeases()
    payload = good(tasks=[{"table": f"t{i}", "ddl": "ALTER TABLE t ADD c INT"} for i in range(3)])
    apply_id = service.submit(db, _settings(db), payload, sent)
    row = applies.get(db, apply_id)
    assert row["state"] == ApplyState.DISPATCHED
    assert [lease.apply_id for lease in sent.leases] == [apply_id]
    assert sent.leases[0].epoch == row["lease_epoch"] == 1
    assert sent.leases[0].token == row["lease_token"]
    tasks = applies.tasks(db, apply_id)
    assert [(t["position"], t["table_name"], t["state"]) for t in tasks] == [
        (0, "t0", "pending"),
        (1, "t1", "pending"),
        (2, "t2", "pending"),
    ]


def test_a_repeated_request_id_returns_the_same_apply_dispatched_once(db: Database) -> None:
    sent = SentLeases()
    payload = good(request_id="deploy-123")
    first = service.submit(db, _settings(db), payload, sent)
    snapshot = support.snapshot(db)
    second = service.submit(db, _settings(db), payload, sent)
    # Even a different payload under the same request id is the same submission.
    third = service.submit(
        db, _settings(db), good(request_id="deploy-123", environment="prod"), sent
    )
    assert first == second == third
    assert len(sent.leases) == 1
    assert support.snapshot(db) == snapshot


def test_an_apply_an_older_leasehold_left_pending_is_dispatched_by_reclaim(db: Database) -> None:
    """Insert and dispatch are one transaction now; an apply that an older leasehold inserted but
    never dispatched (``pending``, its submitter died in between) heads its line waiting: a
    repeat of its submission returns it and sends nothing, and the next reclaim pass's sweep of
    waiting lines dispatches it."""
    apply_id = support.new_apply(db, request_id="deploy-9")
    support.set_state(db, apply_id, ApplyState.PENDING)
    sent = SentLeases()
    assert service.submit(db, _settings(db), good(request_id="deploy-9"), sent) == apply_id
    assert sent.leases == []
    assert service.reclaim_stale(db, _settings(db), sent) == 0  # rotated nothing stale
    assert [lease.apply_id for lease in sent.leases] == [apply_id]
    assert applies.get(db, apply_id)["state"] == ApplyState.DISPATCHED
    assert support.log_events(db, apply_id) == [(1, "dispatched")]
    assert service.reclaim_stale(db, _settings(db), sent) == 0
    assert len(sent.leases) == 1


def test_the_longest_names_accepted_fit_their_columns(db: Database) -> None:
    payload = good(database="d" * 128, environment="e" * 64, request_id="r" * 128)
    apply_id = service.submit(db, _settings(db), payload, SentLeases())
    row = applies.get(db, apply_id)
    assert (row["database_name"], row["environment"], row["request_id"]) == (
        "d" * 128,
        "e" * 64,
        "r" * 128,
    )
