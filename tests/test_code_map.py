"""docs/cram.md's code map stays true: every file it names exists, every function or class it names is defined
in that row's files, CRAM's mechanism files stay small, and nothing in the package imports from studies/."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MECHANISM_LINES = 400


def code_map_rows() -> list[tuple[list[Path], list[str]]]:
    text = (ROOT / "docs" / "cram.md").read_text()
    section = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`src/"):
            continue
        files = [ROOT / f for f in re.findall(r"`(src/[^`]+\.py)`", cells[1])]
        names = [n.split(".")[0] for n in re.findall(r"`([A-Za-z_][A-Za-z0-9_.]*)`", cells[2])]
        rows.append((files, names))
    return rows


def defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_code_map_names_existing_files_and_definitions():
    rows = code_map_rows()
    assert len(rows) >= 8, "docs/cram.md has no code map table (or it lost rows)"
    for files, names in rows:
        for f in files:
            assert f.is_file(), f"docs/cram.md code map names {f.relative_to(ROOT)}, which does not exist"
        defined = set().union(*(defined_names(f) for f in files))
        missing = [n for n in names if n not in defined]
        assert not missing, f"docs/cram.md code map: {missing} not defined in {[str(f.relative_to(ROOT)) for f in files]}"


def test_every_cram_file_is_in_the_code_map_and_small():
    mapped = {f for files, _ in code_map_rows() for f in files}
    for f in sorted((ROOT / "src/cramcl/methods/cram").glob("*.py")):
        if f.name == "__init__.py":
            continue
        assert f in mapped, f"{f.relative_to(ROOT)} is not in docs/cram.md's code map"
        lines = len(f.read_text().splitlines())
        assert lines <= MAX_MECHANISM_LINES, f"{f.relative_to(ROOT)} has {lines} lines: split it by mechanism"


def test_the_package_never_imports_studies_or_bench():
    offenders = []
    for f in (ROOT / "src/cramcl").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            modules = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            offenders += [f"{f.relative_to(ROOT)}: {m}" for m in modules if m.split(".")[0] in ("studies", "bench")]
    assert not offenders, offenders
