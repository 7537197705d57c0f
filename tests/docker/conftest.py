"""pytest-celery's container fixtures, wired for leasehold (what they start: ``stack.py``).

- The Docker network: pytest-celery's ``default_pytest_celery_network``, made session-wide so
  that MySQL (session-wide, migrated once) and each test's Redis and worker containers meet on it.
- Broker and result backend: pytest-celery's Redis vendor only (``celery_broker_cluster``,
  ``celery_backend_cluster``), one fresh container each per test.
- Workers: ``default_worker_container`` (pytest-celery's name, so ``celery_setup_worker`` wraps
  it) and ``second_worker_container``, both from ``leasehold_worker_image``, built from the
  repository's Dockerfile; ``celery_worker_cluster`` holds the two. ``leasehold_beat`` is beat.
- The store: ``mysql_store_container`` (MySQL 8.4), migrated by a one-shot ``leasehold migrate``
  container; the test process reads it with leasehold's storage API (``store``).

Where no Docker engine answers, every test here is skipped with a loud reason, before any
fixture touches Docker.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from celery import Celery
from pytest_celery import (
    CeleryBackendCluster,
    CeleryBrokerCluster,
    CeleryTestSetup,
    CeleryTestWorker,
    CeleryWorkerCluster,
    CeleryWorkerContainer,
    RedisTestBackend,
    RedisTestBroker,
)
from pytest_docker_tools import build, container, network

from storage import open_database
from storage.database import Database
from tests.docker.stack import (
    CONTAINER_START_TIMEOUT,
    MYSQL_ENV,
    MYSQL_IMAGE,
    MYSQL_PORT,
    MYSQL_START_TIMEOUT,
    REDIS_IMAGE,
    WORKER_IMAGE_BUILD,
    LeaseholdBeatContainer,
    LeaseholdTestSetup,
    LeaseholdWorkerContainer,
    MySQLContainer,
    SecondLeaseholdWorkerContainer,
)
from tests.e2e.helpers import close_client

# Seconds to wait for the engine's answer: a DOCKER_HOST that does not answer must not hold the
# main suite, which collects and skips these tests.
ENGINE_PING_TIMEOUT = 5


def no_engine(reason: str) -> None:
    """Skip loudly; fail instead where a run asked for this suite in CI.

    CI alone does not fail here, unlike the MariaDB/Redis tests (tests/conftest.py
    ``unavailable``): this project's CI machines have a docker client and no engine, and
    ``make test`` collects this folder, so plain CI must skip. A CI job that provides an engine
    sets LEASEHOLD_TEST_DOCKER, and then a missing engine is a failure, never a silent skip."""
    if os.environ.get("CI") and os.environ.get("LEASEHOLD_TEST_DOCKER"):
        pytest.fail(f"CI and LEASEHOLD_TEST_DOCKER are set but {reason}", pytrace=False)
    pytest.skip(f"SKIPPED, NOT TESTED: {reason}")


def engine_problem() -> str | None:
    """Why no Docker engine answers the docker SDK (as pytest-docker-tools' client is made: from
    the environment), or None when one does."""
    with warnings.catch_warnings():
        # docker 7.x leaves the socket of a refused connection open (transport/unixconn.py); its
        # ResourceWarning, raised when the socket is collected, would be an error at the end of
        # the session under filterwarnings = error. Collect it here, where it is ignored.
        warnings.simplefilter("ignore", ResourceWarning)
        problem: str | None = None
        try:
            client = docker.from_env(timeout=ENGINE_PING_TIMEOUT)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:
            problem = f"docker SDK ping: {exc}"
        gc.collect()
    return problem


@pytest.fixture(scope="session", autouse=True)
def docker_engine() -> None:
    """Session-wide and autouse, so it runs before any Docker fixture; its skip is cached, so
    every later test here skips at once."""
    problem = engine_problem()
    if problem is not None:
        no_engine(f"no Docker engine answers ({problem})")


# --- network, image, store -----------------------------------------------------------------------

default_pytest_celery_network = network(scope="session")

leasehold_worker_image = build(**WORKER_IMAGE_BUILD)

mysql_store_container = container(
    scope="session",
    image=MYSQL_IMAGE,
    environment=MYSQL_ENV,
    ports={MYSQL_PORT: None},
    network="{default_pytest_celery_network.name}",
    wrapper_class=MySQLContainer,
    timeout=MYSQL_START_TIMEOUT,
)


@pytest.fixture(scope="session")
def leasehold_store(
    docker_client: Any,
    leasehold_worker_image: Any,
    mysql_store_container: MySQLContainer,
    default_pytest_celery_network: Any,
) -> str:
    """The store, migrated by the image's own ``leasehold migrate`` (as docker-compose.yml's
    one-shot service does: workers refuse an unmigrated store); its URL inside the network."""
    url = mysql_store_container.url
    docker_client.containers.run(
        leasehold_worker_image.id,
        ["leasehold", "migrate"],
        environment={"LEASEHOLD_DATABASE_URL": url},
        network=default_pytest_celery_network.name,
        remove=True,
    )
    return url


@pytest.fixture
def store(mysql_store_container: MySQLContainer, leasehold_store: str) -> Iterator[Database]:
    """The store, opened from the test process through the published port."""
    db = open_database(mysql_store_container.host_url)
    yield db
    db.dispose()


# --- broker and backend: Redis only (pytest-celery would add RabbitMQ where kombu has it) -------


@pytest.fixture
def default_redis_broker_image() -> str:
    return REDIS_IMAGE


@pytest.fixture
def default_redis_backend_image() -> str:
    return REDIS_IMAGE


@pytest.fixture
def celery_broker_cluster(celery_redis_broker: RedisTestBroker) -> Iterator[CeleryBrokerCluster]:
    cluster = CeleryBrokerCluster(celery_redis_broker)
    yield cluster
    cluster.teardown()


@pytest.fixture
def celery_backend_cluster(
    celery_redis_backend: RedisTestBackend,
) -> Iterator[CeleryBackendCluster]:
    cluster = CeleryBackendCluster(celery_redis_backend)
    yield cluster
    cluster.teardown()


# --- workers and beat ----------------------------------------------------------------------------


@pytest.fixture
def default_worker_container_cls() -> type[CeleryWorkerContainer]:
    return LeaseholdWorkerContainer


@pytest.fixture(scope="session")
def default_worker_container_session_cls() -> type[CeleryWorkerContainer]:
    return LeaseholdWorkerContainer


@pytest.fixture
def default_worker_env(
    default_worker_container_cls: type[CeleryWorkerContainer],
    celery_worker_cluster_config: dict[str, Any],
    leasehold_store: str,
) -> dict[str, str]:
    env: dict[str, str] = default_worker_container_cls.initial_env(
        celery_worker_cluster_config, {"LEASEHOLD_DATABASE_URL": leasehold_store}
    )
    return env


def leasehold_container_env(default_worker_env: dict[str, str]) -> dict[str, str]:
    """The environment of every leasehold container. A function, not ``fxtr``: pytest-docker-tools
    finds a function's fixtures when it collects (``fxtr`` references are only fetched while a
    test sets up), so ``--setup-plan`` shows the whole wiring and tests/unit checks it."""
    return default_worker_env


default_worker_container = container(
    image="{leasehold_worker_image.id}",
    environment=leasehold_container_env,
    network="{default_pytest_celery_network.name}",
    wrapper_class=LeaseholdWorkerContainer,
    timeout=CONTAINER_START_TIMEOUT,
    command=LeaseholdWorkerContainer.command(),
)

second_worker_container = container(
    image="{leasehold_worker_image.id}",
    environment=leasehold_container_env,
    network="{default_pytest_celery_network.name}",
    wrapper_class=SecondLeaseholdWorkerContainer,
    timeout=CONTAINER_START_TIMEOUT,
    command=SecondLeaseholdWorkerContainer.command(),
)

beat_container = container(
    image="{leasehold_worker_image.id}",
    environment=leasehold_container_env,
    network="{default_pytest_celery_network.name}",
    wrapper_class=LeaseholdBeatContainer,
    timeout=CONTAINER_START_TIMEOUT,
    command=LeaseholdBeatContainer.command(),
)


@pytest.fixture
def second_worker(
    second_worker_container: SecondLeaseholdWorkerContainer, default_worker_app: Any
) -> Iterator[CeleryTestWorker]:
    worker = CeleryTestWorker(container=second_worker_container, app=default_worker_app)
    yield worker
    worker.teardown()


@pytest.fixture
def celery_worker_cluster(
    celery_setup_worker: CeleryTestWorker, second_worker: CeleryTestWorker
) -> Iterator[CeleryWorkerCluster]:
    cluster = CeleryWorkerCluster(celery_setup_worker, second_worker)
    yield cluster
    cluster.teardown()


@pytest.fixture
def leasehold_beat(beat_container: LeaseholdBeatContainer) -> LeaseholdBeatContainer:
    """Beat, for the tests that need reclaim passes (a duplicate-delivery test must not have
    one: a reclaim of its unsent dispatch would change what it observes)."""
    return beat_container


@pytest.fixture
def celery_setup_cls() -> type[CeleryTestSetup]:
    return LeaseholdTestSetup


@pytest.fixture
def celery_setup_app(
    celery_setup_cls: type[CeleryTestSetup],
    celery_setup_config: dict[str, Any],
    celery_setup_name: str,
) -> Iterator[Celery]:
    """pytest-celery's app, closed after the test (its Redis result backend keeps connections
    of its own, whose unclosed sockets are errors under filterwarnings = error)."""
    app: Celery = celery_setup_cls.create_setup_app(
        celery_setup_config=celery_setup_config, celery_setup_app_name=celery_setup_name
    )
    yield app
    close_client(app)
