"""The two layers: the method files import only what sits below them, and plumbing/ imports no top-level module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOOR = ("data", "tokenizer", "hub", "model")  # what every method file stands on
METHOD = ("ddt", "idft", "hinted_decode", "train", "eval")  # in reading order: each may use those before it
TOP_LEVEL = FLOOR + METHOD


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "plumbing").glob("*.py")), ids=lambda p: p.name)
def test_plumbing_imports_no_top_level_module(path):
    assert not imported_modules(path) & set(TOP_LEVEL)


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_no_module_imports_a_higher_one(name):
    higher = set(METHOD[METHOD.index(name) + 1:]) if name in METHOD else set(METHOD)
    assert not imported_modules(ROOT / f"{name}.py") & higher
