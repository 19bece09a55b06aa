"""The walls between modules (see ../shared/design.md), checked by parsing imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path)}


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("batching.py", {"torch", "fastapi", "starlette", "prometheus_client"}),
        ("admission.py", {"torch", "fastapi", "starlette", "prometheus_client"}),
        ("observers.py", {"torch", "fastapi", "starlette", "prometheus_client"}),
        ("imaging.py", {"fastapi", "starlette", "asyncio"}),
        ("postprocessing.py", {"fastapi", "starlette", "asyncio"}),
        ("errors.py", {"fastapi", "starlette", "torch"}),
        ("metrics.py", {"fastapi", "starlette"}),
    ],
)
def test_core_modules_stay_free_of_the_edge(module, forbidden):
    assert not roots(SERVICE / module) & forbidden


def test_models_package_never_imports_http():
    for path in (SERVICE / "models").glob("*.py"):
        assert not roots(path) & {"fastapi", "starlette", "uvicorn"}, path.name
        assert not any(name.startswith("service.api") for name in imported_modules(path)), path.name


def test_only_the_api_package_and_the_server_runtime_know_http():
    for path in SERVICE.glob("*.py"):
        if path.name in {"cli.py", "server.py", "__main__.py"}:
            continue
        assert not roots(path) & {"fastapi", "starlette", "uvicorn"}, path.name


def test_the_engine_knows_no_http_and_the_edge_holds_no_engine_internals():
    for path in (SERVICE / "engine").glob("*.py"):
        assert not roots(path) & {"fastapi", "starlette", "uvicorn"}, path.name
        assert not any(name.startswith("service.api") for name in imported_modules(path)), path.name
    for path in (SERVICE / "api").glob("*.py"):
        # The edge reaches the batcher, admission and runner only through the engine's pipelines.
        internals = {"service.batching", "service.admission", "service.imaging"}
        assert not imported_modules(path) & internals, path.name


def test_no_module_is_much_over_300_lines():
    for path in SERVICE.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 330, path
