"""Sharded training (FSDP2 on the frozen base, launched with the shipped configs/accelerate/fsdp.yaml) gives the
DDP matrix on the same short stream, through an interruption and a resume.

Both runs: 2 processes on CPU (gloo), global batch 16, the quick 3-task stream. The sharded run is killed
mid-task (task 1, step 9, after its step checkpoint at step 8) and resumed under the same launch; its final
matrix must equal the uninterrupted DDP run's within the tolerance of tests/test_distributed.py: one test record
per cell (100/32 points), since the sharded base's all-gathers and the replicated adapters' all-reduce add in
another order than DDP's bucketed all-reduce. The runner checks after every task that experts, centroids and
prototypes are identical on both processes. What does not run on CPU and why (Accelerate's own FSDP plugin,
DeepSpeed ZeRO-2/3): docs/real-models.md, "Sharded training".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TWO_PROCESS_RUN, assert_same_matrix

CONFIG = Path(__file__).resolve().parents[1] / "src" / "cramcl" / "configs" / "accelerate" / "fsdp.yaml"
RUN = ["-m", "cramcl", "run", *TWO_PROCESS_RUN]


def _launch(cmd, env, ok=True):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_fsdp_matches_ddp_through_a_resume(tmp_path, ddp_run):
    pytest.importorskip("torch.distributed.fsdp").fully_shard
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ddp, _ = ddp_run

    fsdp = tmp_path / "fsdp"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
                  "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29572"]
    killed = _launch([*accelerate, *RUN, "--out", str(fsdp)], {**env, "CRAMCL_KILL_AT": "train_step:21"}, ok=False)
    assert killed.returncode != 0 and (fsdp / "checkpoints" / "task_0").exists(), killed.stderr[-3000:]
    assert not (fsdp / "checkpoints" / "task_1").exists()
    resumed = _launch([*accelerate, *RUN[:7], "--out", str(fsdp), "--resume"], env)
    assert "resuming 'colour' after optimizer step 8" in resumed.stdout, resumed.stdout[-3000:]
    assert resumed.stdout.count("method state identical on 2 processes") >= 2 * 2  # 2 tasks, logged by each process

    record = json.loads((fsdp / "env.json").read_text())
    assert record["world_size"] == 2 and record["global_batch_size"] == 16
    assert record["sharding"]["backend"] == "fsdp2-frozen-base" and record["sharding"]["units"] > 0
    assert json.loads((ddp / "env.json").read_text())["sharding"] is None
    assert_same_matrix(ddp, fsdp)
