"""The Docker suite (tests/docker), checked where no Docker engine runs (this machine, CI): it
collects, every test in it is marked ``docker`` and skips at once with a loud reason when no
engine answers (a failure when CI and LEASEHOLD_TEST_DOCKER are set); its fixtures are wired to
leasehold's image, Redis and MySQL (pytest's ``--setup-plan``, which runs no fixture); the
containers it would start are configured as docker-compose.yml configures them; and the image's
build context, as the docker SDK would send it, holds everything the Dockerfile copies and the
wheel is made of, and no local state."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from celery import Celery
from sqlalchemy.engine import make_url

from tests.docker import stack

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "tests" / "docker"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"

FAILOVER = (
    "tests/docker/test_failover.py::"
    "test_sigkill_a_worker_container_mid_apply_and_the_other_completes_it"
)
DUPLICATE = "tests/docker/test_duplicate_delivery.py::test_a_run_apply_delivered_twice_runs_once"
# Where no engine answers, wherever this runs: a socket that does not exist.
NO_ENGINE = "unix:///nonexistent/leasehold-no-docker.sock"
# What the skip may cost the main suite: one interpreter start, collection and a failed connect.
SKIP_BUDGET = 60.0


def _suite_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CI", "LEASEHOLD_TEST_DOCKER", "DOCKER_HOST", "DOCKER_CONTEXT")
    }
    env["DOCKER_HOST"] = NO_ENGINE
    env.update(extra)
    return env


def _pytest(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=_suite_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _test_functions() -> set[str]:
    """Every test function of the suite, read from the source (not from pytest)."""
    found = set()
    for module in sorted(SUITE.glob("test_*.py")):
        for node in ast.parse(module.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                found.add(f"{module.relative_to(ROOT).as_posix()}::{node.name}")
    return found


# --- collection, marker, fixture wiring: pytest's setup plan (no fixture runs) ----------------


@pytest.fixture(scope="module")
def setup_plan() -> str:
    done = _pytest("tests/docker", "-m", "docker", "--setup-plan", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _used_by(plan: str, name: str) -> set[str]:
    """The fixtures a test (its id) or a fixture (its name, first setup) uses in the plan."""
    pattern = rf"(?m)^\s*(?:SETUP\s+[SF]\s+)?{re.escape(name)} \(fixtures used: ([^)]*)\)"
    found = re.search(pattern, plan)
    assert found, f"{name} is not in the setup plan:\n{plan}"
    return {f.strip() for f in found.group(1).split(",")}


def test_every_docker_test_is_collected_and_marked_docker(setup_plan: str) -> None:
    assert _test_functions() == {FAILOVER, DUPLICATE}
    # -m docker: a test without the marker would be deselected, and missing from the plan.
    planned = set(re.findall(r"(?m)^\s+(tests/docker/\S+::\S+) \(fixtures used", setup_plan))
    assert planned == {FAILOVER, DUPLICATE}, setup_plan


def test_each_test_runs_on_pytest_celerys_setup_with_two_leasehold_workers_redis_and_mysql(
    setup_plan: str,
) -> None:
    stock = {
        "celery_base_worker_image",  # pytest-celery's own worker image, which is not leasehold's
        "default_worker_volume",  # its volume would hide /app of leasehold's image
        "celery_worker",  # the parametrized stock worker
        "celery_rabbitmq_broker",
        "default_rabbitmq_broker",
    }
    for test_id in (FAILOVER, DUPLICATE):
        used = _used_by(setup_plan, test_id)
        assert {
            "docker_engine",
            "celery_setup",
            "celery_worker_cluster",
            "celery_setup_worker",
            "default_worker_container",
            "second_worker",
            "second_worker_container",
            "leasehold_worker_image",
            "celery_broker_cluster",
            "celery_redis_broker",
            "default_redis_broker",
            "celery_backend_cluster",
            "celery_redis_backend",
            "default_redis_backend",
            "mysql_store_container",
            "leasehold_store",
            "store",
        } <= used, used
        assert not stock & used, stock & used
    assert "beat_container" in _used_by(setup_plan, FAILOVER)
    # Beat would reclaim the duplicate test's dispatch, which it sends late on purpose.
    assert "beat_container" not in _used_by(setup_plan, DUPLICATE)


def test_every_leasehold_container_runs_the_built_image_with_the_stores_environment(
    setup_plan: str,
) -> None:
    for name in ("default_worker_container", "second_worker_container", "beat_container"):
        used = _used_by(setup_plan, name)
        assert {"leasehold_worker_image", "default_worker_env"} <= used, (name, used)
        assert "default_pytest_celery_network" in used, (name, used)
    assert {"celery_worker_cluster_config", "leasehold_store"} <= _used_by(
        setup_plan, "default_worker_env"
    )
    migrated = _used_by(setup_plan, "leasehold_store")
    assert {"leasehold_worker_image", "mysql_store_container"} <= migrated
    assert "default_pytest_celery_network" in _used_by(setup_plan, "mysql_store_container")
    # Session-wide: the image is built and MySQL started and migrated once a run.
    for name in ("leasehold_worker_image", "mysql_store_container", "leasehold_store"):
        assert re.search(rf"(?m)^SETUP\s+S {name}\b", setup_plan), name
    # The engine check is set up before anything that talks to Docker.
    first = setup_plan.lstrip().splitlines()[0].split()
    assert first == ["SETUP", "S", "docker_engine"], first


# --- the skip where no engine answers ------------------------------------------------------------


def test_without_an_engine_every_docker_test_skips_loudly_and_at_once() -> None:
    started = time.monotonic()
    done = _pytest("tests/docker", "-m", "docker", "-q", "-rs")
    seconds = time.monotonic() - started
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    reasons = re.findall(r"(?m)^SKIPPED \[\d+\] (\S+): (.*)$", out)
    assert {where.split(":")[0] for where, _ in reasons} == {
        t.split("::")[0] for t in (FAILOVER, DUPLICATE)
    }, out
    for _, reason in reasons:
        assert reason.startswith("SKIPPED, NOT TESTED: no Docker engine answers (docker SDK"), out
    assert re.search(r"(?m)^2 skipped in ", out), out
    assert seconds < SKIP_BUDGET, f"the skip took {seconds:.1f}s"


def test_no_engine_skips_locally_and_in_plain_ci_and_fails_where_ci_asked_for_docker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.docker import conftest

    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    problem = conftest.engine_problem()
    assert problem is not None
    assert problem.startswith("docker SDK ping: ")
    monkeypatch.delenv("LEASEHOLD_TEST_DOCKER", raising=False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"^SKIPPED, NOT TESTED: why"):
        conftest.no_engine("why")
    # This project's CI has a docker client and no engine: CI alone must skip.
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.skip.Exception, match=r"^SKIPPED, NOT TESTED: why"):
        conftest.no_engine("why")
    monkeypatch.setenv("LEASEHOLD_TEST_DOCKER", "1")
    with pytest.raises(pytest.fail.Exception, match="CI and LEASEHOLD_TEST_DOCKER are set but why"):
        conftest.no_engine("why")


# --- what the containers are --------------------------------------------------------------------


def test_the_worker_image_is_built_from_the_repositorys_dockerfile() -> None:
    assert Path(stack.WORKER_IMAGE_BUILD["path"]) == ROOT
    assert DOCKERFILE.is_file()
    # No "dockerfile" key: the SDK builds ./Dockerfile, and excludes what .dockerignore says.
    assert set(stack.WORKER_IMAGE_BUILD) == {"path", "tag"}


def test_broker_backend_and_store_are_the_servers_docker_compose_runs() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["redis"]["image"] == stack.REDIS_IMAGE
    assert services["mysql"]["image"] == stack.MYSQL_IMAGE
    assert set(stack.MYSQL_ENV) == set(services["mysql"]["environment"])
    assert stack.MYSQL_ENV["MYSQL_DATABASE"] == stack.MYSQL_DATABASE
    assert stack.MYSQL_ENV["MYSQL_USER"] == stack.MYSQL_USER
    assert stack.MYSQL_PORT == "3306/tcp"


def _cluster_config() -> dict[str, Any]:
    """What pytest-celery's Redis broker and backend clusters report (``CeleryTestCluster.config``)
    for containers whose hostnames are their short ids."""
    return {
        "celery_broker_cluster_config": {
            "urls": ["redis://0123456789ab/0"],
            "host_urls": ["redis://localhost:49153/0"],
        },
        "celery_backend_cluster_config": {
            "urls": ["redis://ba9876543210/0"],
            "host_urls": ["redis://localhost:49154/0"],
        },
    }


def _fake_mysql() -> stack.MySQLContainer:
    raw = SimpleNamespace(
        attrs={
            "Config": {"Hostname": "fedcba987654"},
            "NetworkSettings": {
                "Ports": {"3306/tcp": [{"HostIp": "0.0.0.0", "HostPort": "49155"}]},
                "Networks": {"pytest-net": {"IPAddress": "172.18.0.4"}},
            },
        }
    )
    return stack.MySQLContainer(raw)


def test_the_store_urls_name_leaseholds_database_inside_and_outside_the_network() -> None:
    mysql = _fake_mysql()
    inside = make_url(mysql.url)
    assert (inside.drivername, inside.host, inside.port) == ("mysql+mysqldb", "fedcba987654", 3306)
    outside = make_url(mysql.host_url)
    assert (outside.host, outside.port) in {("127.0.0.1", 49155), ("172.18.0.4", 3306)}
    for url in (inside, outside):
        assert (url.username, url.password, url.database) == (
            stack.MYSQL_USER,
            stack.MYSQL_PASSWORD,
            stack.MYSQL_DATABASE,
        )


def _leasehold_settings(env: dict[str, str], var: Path) -> Any:
    """celeryconfig.py evaluated under a container's environment, as a client app."""
    from tests.e2e.helpers import client_app

    return client_app({**env, "LEASEHOLD_VAR_DIR": str(var)})


def test_the_workers_environment_configures_leasehold_on_pytest_celerys_redis(
    tmp_path: Path,
) -> None:
    mysql = _fake_mysql()
    env = stack.LeaseholdWorkerContainer.initial_env(
        _cluster_config(), {"LEASEHOLD_DATABASE_URL": mysql.url}
    )
    assert env["LEASEHOLD_BROKER_URL"] == "redis://0123456789ab/0"
    assert env["LEASEHOLD_RESULT_BACKEND"] == "redis://ba9876543210/0"
    assert env["LEASEHOLD_DATABASE_URL"] == mysql.url
    # leasehold reads LEASEHOLD_* only: none of pytest-celery's CELERY_* defaults leak in.
    assert all(key.startswith("LEASEHOLD_") for key in env), env
    app = _leasehold_settings(env, tmp_path)
    try:
        assert app.conf.broker_url == env["LEASEHOLD_BROKER_URL"]
        assert app.conf.result_backend == env["LEASEHOLD_RESULT_BACKEND"]
        assert app.conf.task_default_queue == stack.QUEUE
        # The test app routes run_apply where leasehold itself sends it.
        assert (
            app.conf.task_routes["leasehold.run_apply"]
            == stack.CLIENT_ROUTES["leasehold.run_apply"]
        )
        assert set(app.conf.task_queues) == {stack.QUEUE, stack.APPLY_QUEUE}
    finally:
        app.close()
    with pytest.raises(ValueError, match="LEASEHOLD_DATABASE_URL"):
        stack.LeaseholdWorkerContainer.initial_env(_cluster_config())


def test_the_test_app_is_another_app_routing_to_leaseholds_queues() -> None:
    app = Celery("docker-suite-check", set_as_current=False)
    try:
        stack.LeaseholdTestSetup.update_app_config(app)
        route = app.amqp.router.route
        assert route({}, "leasehold.run_apply")["queue"].name == stack.APPLY_QUEUE
        for name in ("leasehold.submit_apply", "leasehold.get_apply", "leasehold.control_apply"):
            assert route({}, name)["queue"].name == stack.QUEUE, name
        assert app.conf.accept_content == ["json"]
    finally:
        app.close()


def test_worker_and_beat_commands_parse_with_celerys_own_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import click
    from celery.bin.celery import celery

    a = stack.LeaseholdWorkerContainer.command()
    b = stack.SecondLeaseholdWorkerContainer.command()
    beat = stack.LeaseholdBeatContainer.command()
    assert a[:4] == b[:4] == ["celery", "-A", "tasks", "worker"]
    assert beat[:4] == ["celery", "-A", "tasks", "beat"]
    # Distinct node names: lease owners and logs tell the two workers apart.
    assert a != b
    assert "--hostname=leasehold-a@%h" in a
    assert "--hostname=leasehold-b@%h" in b
    # The queues come from LEASEHOLD_QUEUE/LEASEHOLD_APPLY_QUEUE, as in docker-compose.yml.
    assert not any(arg == "-Q" or arg.startswith("--queues") for arg in a + b)
    for command in (a, b, beat):
        try:
            celery.main(args=[*command[1:], "--help"], prog_name="celery", standalone_mode=False)
        except click.ClickException as exc:
            pytest.fail(f"`{' '.join(command)}` is refused: {exc.format_message()}")
        assert f"Usage: celery {command[3]}" in capsys.readouterr().out


def test_the_suite_allows_for_a_cold_build_and_a_first_mysql_start() -> None:
    suite_wide = tomllib.loads(PYPROJECT.read_text())["tool"]["pytest"]["ini_options"]["timeout"]
    assert suite_wide < stack.TEST_TIMEOUT
    assert stack.TEST_TIMEOUT > stack.MYSQL_START_TIMEOUT + 2 * stack.CONTAINER_START_TIMEOUT


# --- the image's build context ------------------------------------------------------------------


def _context() -> set[str]:
    """The paths the docker SDK (pytest-docker-tools' ``build``) puts in the build context:
    .dockerignore read as ``docker.api.build`` reads it, matched by the SDK's own matcher."""
    from docker.utils.build import exclude_paths

    ignore = ROOT / ".dockerignore"
    patterns = [
        line.strip()
        for line in (ignore.read_text().splitlines() if ignore.is_file() else [])
        if line.strip() and not line.strip().startswith("#")
    ]
    return set(exclude_paths(str(ROOT), patterns, dockerfile="Dockerfile"))


def _copies() -> list[tuple[str, list[str]]]:
    """(stage, sources) of every COPY from the build context (not ``--from``), in order."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stage, out = "", []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "FROM":
            stage = words[-1] if len(words) >= 4 and words[-2].upper() == "AS" else words[1]
        elif words[0].upper() == "COPY":
            args = [w for w in words[1:] if not w.startswith("--")]
            if any(w.startswith("--from") for w in words[1:]):
                continue
            out.append((stage, args[:-1]))
    return out


def _in_context(path: str, context: set[str]) -> bool:
    return path in context or any(p.startswith(path.rstrip("/") + "/") for p in context)


def test_every_path_the_dockerfile_copies_is_in_the_build_context() -> None:
    context = _context()
    copies = _copies()
    assert copies, "the Dockerfile copies nothing from its context"
    for _, sources in copies:
        for source in sources:
            source = source.removeprefix("./")
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
            assert _in_context(source, context), f"COPY {source}: excluded by .dockerignore"
            if (ROOT / source).is_dir():
                files = [p for p in context if p.startswith(source + "/") and (ROOT / p).is_file()]
                assert files, f"COPY {source}: nothing of it is in the build context"
    assert "Dockerfile" in context


def test_the_wheel_is_built_from_what_the_build_stage_copies() -> None:
    """Everything setuptools puts in the wheel (pyproject's readme, py-modules, packages and their
    package data) is in the context and copied into the stage that runs ``pip install``."""
    context = _context()
    project = tomllib.loads(PYPROJECT.read_text())
    setuptools = project["tool"]["setuptools"]
    copied = [
        s.removeprefix("./") for stage, sources in _copies() if stage == "build" for s in sources
    ]
    assert copied, "no COPY in the build stage"
    wanted = [project["project"]["readme"], "pyproject.toml"]
    wanted += [f"{module}.py" for module in setuptools["py-modules"]]
    packages = [p.rstrip("*").rstrip(".") for p in setuptools["packages"]["find"]["include"]]
    for package in packages:
        wanted += [
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / package).rglob("*.py")
            if "__pycache__" not in p.parts
        ]
    for package, patterns in setuptools.get("package-data", {}).items():
        for pattern in patterns:
            matches = [p.relative_to(ROOT).as_posix() for p in (ROOT / package).glob(pattern)]
            assert matches, f"package data {package}/{pattern} does not exist"
            wanted += matches
    for path in wanted:
        assert path in context, f"{path} (part of the wheel) is excluded by .dockerignore"
        assert any(path == s or path.startswith(s.rstrip("/") + "/") for s in copied), (
            f"{path} (part of the wheel) is not copied into the build stage"
        )
    assert "examples/apply.json" in context  # the runtime stage copies examples/


def test_the_build_context_holds_no_local_state() -> None:
    context = _context()
    for path in context:
        parts = path.split("/")
        assert parts[0] not in {".git", ".venv", "venv", "var", ".ci"}, path
        assert not {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"} & set(parts), path
        assert not re.search(r"\.sqlite3|\.py[cod]$|^\.env", path), path
    # Whatever git ignores here is local state too (the hypothesis database, build output ...).
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return
    files = sorted(p for p in context if (ROOT / p).is_file())
    ignored = subprocess.run(
        ["git", "check-ignore", "--stdin"],
        cwd=ROOT,
        input="\n".join(files),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ignored.returncode in (0, 1), ignored.stderr  # 1: nothing is ignored
    assert not ignored.stdout.split(), f"git-ignored files in the build context: {ignored.stdout}"
