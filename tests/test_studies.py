"""Every study script (studies/*/*.py) and every speed benchmark (python -m bench NAME) answers --help.

The scripts import torch, transformers and cramcl at module level; a subprocess each would pay those imports
two dozen times. One child process imports them once and runs every script's ``--help`` in turn
(``runpy.run_path`` with the script's folder first on sys.path, as ``python script.py`` has it), reporting
each exit code and the start of its output; a second child checks ``python -m bench`` itself.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cramcl.data.builtin import choice
from cramcl.data.builtin._common import PALETTE

ROOT = Path(__file__).resolve().parents[1]
# Modules the study scripts import, not run (no --help of their own to check).
LIBRARIES = {"mc_tasks.py"}
STUDY_SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "studies").glob("*/*.py")
                       if p.name not in LIBRARIES)

_CHILD = r"""
import contextlib, io, json, runpy, sys
from pathlib import Path
root = Path(sys.argv[1])
out = {}
for rel in sys.argv[2:]:
    path = root / rel
    saved_path, saved_mods = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(path.parent))
    sys.argv = [str(path), "--help"]
    buf = io.StringIO()
    code = None
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_path(str(path), run_name="__main__")
        code = "returned without exiting"
    except SystemExit as stop:
        code = stop.code if stop.code is not None else 0
    except BaseException as err:
        code = f"{type(err).__name__}: {err}"
    out[rel] = {"code": code, "text": buf.getvalue()[:400]}
    sys.path[:] = saved_path
    # a sibling module (base_probe, grid_tables, mc_study, ...) belongs to its folder: forget it
    for name in set(sys.modules) - saved_mods:
        mod = sys.modules[name]
        if str(getattr(mod, "__file__", "") or "").startswith(str(root / "studies")):
            del sys.modules[name]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps() -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), *STUDY_SCRIPTS], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_study_folder_has_a_readme_and_the_index_names_it():
    index = (ROOT / "studies" / "README.md").read_text(encoding="utf-8")
    folders = sorted(p for p in (ROOT / "studies").iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    assert folders
    for folder in folders:
        assert (folder / "README.md").is_file(), folder
        assert f"{folder.name}/" in index, f"studies/README.md does not list {folder.name}/"


@pytest.mark.parametrize("script", STUDY_SCRIPTS)
def test_study_script_help(helps, script):
    result = helps[script]
    assert result["code"] == 0, f"{script} --help: {result['code']}\n{result['text']}"
    assert "usage:" in result["text"], result["text"]


def test_bench_lists_and_runs_every_benchmark_help():
    listing = subprocess.run([sys.executable, "-m", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_")} | {"gpu_suite"}
    listed = {line.split()[0] for line in listing.stdout.splitlines() if line.startswith("  ")}
    assert listed == scripts, "bench/__main__.py's BENCHMARKS and the scripts in bench/ differ"
    # every benchmark's --help in one process (torch imported once), through the dispatcher
    child = ("import contextlib, io, json, sys; sys.path.insert(0, '.'); from bench.__main__ import main\n"
             "out = {}\n"
             f"for name in {sorted(scripts)!r}:\n"
             "    buf = io.StringIO()\n"
             "    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):\n"
             "        code = main([name, '--help'])\n"
             "    out[name] = [code, buf.getvalue()[:300]]\n"
             "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, (code, text) in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert code == 0 and "usage" in text, f"python -m bench {name} --help: {code}\n{text}"


# ------------------------------------------------- the multiple-choice study's own tasks (studies/mc-format/mc_tasks.py)
sys.path.insert(0, str(ROOT / "studies" / "mc-format"))
import mc_tasks  # noqa: E402

_OPTION = re.compile(r"\b([A-E]) (\S+)")


def _options(question: str) -> dict[str, str]:
    listed = question.split(" Options: ", 1)[1].rsplit(" " + choice.TAIL, 1)[0]
    return dict(_OPTION.findall(listed))


def _caption_options(question: str) -> dict[str, str]:
    """Letter -> caption of a caption multiple choice (captions hold spaces; letters are single capitals)."""
    listed = question.split(" Options: ", 1)[1].rsplit(" " + choice.TAIL, 1)[0]
    parts = re.split(r"(?:^| )([A-E]) ", listed)[1:]
    return dict(zip(parts[::2], parts[1::2]))


def test_mc_study_mc_digit_has_four_distinct_digits_and_the_true_one():
    samples = mc_tasks.make_mc_digit("test", 80, (0, 10), 64, set())
    for s in samples:
        opts = _options(s.question)
        assert len(opts) == 4 and len(set(opts.values())) == 4
        assert opts[s.answer] == s.caption.split()[-1]  # caption "a handwritten 7"
    assert {s.answer for s in samples} == {"A", "B", "C", "D"}


def test_mc_study_mc_colour_options_are_palette_colours_with_the_blobs_own():
    samples = mc_tasks.make_mc_colour("test", 80, (0, 11), 64, set())
    for s in samples:
        opts = _options(s.question)
        assert len(opts) == 4 and set(opts.values()) <= set(PALETTE)
        assert opts[s.answer] == s.caption.split()[1]  # caption "a red blob"
    assert {s.answer for s in samples} == {"A", "B", "C", "D"}


def test_mc_study_mc_corner_options_are_the_four_corners_and_the_letter_names_the_shapes_corner():
    from cramcl.data.builtin import questions

    samples = mc_tasks.make_mc_corner("test", 80, (0, 12), 64, set())
    orders = set()
    for s in samples:
        opts = _options(s.question)
        assert sorted(opts.values()) == sorted(questions.CORNERS)
        assert s.caption.endswith(f" {opts[s.answer]} corner")  # caption "a small red square in the top-left corner"
        orders.add(tuple(opts.values()))
    assert len(orders) > 12
    assert {s.answer for s in samples} == {"A", "B", "C", "D"}


def test_mc_study_three_option_variants_keep_the_true_answer_among_three_distinct_options():
    from cramcl.data.builtin import questions

    colour = mc_tasks.make_mc_colour3("test", 80, (0, 13), 64, set())
    corner = mc_tasks.make_mc_corner3("test", 80, (0, 14), 64, set())
    for samples, pool, truth in ((colour, set(PALETTE), lambda s: s.caption.split()[1]),
                                 (corner, set(questions.CORNERS), lambda s: s.caption.split()[-2])):
        for s in samples:
            opts = _options(s.question)
            assert len(opts) == 3 and len(set(opts.values())) == 3 and set(opts.values()) <= pool
            assert opts[s.answer] == truth(s)
        assert {s.answer for s in samples} == {"A", "B", "C"}


def test_mc_study_instruction_samples_reuse_images_and_answer_correctly():
    base = choice.make_mc_shape("pretrain", 20, (0, 9), 64, set())
    out = mc_tasks.instruction_samples(base, seed=0)
    assert all(s.image is not None for s in out)
    mc = [s for s in out if s.question.startswith(mc_tasks.CAPTION_STEM)]
    assert len(mc) == 20
    for s in mc:
        listed = s.question.split(" Options: ", 1)[1]
        assert f"{s.answer} {s.caption}" in listed


def test_mc_study_mc_heavy_records_draw_distractors_from_the_same_domain_and_skip_spatial_questions():
    from cramcl.data.builtin import corner

    base = (choice.make_mc_shape("pretrain", 20, (0, 9), 64, set())
            + corner.make_corner("pretrain", 20, (0, 2), 64, set()))
    out = mc_tasks.instruction_samples(base, seed=0, mc_heavy=True)
    mc = [s for s in out if s.question.startswith(mc_tasks.CAPTION_STEM)]
    assert len(mc) == 2 * len(base)
    for s in mc:
        opts = _caption_options(s.question)
        assert opts[s.answer] == s.caption
        assert {mc_tasks.caption_domain(c) for c in opts.values()} == {mc_tasks.caption_domain(s.caption)}
    assert not any("left or on the right" in s.question or "top or at the bottom" in s.question for s in out)
    plain = mc_tasks.instruction_samples(base, seed=0)
    assert any("left or on the right" in s.question or "top or at the bottom" in s.question for s in plain)
