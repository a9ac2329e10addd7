"""olora, moelora, replay, mtl, oracle-lora on a tiny random Llama (each method's invariants; for all: a bit-exact
save/load round trip, training after a load, evaluation without a task id), plus a quick 2-task stream."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import LogSink, assert_refused
from cramcl.config import resolve_config
from cramcl.data.records import Record
from cramcl.engine.runner import run_stream
from cramcl.methods import registry
from cramcl.methods.base import Phase, Services
from cramcl.methods.moelora import MoELora, MoELoraConfig
from cramcl.methods.mtl import MultiTask, MultiTaskConfig
from cramcl.methods.olora import OLora, OLoraConfig, olora_penalty
from cramcl.methods.oracle_lora import OracleLora, OracleLoraConfig
from cramcl.methods.replay import Replay, ReplayConfig, equal_quotas

torch.set_num_threads(1)  # the CI machine has 2 shared cores

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
HIDDEN, LAYERS, VOCAB = 32, 2, 50
BUILD = {"olora": (OLora, OLoraConfig), "moelora": (MoELora, MoELoraConfig), "replay": (Replay, ReplayConfig),
         "mtl": (MultiTask, MultiTaskConfig), "oracle-lora": (OracleLora, OracleLoraConfig)}
# registry entries, e.g. "olora": "cramcl.methods.olora:OLora:OLoraConfig"
REGISTRY = {name: f"{cls.__module__}:{cls.__name__}:{cfg.__name__}" for name, (cls, cfg) in BUILD.items()}


def make_tasks(n_tasks: int = 3, n: int = 10) -> list:
    return [SimpleNamespace(name=name, train=tuple(Record(f"{name}-{j}", Path(f"{j}.png"), "q", "a") for j in range(n)))
            for name in ["shape", "colour", "digits", "ocr", "scenes"][:n_tasks]]


def batch_of(records, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (len(records), 6), generator=g), "records": list(records)}


def build(name: str, **args):
    """The method set up on a tiny random Llama (the same weights every call) behind a minimal backbone."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    backbone = SimpleNamespace(model=model, language_model=model, num_layers=LAYERS,
                               model_inputs=lambda b: {"input_ids": b["input_ids"], "labels": b["input_ids"]})
    method = BUILD[name][0](BUILD[name][1](**args))
    method.setup(Services(backbone, SimpleNamespace(backbone=SimpleNamespace(targets=TARGETS), seed=0), log=print))
    return method, model.eval()


def train_stream(method, model, tasks, steps: int = 2, start: int = 0) -> None:
    model.train()  # the runner's lifecycle with a few Adam steps per task (no Accelerate)
    for t in range(start, len(tasks)):
        torch.manual_seed(100 + t)
        method.before_task(t, tasks[t])
        records = method.training_records(t, tasks[t], tasks)
        for phase in method.phases(t, steps):
            method.begin_phase(phase)
            opt = torch.optim.Adam(method.trainable_parameters(), lr=2e-2)  # refuses an empty list
            for s in range(phase.steps):
                batch = batch_of(records[:4], seed=10 * t + s)
                method.prepare_batch(batch, train=True)
                method.compute_loss(model, batch)[0].backward()
                opt.step()
                opt.zero_grad()
            method.end_phase(phase)
        method.after_task(t)
    model.eval()


@torch.no_grad()
def eval_logits(method, model, task_index=None):
    batch = batch_of(make_tasks(1)[0].train[:3], seed=7) | ({} if task_index is None else {"task_index": task_index})
    method.prepare_batch(batch, train=False)
    return model(input_ids=batch["input_ids"]).logits


@pytest.fixture
def registered(monkeypatch):
    for name, target in REGISTRY.items():
        monkeypatch.setitem(registry._METHODS, name, target)


def test_olora_penalty_matches_hand_computation():
    A_new = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    old1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # A_new old1^T = [[1, 2], [0, 0]] -> 3
    old2 = torch.tensor([[0.0, -1.0, 1.0]])  # A_new old2^T = [[-2], [3]] -> 5
    assert olora_penalty(A_new, [old1, old2]).item() == pytest.approx(8.0)
    assert olora_penalty(A_new, [old1]).item() == pytest.approx(3.0) and olora_penalty(A_new, []).item() == 0.0
    assert olora_penalty(A_new[:1], [torch.tensor([[0.0, 0.0, 1.0]])]).item() == 0.0  # orthogonal rows
    A, old = A_new.clone().requires_grad_(True), old2.clone().requires_grad_(True)
    olora_penalty(A, [old]).backward()
    assert A.grad is not None and old.grad is None  # only the new task's A is pushed


def test_olora_loss_adds_lambda1_times_penalty_and_keeps_old_loras_in_the_forward():
    method, model = build("olora")
    tasks = make_tasks(2)
    train_stream(method, model, tasks[:1])
    method.before_task(1, tasks[1])
    layer = method.layers["layers.1.v_proj"]
    assert layer.num_experts == 2 and not layer.experts_A[0].requires_grad and layer.experts_A[1].requires_grad
    batch = batch_of(tasks[1].train[:3], 1)
    method.prepare_batch(batch, train=True)
    loss, aux = method.compute_loss(model, batch)
    lm = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    energy = sum(olora_penalty(m.experts_A[1], [m.experts_A[0]]).item() for m in method.layers.values())
    assert energy > 0 and aux["orth"].item() == pytest.approx(0.5 * energy, rel=1e-5)
    assert loss.item() == pytest.approx(lm.item() + 0.5 * energy, rel=1e-5)
    with torch.no_grad():  # weight 1 for every task's LoRA (no routing)
        layer.experts_B[1].normal_()
        x = torch.randn(2, 5, HIDDEN)
        torch.testing.assert_close(layer(x), layer.base(x) + x @ (layer.expert_delta(0) + layer.expert_delta(1)).t())


def test_moelora_per_token_softmax_router_mixes_experts_and_everything_trains():
    method, model = build("moelora")
    layer, x = method.layers["layers.1.v_proj"], torch.randn(2, 5, HIDDEN)
    assert layer.ranks == [2, 2, 2, 2] and layer.expert_scales == [2.0] * 4  # r = 8 split in 4; alpha / r
    with torch.no_grad():
        w = method.context.route(layer, x)
        assert w.shape == (2, 5, 4) and torch.allclose(w.sum(-1), torch.ones(2, 5))
        torch.testing.assert_close(w, torch.softmax(x @ layer.moe_router.weight.t(), -1))
        assert (w > 0).all() and not torch.allclose(w[0, 0], w[0, 1])  # dense, and per token
    tasks = make_tasks(2)
    for t in range(2):  # every expert (A and B) and every router changes on every task
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "experts_" in n or "moe_router" in n}
        assert len(before) == LAYERS * len(TARGETS) * (2 * 4 + 1)
        train_stream(method, model, tasks[: t + 1], steps=3, start=t)
        changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
        assert changed == set(before), sorted(set(before) - changed)[:4]
    with torch.no_grad():  # the layer mixes its experts with the router's weights
        w = method.context.route(layer, x)
        want = layer.base(x) + sum(w[..., e:e + 1] * (x @ layer.expert_delta(e).t()) for e in range(4))
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
    n = 8 * (4 * 2 * (HIDDEN + HIDDEN) + 4 * HIDDEN)  # 8 linears x (4 rank-2 experts + a router)
    assert method.param_counts() == {"trainable": n, "stored": n, "active_per_sample": n}


@pytest.mark.parametrize("lambda1, value", [("original", 0.5), ("mcitlib", 0.05), (0.2, 0.2), (0.0, 0.0)])
def test_olora_lambda1_scales_the_penalty(lambda1, value):
    """The same state and batch: the aux loss ``orth`` is lambda1 x the energy (names resolve to 0.5 / 0.05)."""
    method, model = build("olora", lambda1=lambda1)
    tasks = make_tasks(2)
    train_stream(method, model, tasks[:1])
    method.before_task(1, tasks[1])
    batch = batch_of(tasks[1].train[:3], 1)
    method.prepare_batch(batch, train=True)
    loss, aux = method.compute_loss(model, batch)
    lm = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    energy = sum(olora_penalty(m.experts_A[1], [m.experts_A[0]]).item() for m in method.layers.values())
    assert energy > 0 and loss.item() == pytest.approx(lm.item() + value * energy, rel=1e-5)
    assert aux.get("orth", torch.tensor(0.0)).item() == pytest.approx(value * energy, rel=1e-5)


@pytest.mark.parametrize("override, message", [
    ("method.lambda1=-0.1", "method.lambda1: -0.1 must be a number >= 0 or one of original (0.5), mcitlib (0.05)"),
    ("method.lambda1=prism", "method.lambda1: 'prism' must be a number >= 0 or one of"),
])
def test_olora_lambda1_is_checked(override, message):
    assert_refused("olora", [override], message)


def test_replay_buffer_is_bounded_holds_only_earlier_tasks_and_survives_save_load():
    tasks = make_tasks(5)
    method = Replay(ReplayConfig(buffer=7))
    for t, task in enumerate(tasks):
        method.before_task(t, task)
        records = method.training_records(t, task, tasks)
        own, replayed = records[: len(task.train)], records[len(task.train):]
        assert own == list(task.train) and len(replayed) == (0 if t == 0 else 7) == method.buffer_size_now()
        assert {r.id.split("-")[0] for r in replayed} <= {x.name for x in tasks[:t]}  # earlier tasks only
        method.after_task(t)
        assert method.buffer_size_now() <= 7 and list(method.buffer) == [x.name for x in tasks[: t + 1]]
        assert [len(ids) for ids in method.buffer.values()] == equal_quotas(7, t + 1)  # per-task equal quota
        assert all(i.startswith(name + "-") and ids.count(i) == 1 for name, ids in method.buffer.items() for i in ids)
        if t == 2:  # a checkpoint: JSON meta, a fresh method, the records resolved from the stream later
            loaded, saved = Replay(ReplayConfig(buffer=7)), [i for ids in method.buffer.values() for i in ids]
            loaded.load_state(*(json.loads(json.dumps(part)) for part in method.state()))
    loaded.before_task(3, tasks[3])
    assert [r.id for r in loaded.training_records(3, tasks[3], tasks)] == [r.id for r in tasks[3].train] + saved
    for n, size in ((10, 1), (100, 8)):  # default: 2% of the stream's training records, at least 1
        default, stream = Replay(ReplayConfig()), make_tasks(4, n)
        default.training_records(0, stream[0], stream)
        assert default.capacity == size


@pytest.mark.parametrize("settings, replayed", [
    ({"buffer": 7}, 7), ({"buffer": 0.1}, 40), ({"buffer": "10%"}, 40), ({"buffer": 0.02}, 8), ({}, 8),
    ({"buffer": 1}, 1), ({"buffer": 0}, 0), ({"buffer": 0.0}, 0), ({"buffer": 500}, 300),  # capped by the data
    ({"buffer_size": 7}, 7), ({"buffer_fraction": 0.1}, 40),  # the older spelling still decides
])
def test_replay_buffer_setting_gives_the_number_of_replayed_records(settings, replayed):
    """4 tasks of 100 records: after three tasks, task 3 trains on its own 100 plus ``replayed`` buffered ones."""
    tasks = make_tasks(4, 100)
    method = Replay(ReplayConfig(**settings))
    for t, task in enumerate(tasks):
        method.before_task(t, task)
        records = method.training_records(t, task, tasks)
        if t < 3:
            method.after_task(t)
    assert len(records) - len(tasks[3].train) == replayed == method.buffer_size_now()


@pytest.mark.parametrize("override, message", [
    ("method.buffer=1.5", "method.buffer: 1.5 is neither a fraction of the stream below 1 nor a whole number"),
    ("method.buffer=2.0", "method.buffer: 2.0 is ambiguous: write 2 for that many records or a fraction below 1"),
    ("method.buffer=-3", "method.buffer: -3 must be >= 0"),
    ("method.buffer=lots", "method.buffer: 'lots' is neither a fraction"),
    ("method.buffer=150%", "method.buffer: '150%' is neither a fraction"),
    ("method.buffer_size=-1", "method.buffer_size: -1 must be >= 0"),
])
def test_replay_buffer_setting_is_checked(override, message):
    assert_refused("replay", [override], message)
    assert_refused("replay", ["method.buffer=0.1", "method.buffer_size=7"], "set only buffer")


def test_mtl_trains_once_on_every_task_then_nothing():
    tasks = make_tasks(3)
    method, _ = build("mtl")
    for t, task in enumerate(tasks):
        method.before_task(t, task)
        records = method.training_records(t, task, tasks)
        if t == 0:  # the union of every task's records, steps_per_task x tasks steps
            assert sorted(r.id for r in records) == sorted(r.id for x in tasks for r in x.train)
            assert method.phases(0, 5) == [Phase("joint", 15)] and method.trainable_parameters()
        else:
            assert records == [] and method.phases(t, 5) == [] and method.trainable_parameters() == []
        method.after_task(t)


def test_oracle_lora_routes_by_the_true_task_id_and_declares_it():
    assert [n for n, (cls, _) in BUILD.items() if cls.uses_task_id_at_eval] == ["oracle-lora"]
    method, model = build("oracle-lora")
    tasks = make_tasks(3)
    train_stream(method, model, tasks[:2])
    layer, x = method.layers["layers.1.v_proj"], torch.randn(3, 4, HIDDEN)
    with torch.no_grad():
        for task in (0, 1):
            method.prepare_batch({"task_index": task, "records": []}, train=False)
            torch.testing.assert_close(method.context.route(layer, x), F.one_hot(torch.tensor([task] * 3), 2).float())
            torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.expert_delta(task).t())
        method.prepare_batch({"task_index": torch.tensor([1, 0, 1]), "records": []}, train=False)  # per sample
        torch.testing.assert_close(method.context.route(layer, x), F.one_hot(torch.tensor([1, 0, 1]), 2).float())
    assert not torch.allclose(eval_logits(method, model, 0), eval_logits(method, model, 1))
    method.before_task(2, tasks[2])  # training is isolated: one-hot on the current task
    method.prepare_batch(batch_of(tasks[2].train[:2], 0), train=True)
    torch.testing.assert_close(method.context.route(layer, x), F.one_hot(torch.tensor([2] * 3), 3).float())
    assert method.param_counts()["active_per_sample"] == 8 * 8 * (HIDDEN + HIDDEN)  # one rank-8 LoRA


@pytest.mark.parametrize("name", list(BUILD))
def test_round_trip_identical_outputs_training_continues_eval_without_task_id(name, tmp_path, registered):
    assert resolve_config(method=name, profile="quick").method_args == dataclasses.asdict(BUILD[name][1]())  # yaml
    tasks, args = make_tasks(3), ({"buffer": 4} if name == "replay" else {})
    method, model = build(name, **args)
    train_stream(method, model, tasks[:2])
    task_index = 1 if method.uses_task_id_at_eval else None
    trained = eval_logits(method, model, task_index)
    if name == "oracle-lora":  # evaluation needs no task id, except for the oracle
        with pytest.raises(RuntimeError, match="task id"):
            eval_logits(method, model)
    else:
        assert torch.isfinite(eval_logits(method, model)).all()
    tensors, meta = method.state()  # as the checkpoint stores them: safetensors + JSON
    save_file(tensors, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps(meta))
    fresh, fresh_model = build(name, **args)
    assert not torch.allclose(eval_logits(fresh, fresh_model, None if task_index is None else 0), trained)
    fresh.load_state(load_file(str(tmp_path / "m.safetensors")), json.loads((tmp_path / "m.json").read_text()))
    torch.testing.assert_close(eval_logits(fresh, fresh_model, task_index), trained, rtol=0, atol=0)
    assert fresh.param_counts() == method.param_counts() and fresh.task_names == ["shape", "colour"]
    # a resumed run trains the next task; that changes the outputs except for mtl (trained once, at task 0)
    # and oracle-lora on task 1 (isolation: task 2 trains its own LoRA)
    train_stream(fresh, fresh_model, tasks, start=2)
    unchanged = bool((eval_logits(fresh, fresh_model, task_index) == trained).all())
    assert unchanged == (name in ("mtl", "oracle-lora"))


@pytest.mark.parametrize("name", ["replay", "mtl"])
def test_quick_stream_end_to_end(name, registered, tmp_path):
    cfg = resolve_config(method=name, profile="quick", overrides=["data.tasks=shape,colour", "train.steps_per_task=4"])
    result = run_stream(cfg, tmp_path / "run", log=LogSink())
    scores = result["scores"]
    assert result["tasks"] == ["shape", "colour"] and scores[0][1] is None
    assert all(isinstance(scores[t][i], float) and math.isfinite(scores[t][i]) for t in range(2) for i in range(t + 1))
    ckpt = tmp_path / "run" / "checkpoints"
    runner, meta0 = (json.loads((ckpt / f).read_text()) for f in ("task_1/runner.json", "task_0/method.json"))
    if name == "mtl":
        assert runner["trainable_per_task"][1] == 0 and scores[1][0] == scores[0][0]  # one joint model
    else:
        [(task, ids)] = meta0["replay"]["buffer"]  # after task 0: only task 0's records, 2% of 2 x 96 = 4
        assert meta0["replay"]["capacity"] == 4 and task == "shape" and all(i.startswith("shape-") for i in ids)
