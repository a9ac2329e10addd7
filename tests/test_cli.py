"""The command line, in-process (``cramcl.cli.main``): exit 0 / 2 (bad input, one stderr line per problem
naming the file) / 1 (internal error), and nothing already on disk is touched by a refused command."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cramcl.cli import main
from cramcl.eval.metrics import continual_metrics, json_safe

from conftest import QUICK_OVERRIDES

PREFIX = "cramcl: error: "


def err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ --help
def test_module_help_exits_zero_and_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "cramcl", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    for command in ("run", "compare", "eval", "metrics", "validate", "inspect"):
        assert command in proc.stdout


@pytest.mark.parametrize("command", ["run", "compare", "eval", "metrics", "validate", "inspect"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: cramcl {command}" in capsys.readouterr().out


def test_bad_argument_exits_2():
    with pytest.raises(SystemExit) as exc:
        main(["run", "--profile", "bogus"])
    assert exc.value.code == 2


# ------------------------------------------------------------------ validate
def png(path: Path, colour=(10, 200, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def llava(rid: str, image: str, q: str, a: str) -> dict:
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}


def make_benchmark(root: Path, *, missing_image=False, bad_json=False, bad_scorer=False) -> dict[str, Path]:
    """A two-task benchmark (LLaVA JSON train, JSONL test); each flag breaks one thing in one file."""
    for name in ("a", "b", "c"):
        png(root / "images" / f"{name}.png")
    files = {
        "yaml": root / "bench.yaml",
        "shape_train": root / "shape" / "train.json",
        "shape_test": root / "shape" / "test.jsonl",
        "colour_train": root / "colour" / "train.json",
        "colour_test": root / "colour" / "test.jsonl",
    }
    for p in files.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    files["shape_train"].write_text(json.dumps([
        llava("s1", "a.png", "What shape?", "circle"),
        llava("s2", "nope.png" if missing_image else "b.png", "What shape?", "square"),
    ]))
    test_lines = [json.dumps({"id": "t1", "image": "c.png", "question": "What shape?", "answer": "circle"}),
                  '{"id": "t2", "image": "a.png", "question": ' if bad_json else
                  json.dumps({"id": "t2", "image": "a.png", "question": "What shape?", "answer": "circle"})]
    files["shape_test"].write_text("\n".join(test_lines) + "\n")
    files["colour_train"].write_text(json.dumps([llava("c1", "a.png", "Colour?", "green")]))
    files["colour_test"].write_text(json.dumps({"id": "u1", "image": "b.png", "question": "Colour?",
                                                "answer": "green"}) + "\n")
    files["yaml"].write_text(yaml.safe_dump({
        "name": "tiny", "image_root": "images",
        "tasks": [
            {"name": "shape", "train": "shape/train.json", "test": "shape/test.jsonl", "scorer": "exact"},
            {"name": "colour", "train": "colour/train.json", "test": "colour/test.jsonl",
             "scorer": "bleu" if bad_scorer else "exact"},
        ]}, sort_keys=False))
    return files


def test_validate_good_benchmark_exits_0(tmp_path, capsys):
    files = make_benchmark(tmp_path)
    assert main(["validate", "--benchmark", str(files["yaml"])]) == 0
    out, err = capsys.readouterr()
    assert "ok (2 tasks, 6 records, every image readable)" in out
    assert err == ""


@pytest.mark.parametrize("flag, file_key, words", [
    ("missing_image", "shape_train", ["record 1", "(id 's2')", "image 'nope.png' not found"]),
    ("bad_json", "shape_test", ["line 2", "invalid JSON"]),
    ("bad_scorer", "yaml", ["task 'colour'", "unknown scorer 'bleu'"]),
])
def test_validate_bad_benchmark_exits_2_with_one_line_naming_the_file(tmp_path, capsys, flag, file_key, words):
    files = make_benchmark(tmp_path, **{flag: True})
    assert main(["validate", "--benchmark", str(files["yaml"])]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(PREFIX + str(files[file_key]) + ":"), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def test_validate_reports_every_problem_at_once(tmp_path, capsys):
    files = make_benchmark(tmp_path, missing_image=True, bad_json=True, bad_scorer=True)
    before = snapshot(tmp_path)
    assert main(["validate", "--benchmark", str(files["yaml"])]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 3, lines
    for key in ("shape_train", "shape_test", "yaml"):
        assert sum(line.startswith(PREFIX + str(files[key]) + ":") for line in lines) == 1, (key, lines)
    assert snapshot(tmp_path) == before  # validation writes nothing


def test_validate_missing_benchmark_file_exits_2(tmp_path, capsys):
    path = tmp_path / "none.yaml"
    assert main(["validate", "--benchmark", str(path)]) == 2
    lines = err_lines(capsys)
    assert lines == [f"{PREFIX}{path}: benchmark file not found"]


# ------------------------------------------------------------------ run: bad input
def test_run_typo_key_exits_2_with_suggestion(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--method", "lora-ft", "--profile", "quick", "--out", str(out), "train.lrr=1"]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1, lines
    assert "unknown key 'lrr'" in lines[0] and "did you mean 'lr'" in lines[0]
    assert not out.exists()  # nothing was started


def test_run_unknown_method_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--method", "lora_ft", "--profile", "quick", "--out", str(out)]) == 2
    lines = err_lines(capsys)
    assert lines == [f"{PREFIX}--method: unknown method 'lora_ft' (did you mean 'lora-ft'?)"]
    assert not out.exists()


def test_run_resume_without_out_exits_2(capsys):
    assert main(["run", "--resume"]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "--resume needs --out" in lines[0], lines


def test_run_resume_of_a_directory_without_a_run_exits_2(tmp_path, capsys):
    assert main(["run", "--resume", "--out", str(tmp_path)]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and str(tmp_path / "config.yaml") in lines[0], lines


def test_run_into_an_existing_run_without_resume_exits_2_and_touches_nothing(finished_run, tmp_path, capsys):
    out = tmp_path / "existing"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code = main(["run", "--method", "lora-ft", "--profile", "quick", "--out", str(out), *QUICK_OVERRIDES])
    assert code == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "already holds a run" in lines[0] and "--resume" in lines[0], lines
    assert snapshot(out) == before  # byte-identical
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes  # and not even rewritten


def test_run_internal_error_exits_1(tmp_path, capsys, monkeypatch):
    import cramcl.engine.runner as runner

    def boom(*args, **kwargs):
        raise RuntimeError("boom from the runner")

    monkeypatch.setattr(runner, "run_stream", boom)
    assert main(["run", "--method", "lora-ft", "--profile", "quick", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: boom from the runner" in err  # the traceback, for the bug report
    assert "internal error (exit 1)" in err


def test_run_resume_of_a_finished_run_exits_0_and_keeps_its_results(finished_run, tmp_path, capsys):
    out = tmp_path / "finished"
    shutil.copytree(finished_run, out)
    matrix = json.loads((out / "results" / "matrix.json").read_text())
    preds = snapshot(out / "results" / "predictions")
    assert main(["run", "--resume", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"done: {out}/report.md" in stdout
    assert json.loads((out / "results" / "matrix.json").read_text()) == matrix
    assert snapshot(out / "results" / "predictions") == preds
    printed = json.loads(stdout.strip().splitlines()[-1])
    want = {k: (round(v, 2) if v == v else None) for k, v in continual_metrics(matrix["scores"]).items()}
    assert printed == want


# ------------------------------------------------------------------ metrics
MATRIX = {"method": "x", "tasks": ["a", "b"], "scores": [[80.0, None], [60.0, 90.0]],
          "scorers": {"a": "exact", "b": "exact"}}
# MFT = (80 + 90) / 2; MFN = (60 + 90) / 2; MAA = (80 + 75) / 2; BWT = 60 - 80; forgetting = 80 - 60
WANT = {"MFT": 85.0, "MFN": 75.0, "MAA": 77.5, "BWT": -20.0, "forgetting": 20.0}


@pytest.fixture
def matrix_file(tmp_path) -> Path:
    path = tmp_path / "results" / "matrix.json"
    path.parent.mkdir()
    path.write_text(json.dumps(MATRIX))
    return path


def test_metrics_missing_file_exits_2(tmp_path, capsys):
    path = tmp_path / "results" / "matrix.json"
    assert main(["metrics", str(path)]) == 2
    assert err_lines(capsys) == [f"{PREFIX}{path}: file not found"]


@pytest.mark.parametrize("text", ["{not json", '{"tasks": []}', "[1, 2]"])
def test_metrics_on_a_file_that_is_not_a_matrix_exits_2(tmp_path, capsys, text):
    path = tmp_path / "matrix.json"
    path.write_text(text)
    assert main(["metrics", str(path)]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"{PREFIX}{path}: not a matrix.json"), lines


def test_metrics_json(matrix_file, capsys):
    assert main(["metrics", str(matrix_file), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == WANT


def test_metrics_csv(matrix_file, capsys):
    assert main(["metrics", str(matrix_file), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "MFT,MFN,MAA,BWT,forgetting,trainable_total,stored_total,active_per_sample",
        "85.0,75.0,77.5,-20.0,20.0,,,",
    ]


def test_metrics_markdown_is_the_default(matrix_file, capsys):
    assert main(["metrics", str(matrix_file)]) == 0
    out = capsys.readouterr().out
    for row in ("| MFT | 85.00 |", "| MFN | 75.00 |", "| MAA | 77.50 |", "| BWT | -20.00 |", "| forgetting | 20.00 |"):
        assert row in out.splitlines(), out


def test_metrics_keeps_parameter_counts_from_metrics_json(matrix_file, capsys):
    (matrix_file.parent / "metrics.json").write_text(json.dumps({
        "MFT": 0.0, "params": {"trainable_per_task": [10, 20], "stored_total": 30, "active_per_sample": 7}}))
    assert main(["metrics", str(matrix_file), "--format", "csv"]) == 0
    # the metrics are recomputed from the matrix; the counts come from metrics.json
    assert capsys.readouterr().out.splitlines()[1] == "85.0,75.0,77.5,-20.0,20.0,30,30,7"


def test_metrics_of_a_real_run(finished_run, capsys):
    path = finished_run / "results" / "matrix.json"
    assert main(["metrics", str(path), "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    matrix = json.loads(path.read_text())
    saved = json.loads((finished_run / "results" / "metrics.json").read_text())
    for k, v in json_safe(continual_metrics(matrix["scores"])).items():
        assert got[k] == v
    assert got["params"] == saved["params"]


def test_run_with_a_corrupt_image_is_bad_input_naming_the_file(tmp_path, capsys, warm_cache):
    """validate catches a corrupt image up front; a run that meets one anyway exits 2 naming the file."""
    from PIL import Image

    from cramcl.cli import main

    root = tmp_path / "bench"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "images" / "ok.png")
    (root / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = [{"id": "a", "image": "ok.png", "question": "What colour?", "answer": "red"},
            {"id": "b", "image": "bad.png", "question": "What colour?", "answer": "red"}]
    (root / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "b.yaml").write_text("name: b\nimage_root: images\ntasks:\n"
                                 "  - {name: c, train: t.jsonl, test: t.jsonl, scorer: exact}\n")
    code = main(["run", "--method", "lora-ft", "--profile", "quick", "--benchmark", str(root / "b.yaml"),
                 "--out", str(tmp_path / "run"), "train.steps_per_task=1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "bad.png" in err and "unreadable image" in err


def test_settings_are_accepted_anywhere_on_the_line():
    from cramcl.cli import _parse

    args = _parse(["run", "train.lr=3e-4", "--method", "cram", "method.sigma=0.5", "--profile", "quick", "seed=2"])
    assert args.method == "cram" and args.profile == "quick"
    assert args.overrides == ["train.lr=3e-4", "method.sigma=0.5", "seed=2"]
    with pytest.raises(SystemExit):
        _parse(["run", "a=1", "--method", "cram", "--bogus"])
    with pytest.raises(SystemExit):
        _parse(["metrics", "m.json", "train.lr=1"])  # metrics takes no settings


def test_progress_bars_write_rarely_when_stderr_is_not_a_terminal(monkeypatch):
    import io

    from cramcl.utils import progress

    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    progress.set_interval(45)
    try:
        b = progress.bar(range(3), desc="x")
        assert b.mininterval == 45
        b.close()
    finally:
        progress.set_interval(30)
