"""Faults never pass silently: divergence stops the run, damaged checkpoints fall back to the previous good
one, --resume refuses changed settings, orphan writes are cleaned, damaged run files are bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK_TASKS, LogSink, quick_config

torch.set_num_threads(1)
QUICK = ["--profile", "quick", f"data.tasks={','.join(QUICK_TASKS)}", "train.steps_per_task=6"]


def _main(argv, capsys):
    from cramcl.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.replace("\r", "\n")
    return rc, err


def _copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _matrix(run):
    return json.loads((run / "results" / "matrix.json").read_text())


# ------------------------------------------------------------------ divergence
def test_a_diverging_run_stops_naming_task_and_step_and_checkpoints_nothing(tmp_path, warm_cache, capsys):
    out = tmp_path / "nan"
    rc, err = _main(["run", "--method", "lora-ft", "--out", str(out), *QUICK, "train.lr=1e6"], capsys)
    assert rc == 1
    assert "cramcl: training fault: task 0 ('shape'), optimizer step" in err and "is not finite" in err
    assert f"cramcl run --resume --out {out}" in err
    assert not (out / "checkpoints").exists() and not (out / "results").exists()


def test_skip_mode_drops_non_finite_steps_and_counts_them(tmp_path, warm_cache):
    from cramcl.engine.runner import run_stream

    out = tmp_path / "skip"
    run_stream(quick_config(extra=["train.lr=1e6", "train.nonfinite=skip"]), out, log=LogSink())
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert sum(metrics["skipped_steps"]) > 0 and len(metrics["skipped_steps"]) == 3
    for ckpt in (out / "checkpoints").iterdir():
        assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "method.safetensors")).values())


def test_a_non_finite_weight_is_caught_before_evaluation(tmp_path, warm_cache):
    from cramcl.engine.runner import check_finite_state
    from cramcl.engine.session import open_session
    from cramcl.errors import TrainingFault

    s = open_session(quick_config(), tmp_path, log=LogSink())
    s.method.before_task(0, s.bench.tasks[0])
    check_finite_state(s.method, 0, "shape")  # fresh adapters are finite
    layer = next(iter(s.method.layers.values()))
    with torch.no_grad():
        layer.experts_A[0][0, 0] = float("nan")
    with pytest.raises(TrainingFault, match=r"task 0 \('shape'\), after training: 1 tensor\(s\)"):
        check_finite_state(s.method, 0, "shape")


# ------------------------------------------------------------------ damaged checkpoints
def test_checkpoints_carry_a_manifest_that_detects_damage(finished_run, tmp_path):
    from cramcl.engine.checkpoint import checkpoint_problem

    out = _copy(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "task_2"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest["files"]) == {"method.safetensors", "method.json", "runner.json", "settings.json"}
    assert checkpoint_problem(ckpt) is None
    data = (ckpt / "method.safetensors").read_bytes()
    (ckpt / "method.safetensors").write_bytes(data[: len(data) // 2])
    assert "method.safetensors" in checkpoint_problem(ckpt) and "truncated" in checkpoint_problem(ckpt)
    (ckpt / "method.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert "checksum" in checkpoint_problem(ckpt)
    (ckpt / "method.safetensors").write_bytes(data)
    (ckpt / "runner.json").unlink()
    assert "runner.json: missing" in checkpoint_problem(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "runner_json", "stray_dir"])
def test_resume_falls_back_past_a_damaged_checkpoint_and_ends_identical(finished_run, tmp_path, damage):
    from cramcl.engine.runner import run_stream

    out = _copy(finished_run, tmp_path)
    ckpts = out / "checkpoints"
    if damage == "truncate":  # the last checkpoint's tensor file cut short
        f = ckpts / "task_2" / "method.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        skipped = "task_2"
    elif damage == "runner_json":
        (ckpts / "task_2" / "runner.json").write_text("{not json")
        skipped = "task_2"
    else:  # a directory that looks like a later checkpoint but holds something else
        (ckpts / "task_7").mkdir()
        (ckpts / "task_7" / "notes.txt").write_text("hello")
        skipped = "task_7"
    log = LogSink()
    run_stream(None, out, resume=True, log=log)
    assert any(f"checkpoint {skipped} is not usable" in line for line in log.lines), log.lines
    assert _matrix(out) == _matrix(finished_run)


def test_eval_of_a_damaged_checkpoint_is_bad_input(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path)
    f = out / "checkpoints" / "task_1" / "method.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    rc, err = _main(["eval", "--run", str(out), "--after-task", "1"], capsys)
    assert rc == 2 and "task_1/method.safetensors" in err and "truncated" in err


def test_resume_removes_orphan_checkpoint_writes(finished_run, tmp_path):
    from cramcl.engine.runner import run_stream

    out = _copy(finished_run, tmp_path)
    orphan = out / "checkpoints" / ".task_2.tmp4242"
    orphan.mkdir()
    (orphan / "method.json").write_text("{")
    log = LogSink()
    run_stream(None, out, resume=True, log=log)
    assert not orphan.exists() and any(".task_2.tmp4242" in line for line in log.lines)


# ------------------------------------------------------------------ resume holds the user to the saved run
def test_resume_refuses_changed_settings_listing_each(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, err = _main(["run", "--resume", "--out", str(out), "--method", "cram", "train.lr=5"], capsys)
    assert rc == 2
    assert "--resume would change method from 'lora-ft' to 'cram'" in err
    rc, err = _main(["run", "--resume", "--out", str(out), "train.lr=5", "train.eval_batch_size=8"], capsys)
    assert rc == 2
    assert "train.lr from 0.002 to 5.0" in err and "train.eval_batch_size from 64 to 8" in err
    assert "pass --force" in err  # eval_batch_size may be forced; lr may not
    rc, err = _main(["run", "--resume", "--force", "--out", str(out), "train.lr=5"], capsys)
    assert rc == 2 and "train.lr" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    rc, err = _main(["run", "--resume", "--out", str(out), "--method", "lora-ft", "--profile", "quick"], capsys)
    assert rc == 0  # the same settings as saved are no change


def test_resume_force_accepts_only_settings_that_cannot_change_results(finished_run, tmp_path, capsys):
    import yaml

    out = _copy(finished_run, tmp_path)
    rc, _ = _main(["run", "--resume", "--force", "--out", str(out), "train.eval_batch_size=8"], capsys)
    assert rc == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["eval_batch_size"] == 8


@pytest.mark.parametrize("content", [b"train: [unclosed", b"\xff\xfe\x00garbage", b"- a list\n"])
def test_a_damaged_config_yaml_is_bad_input(finished_run, tmp_path, capsys, content):
    out = _copy(finished_run, tmp_path)
    (out / "config.yaml").write_bytes(content)
    for argv in (["run", "--resume", "--out", str(out)], ["eval", "--run", str(out)]):
        rc, err = _main(argv, capsys)
        assert rc == 2 and "config.yaml" in err, err


# ------------------------------------------------------------------ signals
def test_sigterm_ends_with_one_line_that_says_how_to_resume(tmp_path, warm_cache, finished_run):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "term"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # The signal lands right after task 0's checkpoint, sent by the run to itself through the same handler an
    # outside `kill` reaches; polling for the checkpoint from here raced the rest of the (tiny) run, which could
    # finish before the signal was sent.
    cmd = [sys.executable, "-m", "cramcl", "run", "--method", "lora-ft", "--out", str(out), *QUICK]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "CRAMCL_KILL_AT": "checkpoint_done", "CRAMCL_KILL_SIGNAL": "SIGTERM"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert f"cramcl: terminated (SIGTERM); continue with: cramcl run --resume --out {out}" in err
    resumed = subprocess.run([sys.executable, "-m", "cramcl", "run", "--resume", "--out", str(out)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _matrix(out) == _matrix(finished_run)  # the interrupted + resumed run ends like an uninterrupted one


# ------------------------------------------------------------------ checked before anything is written
@pytest.mark.parametrize("setting, words", [
    ("train.steps_per_task=-5", "train.steps_per_task: -5 must be >= 1"),
    ("train.lr=0", "train.lr: 0.0 must be > 0"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio: 1.5 must be in [0, 1]"),
    ("train.nonfinite=ignore", "train.nonfinite: 'ignore' is not one of stop, skip"),
    ("method.sigma=-1", "method.sigma: -1.0 must be > 0"),
    ("method.r_min=20", "method.r_min: 20 must be in [1, r_max]"),
    ("method.tau_novel=1.5", "method.tau_novel: 1.5 must be in [0, 1]"),
    # one step leaves CRAM's warm-up empty (c_buf has no samples): an internal error in the middle of task 0
    ("train.steps_per_task=1", "train.steps_per_task: 1 is too few for cram, which needs at least 2"),
])
def test_settings_out_of_range_are_refused_before_anything_is_written(tmp_path, capsys, setting, words):
    out = tmp_path / "never"
    rc, err = _main(["run", "--out", str(out), *QUICK, setting], capsys)
    assert rc == 2 and words in err, err
    assert not out.exists()  # a plain rerun with the setting fixed is not blocked


def test_an_unusable_out_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    import cramcl.engine.session as session

    monkeypatch.setattr(session, "open_session", lambda *a, **k: pytest.fail("built the model first"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, words in ((a_file, "exists and is not a directory"), (a_file / "sub", "is not a directory"),
                       (Path("/proc/cramcl-run"), "")):
        rc, err = _main(["run", "--method", "lora-ft", "--out", str(out), *QUICK], capsys)
        assert rc == 2 and str(out) in err and words in err, err


def test_a_truncated_image_in_a_later_task_is_found_before_training(tmp_path, capsys, warm_cache):
    from cramcl.data.stream import builtin_benchmark_path

    cfg = quick_config()
    src = builtin_benchmark_path(cfg.data).parent
    bench = tmp_path / "bench"
    shutil.copytree(src, bench, symlinks=False)
    last = QUICK_TASKS[-1]  # the last task: found before the first one trains
    victim = sorted((bench / "images" / last).glob("train-*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:60])
    out = tmp_path / "run"
    rc, err = _main(["run", "--method", "lora-ft", "--benchmark", str(bench / "benchmark.yaml"), "--out", str(out),
                     *QUICK], capsys)
    assert rc == 2 and f"{victim.resolve()}: unreadable image" in err and f"task '{last}' train record" in err, err
    assert not out.exists()


def test_sigterm_wrapped_by_an_import_still_ends_as_terminated(monkeypatch, capsys):
    """A SIGTERM that lands inside a C extension's import reaches the CLI as an ImportError raised from it."""
    from cramcl import cli

    def run_then_import_fails(args):
        try:
            raise cli._Terminated()
        except cli._Terminated as e:
            raise ImportError("initialization failed") from e

    monkeypatch.setitem(cli.COMMANDS, "run", run_then_import_fails)
    assert cli.main(["run", "--out", "x"]) == 143
    assert "cramcl: terminated (SIGTERM); continue with: cramcl run --resume --out x" in capsys.readouterr().err
