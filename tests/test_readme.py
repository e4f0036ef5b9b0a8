"""The README's reading guide points at code that exists, and its generated blocks are well formed."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_reading_guide_names_existing_functions():
    section = README.split("## Reading the code next to the paper", 1)[1].split("\n## ", 1)[0]
    refs = re.findall(r"`([\w/]+\.py):(\w+)`", section)
    assert len(refs) >= 40, "the guide should map every step of SPEC §2-§4"
    missing = [f"{file}:{name}" for file, name in refs
               if not (ROOT / file).is_file() or name not in top_level_names(ROOT / file)]
    assert not missing, f"README names functions that do not exist: {missing}"


def test_generated_blocks_are_present_once():
    for name in ("bench:goals", "reproduce:results"):
        assert README.count(f"<!-- {name}:begin -->") == 1 and README.count(f"<!-- {name}:end -->") == 1, name
