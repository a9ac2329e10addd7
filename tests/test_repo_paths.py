"""Every repository path that the docs, the README, the studies and the package's comments name exists: a file
moved or renamed without its mentions fails here, naming the file and line that still points at the old place."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a path into one of the repository's top-level folders, ending in a file name with an extension; not one after
# "<commit>:" (`git show 18a2bd2:docs/old.md` names a file as it was at that commit)
PATH = re.compile(r"(?<![\w./~:-])((?:src/cramcl|bench|studies|docs|examples|tests|configs)/[\w./-]*\w\.(?:py|md|sh|yaml|json))\b")


def texts() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md")),
             # a study's archived results-v*.md keeps the commands as they ran at the commit it names
             *sorted(f for f in (ROOT / "studies").rglob("*.md") if not f.name.startswith("results-v")), *sorted((ROOT / "studies").rglob("*.py")),
             *sorted((ROOT / "bench").glob("*.py"))]
    files += [f for f in sorted((ROOT / "src/cramcl").rglob("*")) if f.suffix in (".py", ".yaml", ".md")]
    return files


def missing_paths(files: list[Path]) -> list[str]:
    missing = []
    for f in files:
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for path in PATH.findall(line):
                if not (ROOT / path).exists() and not (f.parent / path).exists():
                    where = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f
                    missing.append(f"{where}:{n}: {path}")
    return missing


def test_every_named_repository_path_exists():
    missing = missing_paths(texts())
    assert not missing, "paths named but absent:\n" + "\n".join(missing)


def test_the_check_finds_a_stale_path(tmp_path):
    note = tmp_path / "note.md"
    note.write_text("run `python bench/run_grid.py`, then read docs/results.md and src/cramcl/methods/cram.py\n")
    assert missing_paths([note]) == [f"{note}:1: bench/run_grid.py", f"{note}:1: src/cramcl/methods/cram.py"]
