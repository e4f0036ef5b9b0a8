"""The documents point at code and files that exist, the README stays short, committed results are portable."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
GUIDES = ("README.md", "docs/math.md", "docs/departures.md")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".txt", ".ini", ".toml", ".cfg", ".json", ".jinja", ""}


def repository_files() -> list[Path]:
    """Every file of the repository as a clean clone has it (committed, or new and not ignored)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("guide", GUIDES)
def test_every_file_function_named_exists(guide):
    refs = re.findall(r"`([\w/]+\.py):(\w+)`", (ROOT / guide).read_text(encoding="utf-8"))
    assert len(refs) >= 20, f"{guide} should map the method to its functions"
    missing = [f"{file}:{name}" for file, name in refs
               if not (ROOT / file).is_file() or name not in top_level_names(ROOT / file)]
    assert not missing, f"{guide} names functions that do not exist: {missing}"


def test_readme_is_short_and_starts_with_the_two_commands():
    assert len(README.encode("utf-8")) <= 15_000
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].startswith("bash scripts/setup.sh") and "train.py" in first_block[0]
    assert first_block[1] == ".venv/bin/python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert first_block[1] in ci  # CI runs the README's test command


def test_generated_blocks_are_present_once():
    for name in ("bench:goals", "reproduce:headline"):
        assert README.count(f"<!-- {name}:begin -->") == 1 and README.count(f"<!-- {name}:end -->") == 1, name


def test_no_file_cites_a_file_that_is_not_in_the_repository():
    """Paths into the repository's folders, Markdown links, and citations of a spec kept outside it."""
    present = {p.relative_to(ROOT).as_posix() for p in repository_files()}
    folders = {parent.as_posix() for p in present for parent in Path(p).parents}
    cited = re.compile(r"(?<![\w/.<-])((?:docs|scripts|bench|tests|plumbing|results)/[\w./-]*\w)")
    link = re.compile(r"\]\(([^)#\s]+)\)")
    problems = []
    for path in repository_files():
        if path.suffix not in TEXT_SUFFIXES or path.relative_to(ROOT).parts[0] in ("results",):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        where = path.relative_to(ROOT).as_posix()
        if re.search(r"\bS" r"PEC\b", text):
            problems.append(f"{where}: cites the spec, which is not in the repository")
        for m in cited.finditer(text):
            template = text[m.end():m.end() + 2].lstrip("-").startswith(("<", "["))  # NAME-<device>.json
            if m.group(1) not in present and m.group(1) not in folders and not template:
                problems.append(f"{where}: {m.group(1)}")
        if path.suffix == ".md":
            for target in link.findall(text):
                if "://" not in target and not (path.parent / target).resolve().exists():
                    problems.append(f"{where}: link {target}")
    assert not problems, problems


def test_committed_results_hold_no_absolute_paths():
    absolute = re.compile(r"\"(/(?:home|root|tmp|work|Users|mnt|var)/[^\"]*)\"")
    found = [(p.relative_to(ROOT).as_posix(), m) for p in repository_files()
             if p.relative_to(ROOT).parts[0] == "results" and p.suffix in (".json", ".jsonl", ".md")
             for m in absolute.findall(p.read_text(encoding="utf-8"))]
    assert not found, found[:5]
