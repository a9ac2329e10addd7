"""Two processes (torchrun, which `accelerate launch --multi_gpu` wraps; on CPU the Accelerator forms a gloo
group) give the one-process results at the same global batch.

Tolerance: gloo's all-reduce sums gradients in another order than one process's backward, so weights differ
in the last float bits and a greedy decode can flip on a near-tie; we allow each cell to differ by at most
one test record (100/32 points on the quick test split), and usually nothing differs. The runner itself
checks after every task that experts, centroids and prototypes are identical on both processes (it raises
otherwise), and logs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


from conftest import QUICK_OVERRIDES, LogSink, quick_config

TOLERANCE = 100.0 / 32 + 1e-6


def test_two_processes_match_one_process(tmp_path, warm_cache):
    from cramcl.engine.runner import run_stream

    one = tmp_path / "one"
    run_stream(quick_config("cram", ["train.batch_size=16"]), one, log=LogSink())

    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "cramcl", "run", "--method", "cram", "--profile", "quick", "--out", str(two), *QUICK_OVERRIDES,
           "train.batch_size=8"]  # 2 processes x 8 = the one-process global batch of 16
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("method state identical on 2 processes") >= 3  # checked after every task

    env_json = json.loads((two / "env.json").read_text())
    assert env_json["world_size"] == 2 and env_json["global_batch_size"] == 16
    a = json.loads((one / "results" / "matrix.json").read_text())["scores"]
    b = json.loads((two / "results" / "matrix.json").read_text())["scores"]
    for row_a, row_b in zip(a, b):
        for x, y in zip(row_a, row_b):
            assert (x is None) == (y is None)
            if x is not None:
                assert abs(x - y) <= TOLERANCE, (a, b)
    # distributed evaluation dropped no record
    for pred in (two / "results" / "predictions" / "after_2").iterdir():
        ref = one / "results" / "predictions" / "after_2" / pred.name
        assert len(pred.read_text().splitlines()) == len(ref.read_text().splitlines())
