"""`cramcl eval`, `inspect` and `compare` end to end on the quick profile."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import QUICK_OVERRIDES, LogSink, quick_config


@pytest.fixture(scope="module")
def cram_run(tmp_path_factory, warm_cache):
    from cramcl.engine.runner import run_stream

    out = tmp_path_factory.mktemp("cram") / "run"
    run_stream(quick_config("cram"), out, log=LogSink())
    return out


def test_eval_reproduces_the_matrix_row_of_a_checkpoint(tmp_path, finished_run, capsys):
    from cramcl.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(["eval", "--run", str(run), "--after-task", "1", "--tasks", "shape", "colour"]) == 0
    printed = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    row = json.loads((run / "results" / "matrix.json").read_text())["scores"][1]
    assert {k: float(v) for k, v in printed.items()} == pytest.approx({"shape": row[0], "colour": row[1]}, abs=0.01)
    written = run / "results" / "eval" / "after_1" / "shape.jsonl"
    assert written.read_text() == (run / "results" / "predictions" / "after_1" / "shape.jsonl").read_text()
    assert main(["eval", "--run", str(run), "--tasks", "nope"]) == 2
    assert main(["eval", "--run", str(run), "--after-task", "9"]) == 2


def test_inspect_a_cram_run_shows_groups_ranks_and_one_routing(cram_run, capsys):
    from cramcl.cli import main

    assert main(["inspect", "--run", str(cram_run), "--record", "ocr-test-00003"]) == 0
    out = capsys.readouterr().out
    assert "adapted modules: 16" in out
    assert "CRAM: groups, experts and ranks" in out
    assert "record ocr-test-00003" in out and "cosine to group prototypes" in out
    assert "expert 2 (ocr)" in out  # the record's group holds the ocr expert, with per-layer weights
    assert main(["inspect", "--run", str(cram_run), "--record", "no-such-id"]) == 2


def test_inspect_a_config_lists_the_adapted_modules(capsys, warm_cache):
    from cramcl.cli import main

    assert main(["inspect", "--profile", "quick", "--method", "lora-ft", *QUICK_OVERRIDES]) == 0
    out = capsys.readouterr().out
    assert "adapted modules: 16" in out and "layers.3.v_proj" in out


def test_compare_two_methods_and_resume_it(tmp_path, capsys, warm_cache):
    from cramcl.cli import main

    args = ["compare", "--methods", "lora-ft,zero-shot", "--profile", "quick", "--out", str(tmp_path / "cmp"),
            *QUICK_OVERRIDES, "train.steps_per_task=3"]
    assert main(args) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["method"] for r in result["methods"]] == ["lora-ft", "zero-shot"]
    zero = result["methods"][1]
    assert zero["stored_params"] == 0 and zero["BWT"] == 0.0
    for name in ("compare.md", "mfn_vs_params.png", "final_rows.png", "heatmaps.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    capsys.readouterr()
    assert main(args) == 0  # both finished: reused, not retrained
    assert capsys.readouterr().out.count("finished earlier") == 2
    assert main([*args[:2], "lora-ft,typo"] + args[3:]) == 2
