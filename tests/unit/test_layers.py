"""The folders are layers: the core and the worker never import the API, and nothing that
runs in production imports the laptop tooling (service/dev)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("service/core", ("service.api", "service.dev", "worker", "fastapi", "starlette")),
        ("service/adapters", ("service.api", "service.dev", "worker", "fastapi")),
        ("worker", ("service.api", "service.dev", "fastapi")),
        ("service/api", ("service.dev", "worker")),
    ],
)
def test_layer_does_not_import_upwards(folder: str, forbidden: tuple[str, ...]) -> None:
    offending = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in _modules(folder)
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    }
    assert not offending, sorted(offending)
