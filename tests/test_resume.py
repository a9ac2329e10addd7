"""End to end on the quick profile (lora-ft, 3 tasks, 6 steps a task): the run directory's contract, an
interrupted + resumed run that ends exactly like an uninterrupted one, and zero-shot."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cramcl.config import config_from_dict
from cramcl.engine.runner import run_stream
from cramcl.eval.metrics import continual_metrics, json_safe

from conftest import QUICK_TASKS, LogSink, quick_config

N_TEST = 32  # quick profile: builtin_n_test
METRIC_KEYS = ("MFT", "MFN", "MAA", "BWT", "forgetting")


def read_json(path: Path):
    return json.loads(path.read_text())


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def close(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, abs_tol=1e-9))


# ------------------------------------------------------------------ (d) the run directory
def test_run_dir_has_config_and_env(finished_run):
    cfg = quick_config()
    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert config_from_dict(saved) == cfg  # fully resolved, and it round-trips
    assert saved["method"] == "lora-ft" and saved["profile"] == "quick"
    assert saved["train"]["steps_per_task"] == 6 and saved["data"]["tasks"] == list(QUICK_TASKS)
    env = read_json(finished_run / "env.json")
    assert env["world_size"] == 1
    assert env["global_batch_size"] == cfg.train.batch_size * cfg.train.grad_accum == 16
    assert env["device"].split(":")[0] in ("cpu", "cuda", "mps")
    assert env["benchmark"]["tasks"] == list(QUICK_TASKS)
    for pkg in ("torch", "transformers", "accelerate", "safetensors"):
        assert env["versions"][pkg]
        assert any(p.lower().startswith(f"{pkg}==") for p in env["packages"]), pkg  # every installed package
    assert env["git_commit"] is None or len(env["git_commit"].split("+")[0]) == 40


def test_matrix_json_matches_the_contract(finished_run):
    matrix = read_json(finished_run / "results" / "matrix.json")
    assert set(matrix) == {"method", "tasks", "scores", "scorers"}
    assert matrix["method"] == "lora-ft"
    assert matrix["tasks"] == list(QUICK_TASKS)
    assert matrix["scorers"] == {"shape": "exact", "colour": "exact", "ocr": "exact"}
    scores = matrix["scores"]
    assert len(scores) == 3 and all(len(row) == 3 for row in scores)
    for t in range(3):
        for i in range(3):
            if i <= t:
                assert isinstance(scores[t][i], float) and 0.0 <= scores[t][i] <= 100.0
            else:
                assert scores[t][i] is None  # not evaluated (task not seen yet)


def test_scores_are_the_mean_of_the_prediction_files(finished_run):
    matrix = read_json(finished_run / "results" / "matrix.json")
    pred_root = finished_run / "results" / "predictions"
    assert sorted(p.name for p in pred_root.iterdir()) == ["after_0", "after_1", "after_2"]
    for t in range(3):
        files = sorted(p.name for p in (pred_root / f"after_{t}").iterdir())
        assert files == sorted(f"{name}.jsonl" for name in QUICK_TASKS[: t + 1])
        for i, name in enumerate(QUICK_TASKS[: t + 1]):
            rows = [json.loads(line) for line in (pred_root / f"after_{t}" / f"{name}.jsonl").read_text().splitlines()]
            assert len(rows) == N_TEST
            assert all(set(row) == {"id", "prediction", "reference", "score"} for row in rows)
            assert all(isinstance(row["prediction"], str) and isinstance(row["reference"], str) for row in rows)
            assert len({row["id"] for row in rows}) == N_TEST
            assert all(row["id"].startswith(f"{name}-test-") for row in rows)
            mean = sum(row["score"] for row in rows) / len(rows)
            assert matrix["scores"][t][i] == pytest.approx(mean, abs=1e-3)


def test_metrics_json_matches_the_contract(finished_run):
    matrix = read_json(finished_run / "results" / "matrix.json")
    metrics = read_json(finished_run / "results" / "metrics.json")
    for key in (*METRIC_KEYS, "params", "time_s"):
        assert key in metrics
    want = json_safe(continual_metrics(matrix["scores"]))
    for key in METRIC_KEYS:
        assert close(metrics[key], want[key]), key
    params = metrics["params"]
    # one rank-8 LoRA on q, k, v, o of 4 layers of hidden size 256: 16 * 8 * (256 + 256)
    assert params == {"trainable_per_task": [65536] * 3, "stored_total": 65536, "active_per_sample": 65536}
    assert len(metrics["time_s"]["train_per_task"]) == 3 and len(metrics["time_s"]["eval_per_task"]) == 3
    assert metrics["complete"] is True and metrics["uses_task_id_at_eval"] is False


def test_checkpoints_are_safetensors_and_json_only(finished_run):
    root = finished_run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["task_0", "task_1", "task_2"]
    for t in range(3):
        ckpt = root / f"task_{t}"
        assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "method.json", "method.safetensors",
                                                          "runner.json", "settings.json"]
        tensors = load_file(str(ckpt / "method.safetensors"))
        assert len(tensors) == 4 * 4 * 2  # layers x projections x (A, B)
        assert tensors["layers.3.o_proj.expert.0.A"].shape == (8, 256)
        assert tensors["layers.0.q_proj.expert.0.B"].shape == (256, 8)
        meta = read_json(ckpt / "method.json")
        assert meta["task_names"] == list(QUICK_TASKS[: t + 1])
        runner = read_json(ckpt / "runner.json")
        assert runner["scores"] == read_json(finished_run / "results" / "matrix.json")["scores"][: t + 1] + \
            [[None] * 3] * (2 - t)
    # each task changed the LoRA
    last = [load_file(str(root / f"task_{t}" / "method.safetensors")) for t in range(3)]
    assert not torch.equal(last[0]["layers.0.q_proj.expert.0.B"], last[1]["layers.0.q_proj.expert.0.B"])


def test_report_and_plots(finished_run):
    report = (finished_run / "report.md").read_text()
    assert report.startswith("# lora-ft")
    assert "![accuracy matrix](matrix.png)" in report and "![scores along the stream](curves.png)" in report
    for png in ("matrix.png", "curves.png"):
        data = (finished_run / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# ------------------------------------------------------------------ (b) + (c) interrupted, then resumed
@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, finished_run):
    """Stop after task 0 (as if killed right after its checkpoint), leave a half-written checkpoint of task 1
    behind, then resume with only the directory."""
    out = tmp_path_factory.mktemp("resumed") / "run"
    first = run_stream(quick_config(), out, stop_after_task=0, log=LogSink())
    interrupted = {"returned": first, "matrix": read_json(out / "results" / "matrix.json"),
                   "metrics": read_json(out / "results" / "metrics.json"),
                   "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir())}
    half = out / "checkpoints" / ".task_1.tmp999999"
    half.mkdir()
    (half / "method.safetensors").write_bytes(b"\x00garbage, not a safetensors file")
    (half / "runner.json").write_text('{"tasks": ["sha')
    log = LogSink()
    final = run_stream(None, out, resume=True, log=log)
    return {"out": out, "final": final, "log": log.lines, "interrupted": interrupted, "half": half}


def test_interrupted_run_left_a_consistent_partial_run(resumed_run, finished_run):
    got = resumed_run["interrupted"]
    assert got["checkpoints"] == ["task_0"]
    scores = got["matrix"]["scores"]
    assert scores[1:] == [[None, None, None], [None, None, None]]
    full = read_json(finished_run / "results" / "matrix.json")["scores"]
    assert scores[0] == full[0]
    assert got["returned"]["scores"] == scores
    assert got["metrics"]["complete"] is False


def test_resume_ends_with_exactly_the_uninterrupted_matrix(resumed_run, finished_run):
    out = resumed_run["out"]
    want = read_json(finished_run / "results" / "matrix.json")
    assert read_json(out / "results" / "matrix.json") == want
    assert (out / "results" / "matrix.json").read_bytes() == (finished_run / "results" / "matrix.json").read_bytes()
    assert resumed_run["final"] == want
    got_m, want_m = read_json(out / "results" / "metrics.json"), read_json(finished_run / "results" / "metrics.json")
    for key in (*METRIC_KEYS, "params", "complete"):
        assert got_m[key] == want_m[key], key


def test_resume_writes_identical_predictions_and_checkpoints(resumed_run, finished_run):
    out = resumed_run["out"]
    got = files_under(out / "results" / "predictions")
    want = files_under(finished_run / "results" / "predictions")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    a = load_file(str(out / "checkpoints" / "task_2" / "method.safetensors"))
    b = load_file(str(finished_run / "checkpoints" / "task_2" / "method.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_ignores_a_half_written_checkpoint(resumed_run):
    out = resumed_run["out"]
    assert any("resuming after task 0 (shape)" in line for line in resumed_run["log"]), resumed_run["log"]
    trained = [line for line in resumed_run["log"] if "training on" in line]
    assert len(trained) == 2 and "'colour'" in trained[0] and "'ocr'" in trained[1]  # task 0 not redone
    finished = sorted(p.name for p in (out / "checkpoints").iterdir() if re.fullmatch(r"task_\d+", p.name))
    assert finished == ["task_0", "task_1", "task_2"]
    assert (out / "checkpoints" / "task_1" / "method.safetensors").read_bytes()[:1] != b"\x00"


def test_half_written_checkpoint_alone_is_ignored(finished_run, tmp_path):
    """With only a partial task_0 on disk, resume has nothing finished to continue from: it starts at task 0
    and (reading the directory listing only) never opens the half-written files."""
    from cramcl.engine.checkpoint import last_checkpoint

    out = tmp_path / "run"
    (out / "checkpoints" / ".task_0.tmp123").mkdir(parents=True)
    (out / "checkpoints" / ".task_0.tmp123" / "runner.json").write_text("{")
    assert last_checkpoint(out) is None
    shutil.copytree(finished_run / "checkpoints" / "task_1", out / "checkpoints" / "task_1")
    (out / "checkpoints" / ".task_2.tmp5").mkdir()
    (out / "checkpoints" / "task_9.old").mkdir()
    assert last_checkpoint(out) == out / "checkpoints" / "task_1"


# ------------------------------------------------------------------ results must not depend on the cache state
def test_results_do_not_depend_on_whether_the_base_stage_was_cached(tmp_path, monkeypatch, warm_cache):
    """The first run on a machine trains and caches the base stage; later runs load it. The method's fresh
    adapters (and so every score) must be the same either way."""
    from cramcl.engine.session import open_session

    cache = tmp_path / "cache"
    cache.mkdir()
    for sub in ("builtin", "features"):  # reuse the generated stream and image features, not the base stage
        (cache / sub).symlink_to(warm_cache / sub, target_is_directory=True)
    monkeypatch.setenv("CRAMCL_CACHE", str(cache))
    cfg = quick_config(extra=["backbone.base_steps=2"])
    states = []
    for attempt in range(2):
        session = open_session(cfg, tmp_path / f"run{attempt}", log=LogSink())
        states.append(session.method.state()[0])
        assert len(list((cache / "base").iterdir())) == 1  # attempt 0 trained it, attempt 1 loaded it
    assert set(states[0]) == set(states[1])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


# ------------------------------------------------------------------ zero-shot
def test_zero_shot_runs_and_produces_a_matrix(tmp_path, warm_cache):
    out = tmp_path / "zs"
    matrix = run_stream(quick_config("zero-shot"), out, log=LogSink())
    saved = read_json(out / "results" / "matrix.json")
    assert saved == matrix
    assert saved["method"] == "zero-shot" and saved["tasks"] == list(QUICK_TASKS)
    scores = saved["scores"]
    for t in range(3):
        for i in range(3):
            if i > t:
                assert scores[t][i] is None
            else:
                assert scores[t][i] == scores[i][i]  # nothing trains: a task's score never moves
    # and the predictions are the same after every task
    pred = out / "results" / "predictions"
    for name in QUICK_TASKS:
        first = QUICK_TASKS.index(name)
        texts = {(pred / f"after_{t}" / f"{name}.jsonl").read_bytes() for t in range(first, 3)}
        assert len(texts) == 1
    metrics = read_json(out / "results" / "metrics.json")
    assert metrics["params"] == {"trainable_per_task": [0, 0, 0], "stored_total": 0, "active_per_sample": 0}
    assert metrics["BWT"] == 0.0 and metrics["forgetting"] == 0.0
    assert (out / "report.md").exists() and (out / "matrix.png").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["task_0", "task_1", "task_2"]
