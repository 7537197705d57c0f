"""What the Docker suite starts, as plain values and pytest-celery container classes: leasehold's
image built from the repository's Dockerfile, Redis as broker and result backend, MySQL as the
store. No fixture lives here, so the main suite imports this module and checks the wiring
(tests/unit/test_docker_suite.py) on machines with no Docker engine; conftest.py turns it into
fixtures.

Leasehold's workers are not pytest-celery's stock worker: the stock image mounts a volume over
``/app`` with a generated ``app`` module, and runs ``celery -A app``. Ours is the production
image, run as docker-compose.yml runs it (``celery -A tasks worker``, configured by LEASEHOLD_*
variables only), so that the image under test is the one that ships."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery import Celery
from pytest_celery import CeleryTestContainer, CeleryTestSetup, CeleryWorkerContainer
from pytest_docker_tools import wrappers

from tests.e2e.helpers import TIMING_ENV

REPO = Path(__file__).resolve().parents[2]

# The image every leasehold container runs: the repository's Dockerfile, built once a session.
WORKER_IMAGE_TAG = "leasehold:pytest-celery"
WORKER_IMAGE_BUILD: dict[str, Any] = {"path": str(REPO), "tag": WORKER_IMAGE_TAG}

# The servers docker-compose.yml runs.
REDIS_IMAGE = "redis:7"
MYSQL_IMAGE = "mysql:8.4"
MYSQL_PORT = "3306/tcp"
MYSQL_DATABASE = "leasehold"
MYSQL_USER = "leasehold"
# A throwaway container's password, never a real one; published on a random host port.
MYSQL_PASSWORD = "leasehold-docker-suite"
MYSQL_ENV = {
    "MYSQL_DATABASE": MYSQL_DATABASE,
    "MYSQL_USER": MYSQL_USER,
    "MYSQL_PASSWORD": MYSQL_PASSWORD,
    "MYSQL_RANDOM_ROOT_PASSWORD": "yes",
}

# Seconds. MySQL initialises its data directory on first start; a worker imports Celery and
# checks the store's revision before it says "ready.".
MYSQL_START_TIMEOUT = 240
CONTAINER_START_TIMEOUT = 120
# A test may build the image (compiling mysqlclient) and initialise MySQL in its setup, and
# pytest-timeout counts setup: the suite-wide 120 s would cut a cold first run short.
TEST_TIMEOUT = 1200

QUEUE = "leasehold"
APPLY_QUEUE = "leasehold.applies"
# What another app configures (README: "route them once in the caller's configuration"), plus
# the apply queue, where leasehold itself sends run_apply: the duplicate-delivery test sends
# run_apply as leasehold does.
CLIENT_ROUTES = {
    "leasehold.run_apply": {"queue": APPLY_QUEUE},
    "leasehold.*": {"queue": QUEUE},
}

# The settings every leasehold container gets besides the store, the broker and the backend:
# the e2e suite's short intervals (so failover takes seconds) and two apply slots per worker.
LEASEHOLD_ENV = {
    **TIMING_ENV,
    "LEASEHOLD_QUEUE": QUEUE,
    "LEASEHOLD_APPLY_QUEUE": APPLY_QUEUE,
    "LEASEHOLD_WORKER_CONCURRENCY": "2",
    "LEASEHOLD_CONTROL_CONCURRENCY": "2",
}


def leasehold_env(
    celery_worker_cluster_config: Mapping[str, Any], database_url: str
) -> dict[str, str]:
    """The environment of a leasehold container: pytest-celery's broker and backend (their URLs
    inside the Docker network) as LEASEHOLD_* variables, the only configuration leasehold
    reads."""
    env = {**LEASEHOLD_ENV, "LEASEHOLD_DATABASE_URL": database_url}
    broker = celery_worker_cluster_config.get("celery_broker_cluster_config")
    backend = celery_worker_cluster_config.get("celery_backend_cluster_config")
    if not broker or not backend:
        raise ValueError("leasehold needs a broker and a result backend")
    env["LEASEHOLD_BROKER_URL"] = ";".join(broker["urls"])
    env["LEASEHOLD_RESULT_BACKEND"] = ";".join(backend["urls"])
    return env


class LeaseholdWorkerContainer(CeleryWorkerContainer):  # type: ignore[misc]
    """A leasehold worker: the production image's ``celery -A tasks worker``."""

    @classmethod
    def command(
        cls,
        *args: str,
        debugpy: bool = False,
        wait_for_client: bool = True,
        **kwargs: dict[str, Any],
    ) -> list[str]:
        # No -Q: the worker's queues (control and applies) come from LEASEHOLD_* variables.
        return [
            "celery",
            "-A",
            "tasks",
            "worker",
            f"--loglevel={cls.log_level()}",
            f"--hostname={cls.worker_name()}@%h",
            *args,
        ]

    @classmethod
    def worker_name(cls) -> str:
        return "leasehold-a"

    @classmethod
    def worker_queue(cls) -> str:
        return QUEUE

    @classmethod
    def log_level(cls) -> str:
        # "ready." (the ready prompt) is logged at INFO.
        return "INFO"

    @classmethod
    def initial_env(
        cls, celery_worker_cluster_config: dict[str, Any], initial: dict[str, Any] | None = None
    ) -> dict[str, str]:
        database_url = (initial or {}).get("LEASEHOLD_DATABASE_URL")
        if not database_url:
            raise ValueError("a leasehold worker needs LEASEHOLD_DATABASE_URL")
        return {**leasehold_env(celery_worker_cluster_config, database_url), **(initial or {})}


class SecondLeaseholdWorkerContainer(LeaseholdWorkerContainer):
    """The other worker: its own Celery node name, so logs and lease owners tell them apart."""

    @classmethod
    def worker_name(cls) -> str:
        return "leasehold-b"


class LeaseholdBeatContainer(CeleryTestContainer):  # type: ignore[misc]
    """Celery beat from the same image: it sends the reclaim passes that rotate a dead
    worker's lease."""

    @classmethod
    def command(
        cls,
        *args: str,
        debugpy: bool = False,
        wait_for_client: bool = True,
        **kwargs: dict[str, Any],
    ) -> list[str]:
        return ["celery", "-A", "tasks", "beat", "--loglevel=INFO", *args]

    @property
    def ready_prompt(self) -> str:
        return "beat: Starting..."


class MySQLContainer(CeleryTestContainer):  # type: ignore[misc]
    """MySQL 8.4 as leasehold's store."""

    def ready(self) -> bool:
        # The image's entrypoint first runs a bootstrap server without networking, then restarts;
        # only an answer over TCP (as docker-compose.yml's health check asks) means it is up.
        if not wrappers.Container.ready(self):
            return False
        code, _ = self.exec_run(["mysqladmin", "ping", "--host=127.0.0.1", "--silent"])
        return bool(code == 0)

    @property
    def url(self) -> str:
        """The store's URL for the other containers (inside the Docker network)."""
        hostname = self.attrs["Config"]["Hostname"]
        return _mysql_url(hostname, 3306)

    @property
    def host_url(self) -> str:
        """The store's URL for the test process, which reads it with leasehold's storage API."""
        host, port = self.get_addr(MYSQL_PORT)
        return _mysql_url(host, int(port))


def _mysql_url(host: str, port: int) -> str:
    return f"mysql+mysqldb://{MYSQL_USER}:{MYSQL_PASSWORD}@{host}:{port}/{MYSQL_DATABASE}"


class LeaseholdTestSetup(CeleryTestSetup):  # type: ignore[misc]
    """pytest-celery's setup with the test's Celery app configured as another app would be:
    JSON only, leasehold's tasks routed to leasehold's queues. It imports nothing of
    leasehold's."""

    @classmethod
    def update_app_config(cls, app: Celery) -> None:
        app.conf.update(
            task_routes=CLIENT_ROUTES,
            task_serializer="json",
            accept_content=["json"],
            result_accept_content=["json"],
        )
