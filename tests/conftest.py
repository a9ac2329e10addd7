"""Shared fixtures: a persistent cache, the quick config and one finished quick run for the whole session.

The cache (built-in stream, image features, base stage) is keyed by content and persists across test
sessions, so only the first session on a machine pays for it. Runs go in pytest's tmp directories.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("CRAMCL_CACHE", str(Path.home() / ".cache" / "cramcl"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

# A 3-task stream of the built-in benchmark, 6 optimizer steps a task, on the quick profile. Keep the task
# list fixed across tests: the tiny backbone's vocabulary (and so its cached base stage) depends on it.
QUICK_TASKS = ("shape", "colour", "ocr")  # in stream order; shape and colour share a format
QUICK_OVERRIDES = (f"data.tasks={','.join(QUICK_TASKS)}", "train.steps_per_task=6")


def assert_refused(method: str, overrides: list[str], message: str) -> None:
    """Resolving ``method`` on the quick profile with ``overrides`` is bad input, one problem containing
    ``message`` (settings are checked before anything is built or written)."""
    from cramcl.config import resolve_config
    from cramcl.errors import BadInputError

    with pytest.raises(BadInputError) as e:
        resolve_config(method=method, profile="quick", overrides=list(overrides))
    assert any(message in p for p in e.value.problems), e.value.problems


def random_pngs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` 40x40 RGB noise images written to ``folder`` (inputs for the vision-cache tests)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def quick_config(method: str = "lora-ft", extra: tuple[str, ...] | list[str] = ()):
    """The resolved quick-profile config every end-to-end test uses."""
    from cramcl.config import resolve_config

    return resolve_config(method=method, profile="quick", overrides=[*QUICK_OVERRIDES, *extra])


class LogSink:
    """A ``log=`` callable for the runner that keeps the lines (tests assert on them)."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, *args):
        self.lines.append(" ".join(str(a) for a in args))


@pytest.fixture(scope="session")
def warm_cache():
    """Build the quick backbone once so the base stage is cached before any run is timed or compared.

    (Whether the base stage came from the cache must not change a run's results; that property has its
    own test in test_resume.py. Warming here keeps the other tests about what they test.)
    """
    from cramcl.backbones import build_backbone
    from cramcl.data.stream import load_stream

    cfg = quick_config()
    build_backbone(cfg, load_stream(cfg.data), log=lambda *a: None)
    return Path(os.environ["CRAMCL_CACHE"])


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, warm_cache) -> Path:
    """One uninterrupted quick lora-ft run on 3 tasks, shared read-only by every test that needs a run.
    Tests that would write into a run directory copy it first."""
    from cramcl.engine.runner import run_stream

    out = tmp_path_factory.mktemp("finished") / "lora-ft-quick"
    run_stream(quick_config(), out, log=LogSink())
    return out


@pytest.fixture(scope="session")
def cram_run(tmp_path_factory, warm_cache) -> Path:
    """One uninterrupted quick CRAM run on the quick tasks, shared read-only (predict, export)."""
    from cramcl.engine.runner import run_stream

    out = tmp_path_factory.mktemp("cram-quick") / "run"
    run_stream(quick_config("cram"), out, log=LogSink())
    return out


# The two-process stream both multi-process tests compare against (tests/test_distributed.py: one process;
# tests/test_sharded.py: FSDP2 through a resume): 12 steps a task at lr 1e-2, so the quick stream's scores are
# above zero and a comparison can fail (at the default lr they are all zero); LoRA dropout off, because each
# process draws its own masks, which at this lr moves a one-process run's scores by tens of points.
# 2 processes x 8 = a global batch of 16.
TWO_PROCESS_RUN = ("--method", "cram", "--profile", "quick", f"data.tasks={','.join(QUICK_TASKS)}",
                   "train.steps_per_task=12", "train.lr=1e-2", "method.dropout=0", "train.batch_size=8")


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory, warm_cache):
    """(run directory, stdout) of TWO_PROCESS_RUN under torchrun with 2 processes (DDP on a gloo group), run
    once per session."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("ddp") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "cramcl", "run", *TWO_PROCESS_RUN, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def assert_same_matrix(run_a: Path, run_b: Path, tolerance: float = 100.0 / 32 + 1e-6) -> None:
    """Two runs' accuracy matrices agree cell by cell within ``tolerance`` (default: one test record of the quick
    split; another process count adds in another order, which can flip a greedy decode on a near-tie), and
    they are not matrices of zeros."""
    import json

    a = json.loads((run_a / "results" / "matrix.json").read_text())["scores"]
    b = json.loads((run_b / "results" / "matrix.json").read_text())["scores"]
    assert any(x for row in a for x in row if x is not None), a  # not a comparison of zeros
    for row_a, row_b in zip(a, b, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            assert (x is None) == (y is None), (a, b)
            if x is not None:
                assert abs(x - y) <= tolerance, (a, b)

