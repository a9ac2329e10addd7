"""The package says why, the docs say how much.

Comments, docstrings, YAML comments and messages under ``src/cramcl`` (and ``configs/``, the same files) keep
the reason for a choice and point at the docs section that holds the numbers (``docs/profiles.md``,
``docs/peers.md``, ...). They carry no measured results, no stream-version or plan/issue history and no
references to documents a package user never has. This test lists every line that breaks that.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cramcl"
SHIPPED_BASES = PACKAGE / "bases"  # large generated files (weights, vocabulary), not prose
SUFFIXES = {".py", ".yaml", ".yml", ".md", ".json"}

# (why it is out of place, pattern)
PATTERNS = [
    # results figures: a metric with a number, a mean with its spread, a measured ratio or point difference
    ("results figure", r"\b(?:MFN|MFT|MAA|BWT):? \(?-?\d"),
    ("results figure", r"\d ?± ?\d"),
    ("results figure", r"\d ?\+- ?\d"),
    ("results figure", r"\b\d+\.\d+x (?:the|faster|slower)\b"),
    ("results figure", r"\b\d+\.\d+ points\b"),
    ("results figure", r"\((?:\d+|two|three|four|five) seeds\b"),
    # results files and stream versions
    ("results file", r"RESULTS-v"),
    ("results file", r"RESULTS\.md"),
    ("stream version", r"\bstream v\d"),
    ("stream version", r"\bv[4-9] stream"),
    ("stream version", r"\bon v[4-9]\b"),
    # plan / issue history
    ("history", r"\b[Ii]ssues? #?\d"),
    ("history", r"\([Ii]ssue:"),
    ("history", r"\btarget \d[a-z]"),
    ("history", r"\bplan item"),
    ("history", r"\b(?:an earlier|the old|our earlier|our) spec\b"),
    # documents a package user does not have
    ("outside document", r"\bCRAM\.md\b"),
    ("outside document", r"\bPEERS\.md\b"),
    ("outside document", r"\bARCHITECTURE\.md\b"),
    ("outside document", r"\b(?:the CRAM|CRAM's|CRAM|the project's) spec\b"),
    ("outside document", r"\bthe spec (?:says|requires|asks|gives)\b"),
    ("outside document", r"\b[Pp]art [1-9]\d?\b(?! of)"),
]
COMPILED = [(why, re.compile(pattern)) for why, pattern in PATTERNS]


def package_files() -> list[Path]:
    """Every prose-bearing file of the package (configs/ is a link into it), shipped bases excepted."""
    files = set()
    for root in (PACKAGE, ROOT / "configs"):
        if not root.exists():
            continue
        for path in root.rglob("*"):
            real = path.resolve()
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts \
                    and SHIPPED_BASES.resolve() not in real.parents:
                files.add(real)
    return sorted(files)


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return path.relative_to(ROOT)
    except ValueError:
        return path


def offending_lines(files) -> list[str]:
    """``file:line: [why] text`` for every line of ``files`` that matches a pattern."""
    found = []
    for path in files:
        rel = _shown(path)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for why, pattern in COMPILED:
                if pattern.search(line):
                    found.append(f"{rel}:{number}: [{why}] {line.strip()[:160]}")
                    break
    return found


DOCS = ROOT / "docs"
# a pointer into the docs: docs/<file>.md, optionally followed by a comma and the section title in quotes
POINTER = re.compile(r'docs/([\w.-]+\.md)(?:, *"([^"\n]+)")?')
WRAP = re.compile(r"\n[ \t]*(?:#:?[ \t]*)?")  # a line break inside a comment or docstring, with its indentation


def sections(doc: Path) -> set[str]:
    """The heading titles of a markdown file (without the #'s)."""
    return {line.lstrip("#").strip() for line in doc.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def dangling_pointers(files) -> list[str]:
    """``file: docs/x.md, "Section"`` for every pointer to a docs file or section that does not exist."""
    found = []
    for path in files:
        text = WRAP.sub(" ", path.read_text(encoding="utf-8"))
        for name, section in POINTER.findall(text):
            doc = DOCS / name
            if not doc.is_file():
                found.append(f"{_shown(path)}: docs/{name} does not exist")
            elif section and section not in sections(doc):
                found.append(f'{_shown(path)}: docs/{name} has no section "{section}"')
    return found


def test_patterns_catch_what_they_are_for(tmp_path):
    bad = tmp_path / "bad.py"
    good = tmp_path / "good.py"
    bad.write_text("# MFN 88.9 on the stream\n# 71.2 +- 1.3\n# see CRAM.md part 5\n# (issue 8)\n"
                   "# on built-in stream v4\n# docs/RESULTS-v4.md\n# lost 9.5 points (2 seeds)\n"
                   "# 6.5x the LM loss\n# target 4b\n# plan item 3\n# 80.8 ± 0.7\n", encoding="utf-8")
    good.write_text("BWT = 0 by construction\nMETRICS = ('MFT', 'MFN', 'MAA', 'BWT')\n"
                    "# the paper's 0.1 (docs/profiles.md, \"default: cram theta\")\n"
                    "spec = importlib.util.spec_from_file_location(name, file)\n"
                    "# one comparison row (method: the spec it was run under)\n"
                    "# mean +- std over three seeds\n# 3x3 feature grid\n", encoding="utf-8")
    assert len(offending_lines([bad])) == 11
    assert offending_lines([good]) == []
    pointers = tmp_path / "pointers.py"
    pointers.write_text('# (docs/profiles.md, "default: cram\n#   sigma")\n# docs/nowhere.md\n'
                        '# (docs/profiles.md, "no such section")\nx = "see docs/real-models.md")\n', encoding="utf-8")
    assert len(dangling_pointers([pointers])) == 2


def test_package_prose_has_no_results_history_or_outside_documents():
    found = offending_lines(package_files())
    assert not found, ("code says why, docs say how much: move these numbers / references to docs/ and "
                       "point there (e.g. (docs/profiles.md, \"default: cram sigma\")):\n" + "\n".join(found))


def test_docs_pointers_name_existing_files_and_sections():
    found = dangling_pointers(package_files())
    assert not found, "pointers into docs/ that lead nowhere:\n" + "\n".join(found)
