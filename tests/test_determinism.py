"""The same bits in every process on a CPU: a CRAM run made in a fresh process (another hash seed) equals the
test process's byte for byte, and CRAM's consolidation gives the same expert whatever the thread count (its
rank is a threshold on singular values, so a last-bit difference in an SVD could become another rank)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import QUICK_OVERRIDES

torch.set_num_threads(1)  # as every module that trains in the test process: the fresh process below matches it

CONSOLIDATE = """
import hashlib, torch
from cramcl.methods.cram.consolidation import consolidate_buffer
g = torch.Generator().manual_seed(0)
h = hashlib.sha256()
for _ in range(4):
    B, A = torch.randn(256, 48, generator=g), torch.randn(48, 256, generator=g)
    history = [torch.randn(9, 256, generator=g)]
    r = consolidate_buffer(B, A, 2.0, history, tau_alloc=0.08, tau_novel=0.9, r_min=4, r_max=9)
    h.update(r.A.numpy().tobytes()); h.update(r.B.numpy().tobytes())
print(h.hexdigest())
"""


def _python(code_or_args: list[str], threads: int, hash_seed: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, *code_or_args], env=env, capture_output=True, text=True, timeout=300)


def test_consolidation_gives_the_same_expert_at_any_thread_count():
    digests = []
    for threads in (1, 2):
        done = _python(["-c", CONSOLIDATE], threads, "0")
        assert done.returncode == 0, done.stderr
        digests.append(done.stdout.strip())
    assert digests[0] == digests[1], "consolidation's bits depend on the thread count"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_cram_run_in_a_fresh_process_is_byte_identical(cram_run, tmp_path):
    """The test process trains with one thread (every test module sets it), so the fresh one does too."""
    out = tmp_path / "again"
    done = _python(["-m", "cramcl", "run", "--method", "cram", "--profile", "quick", "--out", str(out),
                    *QUICK_OVERRIDES], threads=1, hash_seed="12345")
    assert done.returncode == 0, done.stderr[-2000:]
    assert _digest(out / "results" / "matrix.json") == _digest(cram_run / "results" / "matrix.json")
    ours = sorted(p.relative_to(cram_run) for p in (cram_run / "checkpoints").rglob("method.*"))
    assert ours and ours == sorted(p.relative_to(out) for p in (out / "checkpoints").rglob("method.*"))
    different = [str(p) for p in ours if _digest(cram_run / p) != _digest(out / p)]
    assert not different, f"checkpoint files differ between two processes: {different}"
    predictions = sorted(p.relative_to(cram_run) for p in (cram_run / "results" / "predictions").rglob("*.jsonl"))
    assert predictions and all(_digest(cram_run / p) == _digest(out / p) for p in predictions)
