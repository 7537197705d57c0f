"""docker-compose.rabbitmq.yml, the override that puts the broker on RabbitMQ (issue 12), checked
the way tests/unit/test_compose.py checks the base file: against the Compose Specification's
schema (or ``docker compose config`` where the compose plugin exists), alone and merged onto
docker-compose.yml as ``docker compose -f docker-compose.yml -f docker-compose.rabbitmq.yml``
merges it; and celeryconfig loads the merged environment with an ``amqp://`` broker and the
result backend still on Redis."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests import support
from tests.unit.test_compose import (
    APP_SERVICES,
    COMPOSE,
    LONG_RUNNING,
    _compose_plugin,
    _host_ips,
    compose_problems,
    compose_schema,
    environment,
    interpolated,
    interpolation_problems,
)

ROOT = Path(__file__).resolve().parents[2]
OVERRIDE = ROOT / "docker-compose.rabbitmq.yml"

# Compose merges these service keys as sequences of unique entries (the override's added to the
# base's); every other sequence (command, entrypoint, healthcheck.test) is replaced whole.
_UNION = {"ports", "volumes", "expose", "dns", "dns_search", "tmpfs", "cap_add", "cap_drop"}


def merge(base: Any, override: Any, key: str | None = None) -> Any:
    """``override`` merged onto ``base`` as compose merges files: mappings key by key (an
    ``environment`` or ``depends_on`` entry of the override replaces the base's one of that
    name), the sequences of :data:`_UNION` as a union, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = merge(base[name], value, name) if name in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list) and key in _UNION:
        return [*base, *(item for item in override if item not in base)]
    return copy.deepcopy(override)


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return interpolated(load(COMPOSE))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def override() -> dict[str, Any]:
    return interpolated(load(OVERRIDE))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    document = merge(base, override)
    assert isinstance(document, dict)
    return document


def test_the_override_alone_is_a_valid_compose_file() -> None:
    raw = load(OVERRIDE)
    assert interpolation_problems(raw) == []
    assert compose_problems(interpolated(raw), compose_schema()) == []


def test_the_merged_file_is_valid(merged: dict[str, Any]) -> None:
    assert compose_problems(merged, compose_schema()) == []


def test_the_override_changes_only_services_of_the_base_file_and_every_leasehold_one(
    base: dict[str, Any], override: dict[str, Any]
) -> None:
    """It adds ``rabbitmq`` and changes nothing but services the base file has; and it changes
    every service that runs leasehold, so that none is left sending to Redis's broker."""
    added = set(override["services"]) - set(base["services"])
    assert added == {"rabbitmq"}
    runs_leasehold = {
        name
        for name, service in base["services"].items()
        if "LEASEHOLD_BROKER_URL" in environment(service)
    }
    assert runs_leasehold == set(APP_SERVICES)
    assert set(override["services"]) - added == runs_leasehold
    assert set(override.get("volumes") or {}) == {"rabbitmq-data"}
    assert set(override) <= {"services", "volumes"} | {k for k in override if k.startswith("x-")}


def test_the_broker_is_rabbitmq_and_the_result_backend_stays_on_redis(
    base: dict[str, Any], merged: dict[str, Any]
) -> None:
    rabbit = environment(merged["services"]["rabbitmq"])
    for name in APP_SERVICES:
        env = environment(merged["services"][name])
        before = environment(base["services"][name])
        broker = urlsplit(env["LEASEHOLD_BROKER_URL"] or "")
        assert broker.scheme == "amqp", f"{name}: {broker.geturl()}"
        assert (broker.hostname, broker.port) == ("rabbitmq", 5672), name
        # The credentials and vhost that the rabbitmq service creates at its first start.
        assert broker.username == rabbit["RABBITMQ_DEFAULT_USER"], name
        assert broker.password == rabbit["RABBITMQ_DEFAULT_PASS"], name
        assert broker.path == f"/{rabbit['RABBITMQ_DEFAULT_VHOST']}", name
        assert env["LEASEHOLD_RESULT_BACKEND"] == before["LEASEHOLD_RESULT_BACKEND"]
        assert (env["LEASEHOLD_RESULT_BACKEND"] or "").startswith("redis://redis:6379/")
        # Only the broker changed: every other setting is the base file's.
        assert {k: v for k, v in env.items() if k != "LEASEHOLD_BROKER_URL"} == {
            k: v for k, v in before.items() if k != "LEASEHOLD_BROKER_URL"
        }, name


def test_leasehold_waits_for_a_healthy_rabbitmq_and_still_for_redis(
    merged: dict[str, Any],
) -> None:
    services = merged["services"]
    for name in APP_SERVICES:
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
    for name in LONG_RUNNING:  # the results still go to Redis, and the migration still comes first
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    assert services["migrate"]["depends_on"]["mysql"]["condition"] == "service_healthy"
    # What the override does not touch is the base file's, untouched by the merge.
    for name in APP_SERVICES:
        assert services[name]["command"] == load(COMPOSE)["services"][name]["command"]


def test_rabbitmq_has_a_health_check_a_volume_and_no_public_port(merged: dict[str, Any]) -> None:
    rabbitmq = merged["services"]["rabbitmq"]
    assert rabbitmq["image"].startswith("rabbitmq:3.13")
    test = rabbitmq["healthcheck"]["test"]
    assert test[:2] == ["CMD", "rabbitmq-diagnostics"], test
    assert "rabbitmq-data:/var/lib/rabbitmq" in rabbitmq["volumes"]
    assert rabbitmq.get("hostname") == "rabbitmq", "the node's data folder follows the hostname"
    for name, service in merged["services"].items():
        assert set(_host_ips(service.get("ports") or [])) <= {"127.0.0.1"}, f"{name} is exposed"


def test_the_password_comes_from_the_users_shell() -> None:
    """Like MYSQL_PASSWORD in the base file: a default for a local try, overridable, one name."""
    raw = load(OVERRIDE)["services"]
    assert (
        raw["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"] == "${RABBITMQ_PASSWORD:-leasehold}"
    )
    for name in APP_SERVICES:
        password = urlsplit(raw[name]["environment"]["LEASEHOLD_BROKER_URL"]).password
        assert password == "${RABBITMQ_PASSWORD:-leasehold}", name


def test_celeryconfig_takes_the_merged_environment(merged: dict[str, Any], tmp_path: Path) -> None:
    """A worker of the merged file loads an ``amqp://`` broker and a Redis result backend, with
    no embedded-broker folders (those are for ``filesystem://`` only)."""
    values = {k: v for k, v in environment(merged["services"]["worker-1"]).items() if v is not None}
    values.pop("LEASEHOLD_VAR_DIR", None)  # the container's path; ours is a scratch folder
    script = (
        "import json, celeryconfig as c; print(json.dumps({'broker_url': c.broker_url, "
        "'result_backend': c.result_backend, "
        "'transport': getattr(c, 'broker_transport_options', None)}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=support.environment(tmp_path, **values),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"celeryconfig refuses the merged environment:\n{done.stderr}"
    loaded = json.loads(done.stdout)
    assert loaded["broker_url"] == values["LEASEHOLD_BROKER_URL"]
    assert loaded["broker_url"].startswith("amqp://")
    assert loaded["result_backend"].startswith("redis://redis:6379/")
    assert loaded["transport"] is None


def test_docker_compose_config_accepts_both_files_together(merged: dict[str, Any]) -> None:
    """`docker compose -f ... -f ... config` where the compose plugin exists; elsewhere the
    in-process merge above, checked like the base file."""
    docker = _compose_plugin()
    if docker is None:
        assert compose_problems(merged, compose_schema()) == []
        return
    env = {k: v for k, v in os.environ.items() if k not in ("MYSQL_PASSWORD", "RABBITMQ_PASSWORD")}
    done = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "-f", str(OVERRIDE), "config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"docker compose config:\n{done.stderr}"
    real = json.loads(done.stdout)["services"]
    for name in APP_SERVICES:
        assert real[name]["environment"]["LEASEHOLD_BROKER_URL"].startswith("amqp://")
        assert real[name]["environment"]["LEASEHOLD_RESULT_BACKEND"].startswith("redis://")


def test_the_merge_is_compose_s() -> None:
    """The in-process merge follows compose's rules where this override relies on them."""
    base = {"services": {"a": {"environment": {"X": "1", "Y": "2"}, "ports": ["1:1"]}}}
    over = {"services": {"a": {"environment": {"Y": "3"}, "ports": ["2:2"], "command": ["c"]}}}
    assert merge(base, over) == {
        "services": {
            "a": {"environment": {"X": "1", "Y": "3"}, "ports": ["1:1", "2:2"], "command": ["c"]}
        }
    }
    assert merge({"command": ["a", "b"]}, {"command": ["c"]}) == {"command": ["c"]}
