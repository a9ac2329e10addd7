"""Step checkpoints and mid-task resume, in process (an exception at a kill point stands in for SIGKILL;
tests/test_fault_injection.py does the real kill): each thing a step checkpoint restores (optimizer state, RNG
states, data position, lr position, the method's phase state) has a test that fails without it, and a
damaged or stale step checkpoint is reported and ignored."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import LogSink, quick_config

torch.set_num_threads(1)


class Interrupted(Exception):
    pass


def _interrupt_at(monkeypatch, point: str, nth: int) -> None:
    """Raise :class:`Interrupted` the ``nth`` time the trainer reaches ``point`` (an in-process kill)."""
    import cramcl.engine.trainer as trainer

    hits = []

    def kill_point(name):
        if name == point:
            hits.append(1)
            if len(hits) == nth:
                raise Interrupted(f"{point}:{nth}")

    monkeypatch.setattr(trainer, "kill_point", kill_point)


def _state(run):
    return (load_file(str(run / "checkpoints/task_2/method.safetensors")),
            (run / "checkpoints/task_2/method.json").read_text(), (run / "results/matrix.json").read_text())


def _same_end(out, reference) -> bool:
    (a, meta_a, m_a), (b, meta_b, m_b) = _state(out), _state(reference)
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a) and meta_a == meta_b and m_a == m_b


def _interrupted_then_resumed(tmp_path, monkeypatch, method, extra, point, nth):
    from cramcl.engine.runner import run_stream

    out = tmp_path / "run"
    _interrupt_at(monkeypatch, point, nth)
    with pytest.raises(Interrupted):
        run_stream(quick_config(method, extra=extra), out, log=LogSink())
    monkeypatch.undo()
    assert (out / "checkpoints" / "step" / "manifest.json").exists()
    log = LogSink()
    run_stream(None, out, resume=True, log=log)
    return out, log.lines


# ------------------------------------------------------------------ pure pieces
def test_optimizer_state_round_trips_through_tensors_and_json():
    from cramcl.engine.step_checkpoint import flatten_optimizer_state, unflatten_optimizer_state

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)
    for _ in range(3):
        sum((p ** 2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    assert set(tensors) == {f"optim.{i}.{n}" for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")}
    meta = json.loads(json.dumps(meta))  # it is stored as JSON
    fresh = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)
    fresh.load_state_dict(unflatten_optimizer_state(tensors, meta))
    for i, p in enumerate(params):
        for name, value in opt.state[p].items():
            assert torch.equal(fresh.state[p][name], value), (i, name)


def test_rng_states_round_trip():
    from cramcl.engine.step_checkpoint import capture_rng, restore_rng

    tensors, meta = capture_rng()
    meta = json.loads(json.dumps(meta))
    want = (torch.rand(4), random.random())
    torch.manual_seed(123), random.seed(5)
    restore_rng(tensors, meta)
    got = (torch.rand(4), random.random())
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_step_checkpoint_every_is_checked_and_force_safe(tmp_path):
    from cramcl.config import resolve_config
    from cramcl.engine.resume_check import FORCE_SAFE
    from cramcl.errors import BadInputError

    assert resolve_config(method="lora-ft", profile="quick").train.step_checkpoint_every == 4
    assert resolve_config(method="lora-ft", profile="default").train.step_checkpoint_every == 25
    with pytest.raises(BadInputError, match=r"train.step_checkpoint_every: -1 must be >= 0"):
        resolve_config(method="lora-ft", profile="quick", overrides=["train.step_checkpoint_every=-1"])
    assert "train.step_checkpoint_every" in FORCE_SAFE  # where checkpoints land never changes what trains


# ------------------------------------------------------------------ what a step checkpoint must restore
# lora-ft, 6 steps a task, a checkpoint every 2: interrupted after task 1's step 4 (the 5th checkpoint).
# CRAM (2 warm-up + 4 stable steps) with a checkpoint every step: interrupted after task 0's first warm-up step,
# so c_buf's running sums (phase_state) and the warm-up's optimizer state must come back.
CASES = {"lora-ft": ("lora-ft", ["train.step_checkpoint_every=2"], "step_checkpoint_done", 5),
         "cram-warmup": ("cram", ["train.step_checkpoint_every=1"], "step_checkpoint_done", 1)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_interrupted_mid_task_ends_bit_identical(case, finished_run, cram_run, tmp_path, monkeypatch):
    method, extra, point, nth = CASES[case]
    out, log = _interrupted_then_resumed(tmp_path, monkeypatch, method, extra, point, nth)
    assert any("after optimizer step" in line and "from checkpoints/step" in line for line in log), log
    assert _same_end(out, finished_run if method == "lora-ft" else cram_run)


# CRAM with the standardized metric and its own centroid lr (two optimizer groups): interrupted in task 0's
# warm-up (the square sums must come back) or in its stable phase (both groups' Adam state and lr must).
ROUTING_EXTRA = ["train.step_checkpoint_every=1", "method.routing_metric=standardized", "method.centroid_lr=5e-4"]


@pytest.fixture(scope="module")
def routing_reference(tmp_path_factory, warm_cache):
    from cramcl.engine.runner import run_stream

    out = tmp_path_factory.mktemp("routing-ref") / "run"
    run_stream(quick_config("cram", extra=ROUTING_EXTRA), out, log=LogSink())
    return out


@pytest.mark.parametrize("nth", [1, 4], ids=["warmup", "stable"])
def test_standardized_metric_and_centroid_lr_resume_bit_identical(routing_reference, nth, tmp_path, monkeypatch):
    out, log = _interrupted_then_resumed(tmp_path, monkeypatch, "cram", ROUTING_EXTRA, "step_checkpoint_done", nth)
    assert any("after optimizer step" in line and "from checkpoints/step" in line for line in log), log
    assert any(k.startswith("cram.expert_variance.") for k in _state(routing_reference)[0])
    assert _same_end(out, routing_reference)


def test_a_damaged_step_checkpoint_is_reported_and_the_task_restarts(finished_run, tmp_path, monkeypatch):
    from cramcl.engine.runner import run_stream

    out = tmp_path / "run"
    _interrupt_at(monkeypatch, "step_checkpoint_done", 5)
    with pytest.raises(Interrupted):
        run_stream(quick_config(extra=["train.step_checkpoint_every=2"]), out, log=LogSink())
    monkeypatch.undo()
    f = out / "checkpoints" / "step" / "trainer.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    log = LogSink()
    run_stream(None, out, resume=True, log=log)
    assert any("step checkpoint not usable" in line and "trainer.safetensors" in line and "truncated" in line
               and "task 1 restarts from its first step" in line for line in log.lines), log.lines
    assert not any("after optimizer step" in line for line in log.lines)
    assert _same_end(out, finished_run)


def test_a_step_checkpoint_of_a_finished_task_is_ignored(finished_run, tmp_path, monkeypatch):
    """Killed after task 1's checkpoint landed but before its step checkpoint was deleted: resume continues
    with task 2 from its first step and removes the stale one."""
    import shutil

    from cramcl.engine.runner import run_stream

    out = tmp_path / "run"
    _interrupt_at(monkeypatch, "step_checkpoint_done", 5)
    with pytest.raises(Interrupted):
        run_stream(quick_config(extra=["train.step_checkpoint_every=2"]), out, log=LogSink())
    monkeypatch.undo()
    shutil.copytree(finished_run / "checkpoints" / "task_1", out / "checkpoints" / "task_1")
    log = LogSink()
    run_stream(None, out, resume=True, log=log)
    assert any("step checkpoint of task 1 ignored" in line for line in log.lines), log.lines
    assert _same_end(out, finished_run)


def test_a_method_without_mid_task_resume_gets_no_step_checkpoints(tmp_path):
    from cramcl.engine.runner import step_checkpointer
    from cramcl.methods.base import Method
    from cramcl.methods.cram import Cram
    from cramcl.methods.lora_ft import LoraFT

    class Accel:
        is_main_process = True

    assert not Method.mid_task_resume  # opt-in: a user method's unsaved statistics would be lost otherwise
    assert step_checkpointer(Accel(), Method(None), tmp_path, 0, "t", print) is None
    assert LoraFT.mid_task_resume and Cram.mid_task_resume


def test_a_pending_non_finite_value_is_never_step_checkpointed(tmp_path, warm_cache):
    """lr 1e6 diverges at once; with logging far away, the check before the first step checkpoint stops the
    run, naming the first bad step and what was not finite (not a weight found later)."""
    from cramcl.engine.runner import run_stream
    from cramcl.errors import TrainingFault

    out = tmp_path / "nan"
    with pytest.raises(TrainingFault, match=r"task 0 \('shape'\), optimizer step \d+ \(train phase\): the "
                                            r"(loss|gradient norm) is not finite"):
        run_stream(quick_config(extra=["train.lr=1e6", "train.log_every=1000", "train.step_checkpoint_every=3"]),
                   out, log=LogSink())
    assert not (out / "checkpoints").exists()
