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

from conftest import TWO_PROCESS_RUN, LogSink, assert_same_matrix, quick_config


def test_two_processes_match_one_process(tmp_path, ddp_run):
    from cramcl.engine.runner import run_stream

    one = tmp_path / "one"
    settings = [s for s in TWO_PROCESS_RUN[4:] if not s.startswith("train.batch_size=")]
    run_stream(quick_config("cram", [*settings, "train.batch_size=16"]), one, log=LogSink())

    two, stdout = ddp_run
    assert stdout.count("method state identical on 2 processes") >= 3  # checked after every task

    env_json = json.loads((two / "env.json").read_text())
    assert env_json["world_size"] == 2 and env_json["global_batch_size"] == 16
    assert_same_matrix(one, two)
    # distributed evaluation dropped no record
    for pred in (two / "results" / "predictions" / "after_2").iterdir():
        ref = one / "results" / "predictions" / "after_2" / pred.name
        assert len(pred.read_text().splitlines()) == len(ref.read_text().splitlines())
