"""The second round of bad inputs and faults that need more than a fixture file under tests/malformed/ (a symlink,
a run directory, a damaged cache): each through the real CLI, refused with exit 2 and one line naming the
file or setting, or (a full disk, a run directory removed mid-run) ended with one line and exit 1; never a
traceback, and nothing that existed before is changed."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from test_malformed_inputs import QUICK_RUN, VALID, _bench, _refused, _tree, no_model  # noqa: F401

from conftest import QUICK_OVERRIDES, random_pngs

QUICK_CLI = ["run", "--profile", "quick", "--method", "lora-ft", *QUICK_OVERRIDES]


def _loop_bench(tmp_path: Path) -> Path:
    bench = _bench(tmp_path)
    os.symlink("loop.png", bench / "images" / "loop.png")  # a link to itself
    with open(bench / "train.jsonl", "a") as f:
        f.write(json.dumps({"id": "bad", "image": "loop.png", "question": "What colour is it?", "answer": "red"}) + "\n")
    return bench


def test_an_image_that_is_a_symlink_loop_is_refused_by_validate_and_run(tmp_path, capsys, no_model):
    bench = _loop_bench(tmp_path)
    words = (f"{bench / 'train.jsonl'}: record 2 (id 'bad'): image path 'loop.png' is not a usable file name "
             "(a symlink loop)")
    _refused(["validate", "--benchmark", bench / "benchmark.yaml"], capsys, words)
    out = tmp_path / "run"
    _refused(["run", *QUICK_RUN, "--benchmark", bench / "benchmark.yaml", "--out", out], capsys, words)
    assert not out.exists()


def test_predict_refuses_a_symlink_loop_an_empty_question_and_a_directory_as_out(finished_run, tmp_path, capsys,
                                                                                  no_model):
    before = _tree(finished_run)
    loop = _loop_bench(tmp_path) / "images" / "loop.png"
    red = VALID / "images" / "red.png"
    _refused(["predict", "--run", finished_run, "--image", loop, "--question", "What colour is it?"], capsys,
             f"--image {loop}: a symlink loop")
    _refused(["predict", "--run", finished_run, "--image", red, "--question", ""], capsys, "--question: empty")
    answers = tmp_path / "answers"
    answers.mkdir()
    _refused(["predict", "--run", finished_run, "--image", red, "--question", "What colour is it?", "--out", answers],
             capsys, f"--out {answers}: is a directory; give the name of a file")
    assert list(answers.iterdir()) == [] and _tree(finished_run) == before


def test_predict_names_the_words_the_tiny_vocabulary_lacks(finished_run, capsys):
    """README's example question: the quick run's vocabulary lacks most of its words; predict still answers,
    with one warning line naming them."""
    from cramcl.cli import main

    assert main(["predict", "--run", str(finished_run), "--image", str(VALID / "images" / "red.png"),
                 "--question", "How many dots are there?"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "cramcl: warning:" in line]
    assert len(warnings) == 1 and "the model's vocabulary lacks 'How', 'many', 'are', 'there?'" in warnings[0]
    assert "'dots'" not in warnings[0]  # a word the stream has is not named
    assert json.loads(captured.out)["answer"] is not None
    assert main(["predict", "--run", str(finished_run), "--image", str(VALID / "images" / "red.png"),
                 "--question", "What colour is it?"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_out_that_is_a_dangling_symlink_or_a_name_too_long_is_refused(tmp_path, capsys, no_model):
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere", dangling)
    _refused([*QUICK_CLI, "--out", dangling], capsys, f"{dangling}: --out is a symlink to '{tmp_path / 'nowhere'}', "
             "which does not exist")
    assert not (tmp_path / "nowhere").exists() and dangling.is_symlink()
    _refused([*QUICK_CLI, "--out", tmp_path / ("x" * 300)], capsys, "--out has a name of 300 bytes; filesystems allow 255")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling"]


@pytest.mark.parametrize("damage", ["directory", "nested", "cut_off"])
def test_metrics_refuses_a_damaged_sibling_metrics_json(damage, finished_run, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(finished_run / "results", results)
    metrics = results / "metrics.json"
    text = metrics.read_text()
    metrics.unlink()
    if damage == "directory":
        metrics.mkdir()
    else:
        metrics.write_text("[" * 100000 + "]" * 100000 if damage == "nested" else text[: len(text) // 2])
    before = _tree(results)
    words = {"directory": "is a directory, not a metrics.json", "nested": "invalid JSON: nested too deeply",
             "cut_off": "(cut off?)"}[damage]
    _refused(["metrics", results / "matrix.json"], capsys, f"cramcl: error: {metrics}: ", words)
    assert _tree(results) == before


def test_compare_over_a_run_whose_metrics_json_is_cut_off_names_it(finished_run, tmp_path, capsys, no_model):
    out = tmp_path / "cmp"
    shutil.copytree(finished_run, out / "lora-ft", ignore=shutil.ignore_patterns("run.lock"))
    metrics = out / "lora-ft" / "results" / "metrics.json"
    metrics.write_bytes(metrics.read_bytes()[:100])
    before = _tree(out)
    _refused(["compare", "--methods", "lora-ft", "--profile", "quick", "--out", out, *QUICK_OVERRIDES], capsys,
             f"{metrics}: not a metrics.json: invalid JSON at line", "(cut off?)",
             f"rewrite it with: cramcl run --resume --out {out / 'lora-ft'}")
    assert _tree(out) == before


def test_compare_names_a_variant_setting_without_a_value(tmp_path, capsys, no_model):
    out = tmp_path / "cmp"
    _refused(["compare", "--methods", "cram:sigma", "--profile", "quick", "--out", out], capsys,
             "--methods: 'cram:sigma': setting 'sigma' has no value (write cram:sigma=VALUE)")
    assert not out.exists()


def test_a_damaged_feature_cache_file_is_recomputed_with_a_warning(tmp_path, monkeypatch, capsys):
    from cramcl.backbones.tiny.vision import EfficientNetFeatures

    monkeypatch.setenv("CRAMCL_CACHE", str(tmp_path / "cache"))
    images = random_pngs(tmp_path, 2)
    first = EfficientNetFeatures(image_size=64)
    digests = first.prepare(images)
    expected = first.features(list(digests.values()))
    damaged = first._path(digests[images[0]])
    damaged.write_bytes(damaged.read_bytes()[:50])  # torn
    again = EfficientNetFeatures(image_size=64)
    again._net = first._net  # the same frozen network, not loaded twice
    assert bool((again.features(list(again.prepare(images).values())) == expected).all())
    err = capsys.readouterr().err
    assert f"cramcl: warning: {damaged}: damaged image-feature cache file" in err and "recomputing it" in err
    assert EfficientNetFeatures._read_cached(damaged) is not None  # rewritten whole


def test_disk_full_during_a_run_ends_with_one_line_and_resume_recovers(finished_run, tmp_path, monkeypatch, capsys):
    """A full disk at task 1's checkpoint: exit 1, one line naming the path and the OS error (no traceback);
    --resume then finishes with the uninterrupted run's matrix."""
    import cramcl.engine.runner as runner
    from cramcl.cli import main

    real = runner.save_checkpoint

    def full(out, t, *a, **k):
        if t == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "checkpoints"))
        return real(out, t, *a, **k)

    out = tmp_path / "run"
    monkeypatch.setattr(runner, "save_checkpoint", full)
    assert main([*QUICK_CLI, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    lines = re.findall(r"cramcl: [^\r\n]*", err)  # (a progress bar may precede it on its line)
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0] == (f"cramcl: fault: {out / 'checkpoints'}: No space left on device [errno 28]; free space "
                        f"(or fix the disk), then continue with: cramcl run --resume --out {out}")
    monkeypatch.setattr(runner, "save_checkpoint", real)
    assert main(["run", "--resume", "--out", str(out)]) == 0, capsys.readouterr().err
    assert (json.loads((out / "results" / "matrix.json").read_text())["scores"]
            == json.loads((finished_run / "results" / "matrix.json").read_text())["scores"])


def test_a_run_directory_removed_mid_run_ends_with_one_line(tmp_path, monkeypatch, capsys, warm_cache):
    import cramcl.engine.runner as runner
    from cramcl.cli import main

    out = tmp_path / "run"
    real = runner.save_checkpoint

    def remove_then_save(o, t, *a, **k):
        shutil.rmtree(out)
        return real(o, t, *a, **k)

    monkeypatch.setattr(runner, "save_checkpoint", remove_then_save)
    assert main([*QUICK_CLI, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    lines = re.findall(r"cramcl: [^\r\n]*", err)  # (a progress bar may precede it on its line)
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"cramcl: fault: {out}") and "No such file or directory [errno 2]" in lines[0]
    assert lines[0].endswith(f"the run directory {out} (or part of it) was removed or moved while the run wrote to it")


def test_a_background_writer_hit_by_the_fault_is_one_warning_and_other_thread_errors_keep_their_traceback(capsys):
    """TensorBoard's event writer runs in its own thread: when the run directory vanishes or the disk fills it
    fails too; that is kept for one warning line (the run's own fault line covers it when the run fails)."""
    import threading

    from cramcl import faults

    def run_in_thread(error):
        def target():
            raise error
        previous, threading.excepthook = threading.excepthook, faults.background_thread_fault
        try:
            t = threading.Thread(target=target)
            t.start()
            t.join()
        finally:
            threading.excepthook = previous
        return capsys.readouterr().err

    faults.BACKGROUND_FAULTS.clear()
    assert run_in_thread(FileNotFoundError(2, "No such file or directory", "/gone/run/logs/events")) == ""
    assert faults.BACKGROUND_FAULTS == ["Thread stopped writing: /gone/run/logs/events: No such file or directory "
                                      "[errno 2]"]
    faults.BACKGROUND_FAULTS.clear()
    err = run_in_thread(ValueError("a bug"))
    assert "Traceback" in err and "ValueError: a bug" in err and not faults.BACKGROUND_FAULTS
