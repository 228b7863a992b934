"""One direction of imports (STYLE.md): the layering is checked, not hoped for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import plateflow

PACKAGE = Path(plateflow.__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


# (where, may import from plateflow only these prefixes)
RULES = [
    ("core", ("plateflow.core", "plateflow.errors")),
    ("pipeline", ("plateflow.pipeline", "plateflow.core.decoding", "plateflow.errors")),
    ("examples", ("plateflow.pipeline", "plateflow.errors")),
    (
        "runtime",
        ("plateflow.runtime", "plateflow.core", "plateflow.engines.base", "plateflow.errors"),
    ),
    (
        "engines",
        (
            "plateflow.engines",
            "plateflow.core",
            "plateflow.pipeline",
            "plateflow.jobs",
            "plateflow.errors",
        ),
    ),
]


@pytest.mark.parametrize(("folder", "allowed"), RULES, ids=[r[0] for r in RULES])
def test_imports_point_one_way(folder: str, allowed: tuple[str, ...]) -> None:
    for path in _modules(folder):
        for name in _imports(path):
            if name == "plateflow" or name.startswith("plateflow."):
                assert name.startswith(allowed), f"{path.relative_to(PACKAGE)} imports {name}"


def test_only_the_engines_import_zmq_or_dask() -> None:
    for path in PACKAGE.rglob("*.py"):
        if "engines" in path.parts:
            continue
        for name in _imports(path):
            assert not name.startswith(("zmq", "dask", "distributed")), path


def test_the_cli_uses_only_what_a_host_could_use() -> None:
    for name in _imports(PACKAGE / "cli.py"):
        if name.startswith("plateflow"):
            assert name in {
                "plateflow",
                "plateflow.batchfile",
                "plateflow.engines.local",
                "plateflow.engines.zmq.engine",
                "plateflow.engines.zmq.server",
                "plateflow.examples.platereader",
                "plateflow.statecharts",
            }
