"""Engines by name, as submitted in an apply's ``engine`` field."""

from __future__ import annotations

from collections.abc import Mapping

from storage.errors import InvalidInput
from tasks.engines.base import (
    Engine,
    EngineCancelled,
    EngineContext,
    EngineError,
    TargetStatement,
    TargetUnavailable,
    TaskSpec,
)
from tasks.engines.mysql import MySQLEngine
from tasks.engines.sleep import SleepEngine

ENGINE_CLASSES: dict[str, type[Engine]] = {"sleep": SleepEngine, "mysql": MySQLEngine}


def engine_class(name: str) -> type[Engine]:
    try:
        return ENGINE_CLASSES[name]
    except KeyError:
        raise InvalidInput(
            f"unknown engine {name!r}; choose one of {sorted(ENGINE_CLASSES)}"
        ) from None


def make_engine(name: str, *, targets: Mapping[str, str]) -> Engine:
    if name == "mysql":
        return MySQLEngine(targets)
    return engine_class(name)()


__all__ = [
    "ENGINE_CLASSES",
    "Engine",
    "EngineCancelled",
    "EngineContext",
    "EngineError",
    "TargetStatement",
    "TargetUnavailable",
    "TaskSpec",
    "engine_class",
    "make_engine",
]
