"""SIGKILL at six points of a quick run (inside training, inside evaluation, inside a checkpoint write,
right after a checkpoint, while writing results, between tasks): each time, ``--resume`` ends with exactly
the matrix and predictions of an uninterrupted run (``finished_run``: the same quick lora-ft stream)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

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
