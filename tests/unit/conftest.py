"""Unit tests use no server: no database, no broker (an in-process HTTP stand-in and
subprocesses of the interpreter are fine). A test here that asks for a store fails at once;
it belongs in ``tests/contract``."""

from __future__ import annotations

import pytest


def _no_server(request: pytest.FixtureRequest) -> None:
    pytest.fail(
        f"{request.node.nodeid} asks for {request.fixturename!r}: unit tests use no server "
        "(move it to tests/contract)",
        pytrace=False,
    )


@pytest.fixture
def db(request: pytest.FixtureRequest) -> None:
    _no_server(request)


@pytest.fixture
def backend_url(request: pytest.FixtureRequest) -> None:
    _no_server(request)


@pytest.fixture
def mysql_server(request: pytest.FixtureRequest) -> None:
    _no_server(request)
