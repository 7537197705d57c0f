"""The runner meets its effects only through ``tasks.effects``: neither it nor anything it imports
from leasehold reaches the GitHub client (or githubkit). Read from the source with ``ast``, since
importing ``tasks`` loads the whole Celery app, GitHub included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("storage", "leases", "tasks")


def _source(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(module: str) -> set[str]:
    """The modules ``module`` names in its imports (``from p import m`` names ``p.m`` when that is
    a module), resolving relative imports."""
    path = _source(module)
    assert path is not None, module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] not in FIRST_PARTY or _source(n) is not None}


def _reached(start: str) -> set[str]:
    """Every module ``start`` imports, directly or through leasehold's own modules. Parent
    packages' ``__init__`` are not followed (``tasks/__init__`` is the Celery app)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(n for n in _imports(module) if n.split(".")[0] in FIRST_PARTY)
    return seen


def test_the_runner_names_nothing_of_github() -> None:
    direct = _imports("tasks.runner")
    assert "tasks.effects" in direct  # the one protocol it meets its effects at
    assert not [n for n in direct if n.startswith(("tasks.github", "githubkit"))]


def test_nothing_the_runner_imports_reaches_the_github_client() -> None:
    reached = _reached("tasks.runner")
    assert {"tasks.effects", "tasks.backoff", "tasks.interrupts", "storage.fenced"} <= reached
    assert "tasks.github.client" not in reached
    assert not [n for n in reached if n.startswith(("tasks.github", "githubkit", "httpx"))]


def test_the_publisher_is_the_clients_boundary() -> None:
    """The check above can see a client import: the publisher's own is found."""
    assert "tasks.github.client" in _imports("tasks.github.publisher")
