"""docker-compose.yml and the Dockerfile against the code. No Docker engine runs here, so what
can be checked without one is checked by reading the files. Every command runs something that
exists (the ``celery -A tasks`` subcommands and their options, parsed by Celery's own command line;
``leasehold migrate``, parsed by the console script's parser); every LEASEHOLD_* variable set is
one the code reads, and the whole environment configures ``celeryconfig`` as intended; MySQL and
Redis have health checks; Flower is published on 127.0.0.1 only; ``docker compose config`` accepts
the file where the compose plugin exists, and where it does not (this machine, CI) the same checks
run in-process against the Compose Specification's schema (shipped by check-jsonschema)."""

from __future__ import annotations

import copy
import importlib
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks import cli
from tests import support
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"
# Where the code reads its configuration from the environment.
CONFIG_SOURCES = [ROOT / "celeryconfig.py", ROOT / "storage", ROOT / "leases", ROOT / "tasks"]

APP_SERVICES = ("migrate", "worker-1", "worker-2", "beat", "flower")
LONG_RUNNING = ("worker-1", "worker-2", "beat", "flower")
CELERY_SUBCOMMANDS = {
    "worker-1": "worker",
    "worker-2": "worker",
    "beat": "beat",
    "flower": "flower",
}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` with the defaults (the file must work with none set)."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment as compose passes it (None: taken from the user's shell)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in raw)
        raw = dict(pairs)
    return {
        str(k): None
        if v is None
        else interpolate(str(v).lower() if isinstance(v, bool) else str(v))
        for k, v in raw.items()
    }


def names_read_by_the_code() -> set[str]:
    """LEASEHOLD_* names appearing as string literals in the configuration-reading sources."""
    names: set[str] = set()
    for source in CONFIG_SOURCES:
        for path in [source] if source.is_file() else sorted(source.rglob("*.py")):
            names.update(re.findall(r"[\"'](LEASEHOLD_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def test_compose_file_parses_with_the_expected_services(services: dict[str, Any]) -> None:
    assert set(services) == {"mysql", "redis", *APP_SERVICES}
    assert services["mysql"]["image"].startswith("mysql:8.4")
    assert services["redis"]["image"].startswith("redis:7")


def test_app_services_are_built_from_the_dockerfile(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        build = services[name].get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        assert context == ".", f"{name} is not built from this folder's Dockerfile"
    assert DOCKERFILE.is_file()


def test_celery_commands_parse_with_celerys_own_command_line(
    services: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import click
    from celery.bin.celery import celery

    for name, sub in CELERY_SUBCOMMANDS.items():
        command = services[name]["command"]
        assert isinstance(command, list), f"{name}: use the exec form (a list), not a shell string"
        assert command[:4] == ["celery", "-A", "tasks", sub], f"{name}: {command}"
        if sub == "flower":
            continue  # Flower takes Tornado options that Click does not parse: checked below
        # --help after the options: Click rejects an unknown option or a bad value before
        # it shows the help, and loads the app named by -A (tasks.app) on the way.
        try:
            celery.main(args=[*command[1:], "--help"], prog_name="celery", standalone_mode=False)
        except click.ClickException as exc:
            pytest.fail(f"{name}: `{' '.join(command)}` is refused: {exc.format_message()}")
        assert f"Usage: celery {sub}" in capsys.readouterr().out


def test_flower_command_and_its_options_exist(services: dict[str, Any]) -> None:
    command = services["flower"]["command"]
    options = [arg.removeprefix("--").split("=", 1)[0] for arg in command[4:]]
    assert options == ["address", "port"]
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("flower") for dep in extras["flower"])
    assert ".[mysql,flower]" in DOCKERFILE.read_text(), "the image must install Flower"
    try:
        flower_options = importlib.import_module("flower.options").options
    except ImportError:
        return  # the dev environment need not have Flower; the image does (checked above)
    for option in options:
        assert option in flower_options, f"Flower has no --{option} option"


def test_migrate_runs_the_leasehold_console_script(services: dict[str, Any]) -> None:
    command = services["migrate"]["command"]
    assert command == ["leasehold", "migrate"]
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert scripts["leasehold"] == "tasks.cli:main"
    parsed = cli._parser().parse_args(command[1:])
    assert parsed.func is cli._migrate
    assert services["migrate"].get("restart") == "no", "migrate is one-shot"


def test_every_leasehold_variable_is_one_the_code_reads(services: dict[str, Any]) -> None:
    read = names_read_by_the_code()
    assert {"LEASEHOLD_DATABASE_URL", "LEASEHOLD_BROKER_URL", "LEASEHOLD_STALE_AFTER"} <= read
    used = set(re.findall(r"LEASEHOLD_[A-Z0-9_]+", COMPOSE.read_text()))
    used |= set(re.findall(r"LEASEHOLD_[A-Z0-9_]+", DOCKERFILE.read_text()))
    for name in APP_SERVICES:
        used |= {k for k in environment(services[name]) if k.startswith("LEASEHOLD_")}
    assert used, "the compose file configures nothing"
    assert used <= read, f"set but read nowhere: {sorted(used - read)}"


def test_essential_settings_for_every_app_service(services: dict[str, Any]) -> None:
    first = environment(services[APP_SERVICES[0]])
    for name in APP_SERVICES:
        env = environment(services[name])
        assert env == first, f"{name} is configured differently from {APP_SERVICES[0]}"
        assert (env.get("LEASEHOLD_DATABASE_URL") or "").startswith("mysql+mysqldb://")
        assert "@mysql:3306/" in (env.get("LEASEHOLD_DATABASE_URL") or "")
        assert (env.get("LEASEHOLD_BROKER_URL") or "").startswith("redis://redis:6379/")
        assert (env.get("LEASEHOLD_RESULT_BACKEND") or "").startswith("redis://redis:6379/")


@pytest.fixture(scope="module")
def celery_settings(services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """celeryconfig as a worker of the compose file loads it: a fresh interpreter with exactly
    the compose environment (the import also validates the intervals against each other)."""
    compose = {k: v for k, v in environment(services["worker-1"]).items() if v is not None}
    compose.pop("LEASEHOLD_VAR_DIR", None)  # the container's path; ours is a scratch folder
    env = support.environment(tmp_path_factory.mktemp("compose"), **compose)
    script = (
        "import json, celeryconfig as c; print(json.dumps({k: getattr(c, k) for k in dir(c) "
        "if k.startswith('leasehold_') or k in ('broker_url', 'result_backend')}, default=str))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path_factory.mktemp("cwd"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"celeryconfig refuses the compose environment:\n{done.stderr}"
    return json.loads(done.stdout)


def test_celeryconfig_takes_every_setting_from_the_compose_environment(
    services: dict[str, Any], celery_settings: dict[str, Any]
) -> None:
    env = environment(services["worker-1"])
    assert celery_settings["broker_url"] == env["LEASEHOLD_BROKER_URL"]
    assert celery_settings["result_backend"] == env["LEASEHOLD_RESULT_BACKEND"]
    checked = {"LEASEHOLD_BROKER_URL", "LEASEHOLD_RESULT_BACKEND", "LEASEHOLD_VAR_DIR"}
    for name, value in env.items():
        if name in checked or value is None:
            continue
        attribute = name.lower()
        assert attribute in celery_settings, f"celeryconfig has no setting for {name}"
        loaded = celery_settings[attribute]
        if isinstance(loaded, int | float):
            assert float(loaded) == float(value), f"{name}={value} loaded as {loaded}"
        else:
            assert loaded == value, f"{name}={value} loaded as {loaded}"


def test_secrets_are_not_written_in_the_files(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        env = environment(services[name])
        for key in [k for k in env if "TOKEN" in k or "PRIVATE_KEY" in k]:
            assert env[key] is None, f"{key} must come from the user's shell, not the file"
    assert not re.search(r"(?im)^\s*(ARG|ENV)\s+\S*(PASSWORD|TOKEN|SECRET)", DOCKERFILE.read_text())


def _host_ips(ports: list[Any]) -> Iterator[str]:
    for port in ports:
        if isinstance(port, dict):
            yield str(port.get("host_ip", "0.0.0.0"))
            continue
        parts = str(port).split(":")
        yield parts[0] if len(parts) == 3 else "0.0.0.0"


def test_flower_is_published_on_loopback_only(services: dict[str, Any]) -> None:
    ports = services["flower"].get("ports") or []
    assert ports, "Flower is not published"
    assert set(_host_ips(ports)) == {"127.0.0.1"}
    assert any(str(p).endswith(":5555") for p in ports)
    for name, service in services.items():
        assert set(_host_ips(service.get("ports") or [])) <= {"127.0.0.1"}, f"{name} is exposed"


def test_mysql_and_redis_have_health_checks(services: dict[str, Any]) -> None:
    for name in ("mysql", "redis"):
        check = services[name].get("healthcheck") or {}
        test = check.get("test")
        assert test, f"{name} has no health check"
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: {test}"
    assert "mysqladmin" in services["mysql"]["healthcheck"]["test"]
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]


def test_start_order_waits_for_health_and_for_the_migration(services: dict[str, Any]) -> None:
    assert services["migrate"]["depends_on"]["mysql"]["condition"] == "service_healthy"
    for name in LONG_RUNNING:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name


def test_workers_get_time_for_a_warm_shutdown(services: dict[str, Any]) -> None:
    for name in ("worker-1", "worker-2"):
        assert services[name].get("stop_signal", "SIGTERM") == "SIGTERM"
        assert services[name].get("stop_grace_period"), f"{name}: default 10 s is short"
    hostnames = {services[n]["command"][-1] for n in ("worker-1", "worker-2")}
    assert len(hostnames) == 2, "the two workers need distinct --hostname values"


def test_dockerfile_builds_the_project_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"(?m)^FROM python:3\.11-slim\b", text)
    for package in ("default-libmysqlclient-dev", "pkg-config", "build-essential"):
        assert package in text
    users = re.findall(r"(?m)^USER\s+(\S+)", text)
    assert users, "the image must name a USER"
    assert users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    setuptools = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    wanted = [
        *setuptools["py-modules"],
        *(p.rstrip("*") for p in setuptools["packages"]["find"]["include"]),
    ]
    for item in wanted:
        assert re.search(rf"(?m)^COPY .*\b{re.escape(item)}\b", text), f"{item} is not copied"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var"} <= set(ignored)


def _compose_plugin() -> str | None:
    """The docker client, if its compose plugin answers; None where it does not (this machine's
    and CI's docker client has no compose plugin)."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    version = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False
    )
    return docker if version.returncode == 0 else None


# --- the compose file checked as `docker compose config` checks it, without the plugin ---------

# Compose's interpolation: $$ (a literal $), $NAME, ${NAME}, ${NAME-x}, ${NAME:-x}, ${NAME?x},
# ${NAME:?x}, ${NAME+x}, ${NAME:+x}. Any other $ is an "invalid interpolation format" to compose.
_DOLLAR = re.compile(
    r"\$\$|\$[A-Za-z_][A-Za-z0-9_]*|\$\{[A-Za-z_][A-Za-z0-9_]*(?:(?::?[-?+])[^}]*)?\}|\$"
)


def interpolation_problems(value: Any) -> list[str]:
    """Every string of the (parsed, not yet interpolated) document whose ``$`` compose would
    refuse; comments are not interpolated, so they are not looked at."""
    if isinstance(value, str):
        bad = [m.start() for m in _DOLLAR.finditer(value) if m.group() == "$"]
        return [f"invalid interpolation format: {value!r}"] if bad else []
    if isinstance(value, list):
        return [p for v in value for p in interpolation_problems(v)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in interpolation_problems(v)]
    return []


def interpolated(value: Any) -> Any:
    """The document as compose sees it with no variable set: every string interpolated."""
    if isinstance(value, str):
        return interpolate(value.replace("$$", "\x00")).replace("\x00", "$")
    if isinstance(value, list):
        return [interpolated(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolated(v) for k, v in value.items()}
    return value


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, as check-jsonschema vendors it (the schema
    `docker compose config` validates against); ``unavailable`` where it is not installed."""
    try:
        vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
        schema = json.loads((vendor / "compose-spec.json").read_text())
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        unavailable(
            "the docker client has no compose plugin and check-jsonschema (which ships the "
            "Compose Specification's schema) is not installed, so docker-compose.yml cannot be "
            f"validated; install check-jsonschema (the dev extra should hold it): {exc}"
        )
    assert isinstance(schema, dict)
    return schema


def _named_volume(volume: Any) -> str | None:
    if isinstance(volume, dict):
        return str(volume["source"]) if volume.get("type", "volume") == "volume" else None
    source = str(volume).split(":", 1)[0] if ":" in str(volume) else None
    if source is None or source.startswith(("/", ".", "~", "$")):
        return None  # an anonymous volume or a bind mount
    return source


def compose_problems(document: Any, schema: dict[str, Any]) -> list[str]:
    """What `docker compose config` refuses, short of building anything: the Compose
    Specification's schema (after interpolation), and references to services, volumes and
    networks that the file does not declare."""
    # Installed with check-jsonschema, which ships no type hints for it.
    jsonschema: Any = importlib.import_module("jsonschema")
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    ]
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        return [*problems, "no services"]
    services = document["services"]
    declared = {kind: set(document.get(kind) or {}) for kind in ("volumes", "networks")}
    for name, service in services.items():
        if not isinstance(service, dict):
            continue
        depends = service.get("depends_on") or []
        for other in depends if isinstance(depends, list) else list(depends):
            if other not in services:
                problems.append(f"services/{name}/depends_on: undefined service {other!r}")
        for volume in service.get("volumes") or []:
            named = _named_volume(volume)
            if named is not None and named not in declared["volumes"]:
                problems.append(f"services/{name}/volumes: undefined volume {named!r}")
        for network in service.get("networks") or []:
            if network != "default" and network not in declared["networks"]:
                problems.append(f"services/{name}/networks: undefined network {network!r}")
    return problems


def test_docker_compose_config_accepts_the_file() -> None:
    """`docker compose config` where the compose plugin exists; elsewhere (here and in CI: the
    docker client has no compose plugin) the same checks done in-process: interpolation syntax,
    the Compose Specification's schema, and references between services, volumes, networks."""
    docker = _compose_plugin()
    if docker is None:
        raw = yaml.safe_load(COMPOSE.read_text())
        assert interpolation_problems(raw) == []
        assert compose_problems(interpolated(raw), compose_schema()) == []
        return
    env = {k: v for k, v in os.environ.items() if k != "MYSQL_PASSWORD"}
    done = subprocess.run(
        [docker, "compose", "--file", str(COMPOSE), "config", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"docker compose config:\n{done.stderr}"


def _broken(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document: dict[str, Any] = copy.deepcopy(interpolated(yaml.safe_load(COMPOSE.read_text())))
    change(document)
    return document


BREAKAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "misspelt key": lambda d: d["services"]["beat"].update(comand=["celery"]),
    "unknown depends_on condition": lambda d: d["services"]["migrate"]["depends_on"][
        "mysql"
    ].update(condition="service_ready"),
    "command of the wrong type": lambda d: d["services"]["beat"].update(command={"run": 1}),
    "port that is no port": lambda d: d["services"]["flower"].update(ports=[["5555"]]),
    "restart as a bool": lambda d: d["services"]["migrate"].update(restart=False),
    "undefined service": lambda d: d["services"]["beat"]["depends_on"].update(
        cache={"condition": "service_started"}
    ),
    "undefined volume": lambda d: d["services"]["redis"].update(volumes=["cache:/data"]),
    "unknown top-level key": lambda d: d.update(service={}),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_the_in_process_check_refuses_what_compose_refuses(breakage: str) -> None:
    """The fallback is a real check: each of these breakages, which `docker compose config`
    refuses, is refused by it too."""
    assert compose_problems(_broken(BREAKAGES[breakage]), compose_schema()) != []


def test_the_in_process_check_refuses_a_bad_interpolation() -> None:
    assert interpolation_problems({"a": ["${OK:-1} $$ $OK ${OK} ${OK?why}"]}) == []
    for bad in ("${NOT OK}", "cost: 5$", "${}", "$ {OK}"):
        assert interpolation_problems({"a": [bad]}) != [], bad
