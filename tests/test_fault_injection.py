"""SIGKILL at six points of a quick run (inside training, inside evaluation, inside a checkpoint write,
right after a checkpoint, while writing results, between tasks): each time, ``--resume`` ends with exactly
the matrix and predictions of an uninterrupted run (``finished_run``: the same quick lora-ft stream).

Mid-task: SIGKILL inside training after a step checkpoint (lora-ft; CRAM in its warm-up, in its stable phase
and at the end of warm-up before consolidation): the resumed run continues from the step checkpoint, redoes
at most one checkpoint interval, and ends with the uninterrupted run's matrix, predictions and final method
state, bit for bit. (The whole file, ten cases: 2 min 49 s on the 2-core machine.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK_OVERRIDES, LogSink

# float reductions depend on the thread count: the killed process, the in-process resume and the reference
# run all use one thread, so an identical matrix is the right expectation
torch.set_num_threads(1)

# point:n -> the n-th time the point is reached (6 optimizer steps and 1-3 eval batches per task)
KILLS = ["train_step:8", "eval_batch:3", "checkpoint_write:2", "checkpoint_done:1", "results_write:2",
         "task_start:3"]


@pytest.mark.parametrize("kill_at", KILLS)
def test_resume_after_sigkill_ends_like_an_uninterrupted_run(kill_at, finished_run, tmp_path):
    from cramcl.engine.runner import run_stream

    out = tmp_path / "killed"
    env = {**os.environ, "CRAMCL_KILL_AT": kill_at, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cramcl", "run", "--method", "lora-ft", "--profile", "quick", "--out", str(out),
           *QUICK_OVERRIDES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed where asked, not finished
    assert not (out / "results" / "metrics.json").exists() or not json.loads(
        (out / "results" / "metrics.json").read_text())["complete"]
    run_stream(None, out, resume=True, log=LogSink())
    for rel in ("results/matrix.json", *(f"results/predictions/after_2/{p.name}"
                                         for p in (finished_run / "results/predictions/after_2").iterdir())):
        assert (out / rel).read_text() == (finished_run / rel).read_text(), rel
    assert json.loads((out / "results" / "metrics.json").read_text())["complete"]


STEPS = 6 * 3  # QUICK_OVERRIDES: 6 optimizer steps on each of 3 tasks
# (method, kill point, extra settings, step_checkpoint_every). lora-ft: the quick profile's interval (4); task 1
# is killed after its 5th step, its step checkpoint holds 4. CRAM (2 warm-up + 4 stable steps a task) with a
# checkpoint every step: killed in task 1's warm-up (after step 2, checkpoint at 1: the resumed run does the
# consolidation), in its stable phase (colour shares shape's group: the routing check must not repeat), and
# right after the checkpoint at the end of task 0's warm-up (before consolidation).
MID_TASK = [("lora-ft", "train_step:11", (), 4),
            ("cram", "train_step:8", ("train.step_checkpoint_every=1",), 1),
            ("cram", "train_step:11", ("train.step_checkpoint_every=1",), 1),
            ("cram", "step_checkpoint_done:2", ("train.step_checkpoint_every=1",), 1)]


@pytest.mark.parametrize("method, kill_at, extra, every", MID_TASK)
def test_sigkill_mid_task_resumes_from_the_step_checkpoint(method, kill_at, extra, every, finished_run, cram_run,
                                                           tmp_path, monkeypatch):
    import cramcl.engine.trainer as trainer
    from cramcl.engine.runner import run_stream

    from conftest import QUICK_TASKS

    reference = finished_run if method == "lora-ft" else cram_run  # step_checkpoint_every cannot change results
    out = tmp_path / "killed"
    env = {**os.environ, "CRAMCL_KILL_AT": kill_at, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cramcl", "run", "--method", method, "--profile", "quick", "--out", str(out),
           *QUICK_OVERRIDES, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "checkpoints" / "step" / "manifest.json").exists()  # killed after at least one step checkpoint

    trained = []  # optimizer steps the resumed process trains (the kill point after every step)
    real_kill_point = trainer.kill_point
    monkeypatch.setattr(trainer, "kill_point", lambda name: (trained.append(1) if name == "train_step" else None,
                                                             real_kill_point(name)))
    log = LogSink()
    run_stream(None, out, resume=True, log=log)
    resumed = [line for line in log.lines if "after optimizer step" in line]
    assert len(resumed) == 1, log.lines
    name, step = resumed[0].split("'")[1], int(resumed[0].split("after optimizer step ")[1].split()[0])
    killed_after = int(kill_at.split(":")[1]) if kill_at.startswith("train_step") else QUICK_TASKS.index(name) * 6 + step
    redone = len(trained) - (STEPS - killed_after)
    assert 0 <= redone <= every, (redone, every)
    for rel in ("results/matrix.json", *(f"results/predictions/after_2/{p.name}"
                                         for p in (reference / "results/predictions/after_2").iterdir()),
                "checkpoints/task_2/method.json"):
        assert (out / rel).read_text() == (reference / rel).read_text(), rel
    got, want = (load_file(str(d / "checkpoints/task_2/method.safetensors")) for d in (out, reference))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    got, want = (json.loads((d / "results/metrics.json").read_text()) for d in (out, reference))
    assert got["params"] == want["params"] and got["skipped_steps"] == want["skipped_steps"]
    assert not (out / "checkpoints" / "step").exists()  # deleted once the task's checkpoint landed
