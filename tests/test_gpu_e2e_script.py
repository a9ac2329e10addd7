"""bench/gpu_e2e.py, the end-to-end script for a lent GPU, run with --tiny on the CPU: every phase (build a
checkpoint with save_pretrained, cramcl run, a SIGKILL mid-task, --resume, cramcl export --format peft) runs as
the GPU would run it, at tiny widths, and the summary it writes says what happened. One model (LLaVA) and 3
optimizer steps a task and no DataLoader workers keep it under a minute on the 2-core machine (~45 s, five
processes that each import transformers); the script's default is both models. What the workers change, a
killed run's lock held a few seconds longer, has its own test below."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_end_to_end_summary(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("CRAMCL_KILL_AT", None)
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_e2e.py"), "--tiny", "--models", "llava", "--steps", "3",
           "--kill-step", "2", "--checkpoint-every", "1", "--train-records", "8", "--test-records", "4",
           "--out", str(out), "--workdir", str(tmp_path), "train.loader_workers=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("plan:")  # the plan is printed before anything runs

    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiny"] and list(summary["models"]) == ["llava"]
    m = summary["models"]["llava"]
    assert m["backbone_file"] == "configs/backbones/llava-1.5-7b.yaml"
    assert m["checkpoint"]["layers"] == 2 and m["checkpoint"]["parameters"] > 0
    phases = {p["phase"]: p for p in m["phases"]}
    assert list(phases) == ["build", "full", "killed", "resume", "export"]
    for name, p in phases.items():
        assert p["rc"] == (-9 if name == "killed" else 0), (name, p)
        assert p["wall_s"] > 0 and p["host_peak_rss_gib"] > 0, (name, p)
    # killed inside task 1 (3 steps a task: its 2nd step), after a step checkpoint, and resumed from it
    assert phases["killed"]["kill_at"] == "train_step:5" and phases["killed"]["killed_as_asked"]
    assert phases["killed"]["lock_free_after_s"] is not None
    assert "after optimizer step" in (phases["resume"]["resumed_from"] or "")

    resume = m["resume"]
    assert resume["identical"] and resume["matrix_equal"] and resume["predictions_equal"]
    assert resume["tensors_bitwise_equal"] and resume["tensors_max_abs_diff"] == 0.0
    # the same, from the result files the script kept (not from its own comparison)
    runs = out / "runs" / "llava"
    full, resumed = (json.loads((runs / r / "results" / "matrix.json").read_text()) for r in ("full", "killed"))
    assert full["scores"] == resumed["scores"] and all(v is not None for v in full["scores"][-1])
    assert all(json.loads((runs / r / "results" / "metrics.json").read_text())["complete"] for r in ("full", "killed"))

    assert phases["export"]["written"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(phases["export"]["files"])
    assert phases["export"]["adapted_modules"] == 2 * 4  # q, k, v, o of the tiny LLM's 2 layers
    assert "resume: identical True" in (out / "summary.md").read_text()
    assert (out / "logs" / "llava-resume.log").is_file()
    assert not any(tmp_path.glob("cramcl-gpu-e2e-*"))  # the work directory (checkpoints, runs) is removed


def test_wait_for_lock_waits_while_another_process_holds_it(tmp_path):
    """A SIGKILLed run's forked DataLoader workers keep its run.lock flock for up to 5 s: the script waits for
    the lock before --resume (which would otherwise be refused as "in use") and records how long."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from _e2e_phases import wait_for_lock
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert wait_for_lock(tmp_path) == 0.0  # no lock file at all
    (tmp_path / "run.lock").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.5)",
                               str(tmp_path / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t = time.monotonic()
        waited = wait_for_lock(tmp_path)
        assert waited is not None and waited >= 0.5 and time.monotonic() - t < 10
        assert wait_for_lock(tmp_path, limit_s=5) == 0.0  # free now
    finally:
        holder.wait(timeout=30)
