"""routing-cl (PHATGOOSE-style): the phase split, gate training that moves only the gate vectors, the gated
forward, per-token top-k routing against its formula, a bit-exact save/load round trip, evaluation without a
task id, and one end-to-end quick run."""
from __future__ import annotations

import torch

torch.set_num_threads(1)

import json  # noqa: E402
import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
from conftest import assert_refused  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from cramcl.methods.base import Phase, Services  # noqa: E402
from cramcl.methods.routing_cl_gates import gate_scores, token_topk_routing  # noqa: E402
from cramcl.methods.routing_cl import RoutingCL, RoutingCLConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
HIDDEN, LAYERS, VOCAB = 32, 2, 50


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def make_method(seed: int = 0, **cfg) -> tuple[RoutingCL, LlamaForCausalLM]:
    model = tiny_model(seed)
    backbone = SimpleNamespace(language_model=model, num_layers=LAYERS, model=model)
    run_config = SimpleNamespace(backbone=SimpleNamespace(targets=TARGETS))
    method = RoutingCL(RoutingCLConfig(**{"dropout": 0.0, **cfg}))
    method.setup(Services(backbone=backbone, run_config=run_config, log=lambda *a: None))
    return method, model


@torch.no_grad()
def pretend_trained(method: RoutingCL, t: int, seed: int) -> None:
    """Give expert t and its gates random values, as if both phases had trained."""
    g = torch.Generator().manual_seed(seed)
    for key, layer in method.layers.items():
        layer.experts_A[t].copy_(torch.randn(layer.experts_A[t].shape, generator=g) * 0.3)
        layer.experts_B[t].copy_(torch.randn(layer.experts_B[t].shape, generator=g) * 0.3)
        method.gates[key][t].copy_(torch.randn(layer.in_features, generator=g))


def run_tasks(method: RoutingCL, n: int, seed: int = 0) -> None:
    for t in range(n):
        method.before_task(t, SimpleNamespace(name=f"task{t}", train=[]))
        pretend_trained(method, t, seed + t)
        method.after_task(t)


def ids(batch: int = 3, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def ln(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + eps)


# ------------------------------------------------------------------ phases
def test_gate_phase_is_capped_and_comes_out_of_the_budget():
    m = RoutingCL(RoutingCLConfig(gate_budget="ours"))
    assert m.phases(0, 6) == [Phase("expert", 4), Phase("gates", 2, lr=1e-3)]  # ceil(0.2 * 6) = 2
    assert m.phases(0, 100) == [Phase("expert", 80), Phase("gates", 20, lr=1e-3)]
    assert m.phases(0, 2000) == [Phase("expert", 1900), Phase("gates", 100, lr=1e-3)]  # gate_steps = 100
    assert RoutingCL(RoutingCLConfig(gate_budget="ours", gate_fraction=None)).phases(0, 50) == \
        [Phase("expert", 1), Phase("gates", 49, lr=1e-3)]
    assert RoutingCL(RoutingCLConfig(gate_budget="ours", gate_steps=0)).phases(0, 50) == [Phase("expert", 50)]
    assert RoutingCL(RoutingCLConfig(gate_budget="ours", gate_lr=2e-3)).phases(0, 10) == \
        [Phase("expert", 8), Phase("gates", 2, lr=2e-3)]  # gate_lr acts on our budget too
    assert m.phases(0, 1) == [Phase("expert", 1)]


def test_phatgoose_budget_leaves_the_whole_task_budget_to_the_expert():
    m = RoutingCL(RoutingCLConfig())  # the method file's default: PHATGOOSE's budget
    assert m.gate == {"steps": 100, "lr": 5e-3, "accum": 32, "placement": "after"}
    assert m.phases(0, 100) == [Phase("expert", 100)]  # the gates train after it, in addition
    assert RoutingCL(RoutingCLConfig(gate_steps=7, gate_lr=1e-2, gate_accum=4)).gate == \
        {"steps": 7, "lr": 1e-2, "accum": 4, "placement": "after"}
    assert RoutingCL(RoutingCLConfig(gate_budget="ours")).gate == {"steps": 100, "lr": 1e-3, "accum": 1,
                                                                   "placement": "within"}


class CountingBackbone(SimpleNamespace):
    """collate / model_inputs of a token-only backbone that counts the records it collates."""

    def collate(self, records, train=True):
        self.collated.append(len(records))
        x = torch.stack([torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(r.seed))
                         for r in records])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "records": records}

    def model_inputs(self, batch):
        return {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}


@pytest.mark.parametrize("steps, accum, lr", [(3, 2, 5e-3), (2, 5, 1e-2)])
def test_phatgoose_gates_train_for_the_given_steps_after_the_expert(steps, accum, lr, monkeypatch):
    model = tiny_model()
    backbone = CountingBackbone(language_model=model, num_layers=LAYERS, model=model, collated=[])
    train = SimpleNamespace(batch_size=4, warmup_ratio=0.0, grad_clip=1.0, nonfinite="stop")
    method = RoutingCL(RoutingCLConfig(dropout=0.0, gate_steps=steps, gate_accum=accum, gate_lr=lr))
    method.setup(Services(backbone=backbone, run_config=SimpleNamespace(backbone=SimpleNamespace(targets=TARGETS),
                                                                        train=train, seed=0), log=lambda *a: None))
    task = SimpleNamespace(name="task0", train=[SimpleNamespace(id=f"r{i}", seed=i) for i in range(10)])
    method.before_task(0, task)
    assert method.training_records(0, task, [task]) == task.train
    pretend_trained(method, 0, seed=3)
    with torch.no_grad():
        for gs in method.gates.values():
            gs[0].zero_()
    experts = {k: (l.experts_A[0].clone(), l.experts_B[0].clone()) for k, l in method.layers.items()}
    lrs = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: (lrs.append(self.param_groups[0]["lr"]), real_step(self, *a, **k))[1])
    method.after_task(0)  # the runner calls it right after the trainer's expert steps
    assert lrs == [lr] * steps  # one AdamW step per gate step, constant lr (no warm-up here)
    assert backbone.collated == [4] * (steps * accum)  # accum micro-batches of train.batch_size per step
    assert method.gate_log == [{"task": 0, "steps": steps, "micro_batches": steps * accum, "accum": accum, "lr": lr,
                                "final_loss": method.gate_log[0]["final_loss"]}]
    for key, layer in method.layers.items():
        assert not torch.equal(method.gates[key][0], torch.zeros_like(method.gates[key][0])), key  # gates moved
        assert torch.equal(layer.experts_A[0], experts[key][0]) and torch.equal(layer.experts_B[0], experts[key][1])
        assert not method.gates[key][0].requires_grad  # frozen for good after the task


@pytest.mark.parametrize("override, message", [
    ("method.gate_budget=fast", "method.gate_budget: 'fast' must be one of phatgoose, ours"),
    ("method.gate_accum=0", "method.gate_accum: 0 must be null or >= 1"),
    ("method.gate_lr=0", "method.gate_lr: 0.0 must be null or > 0"),
    ("method.gate_steps=-1", "method.gate_steps: -1 must be null or >= 0"),
    ("method.gate_accum=4", "method.gate_accum: 4 needs gate_budget: phatgoose"),  # quick profile: ours
])
def test_routing_cl_gate_settings_are_checked(override, message):
    assert_refused("routing-cl", [override], message)


# ------------------------------------------------------------------ gate training
def test_gate_training_changes_only_the_current_gate_vectors():
    method, model = make_method()
    run_tasks(method, 1)
    method.before_task(1, SimpleNamespace(name="task1", train=[]))
    pretend_trained(method, 1, seed=5)
    with torch.no_grad():
        for gs in method.gates.values():
            gs[1].zero_()  # the gate phase starts from zeros
    method.begin_phase(Phase("gates", 1, lr=1e-3))
    params = method.trainable_parameters()
    assert {id(p) for p in params} == {id(gs[1]) for gs in method.gates.values()}
    before_model = {k: v.clone() for k, v in model.state_dict().items()}  # base and every expert
    before_gates = {k: [g.detach().clone() for g in gs] for k, gs in method.gates.items()}
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    x = ids()
    model.train()
    method.prepare_batch({"input_ids": x, "attention_mask": torch.ones_like(x)}, train=True)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    after = model.state_dict()
    for k, v in before_model.items():
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for p in model.parameters())  # nothing of the model even got a gradient
    for key, gs in method.gates.items():
        assert torch.equal(gs[0], before_gates[key][0]), key  # the earlier task's gate is frozen
        assert not torch.equal(gs[1], before_gates[key][1]), key  # the current one moved


def test_gated_forward_uses_only_the_current_expert():
    method, _ = make_method()
    run_tasks(method, 1)
    method.before_task(1, SimpleNamespace(name="task1", train=[]))
    pretend_trained(method, 1, seed=7)
    method.begin_phase(Phase("gates", 1, lr=1e-3))
    method.prepare_batch({}, train=True)
    layer = method.layers["layers.1.v_proj"]
    x = torch.randn(2, 5, HIDDEN)
    v, s = method.gates[layer.key][1], layer.expert_scales[1]
    with torch.no_grad():
        want = layer.base(x) + torch.sigmoid(x @ v)[..., None] * s * (x @ layer.experts_A[1].T) @ layer.experts_B[1].T
        assert torch.allclose(layer(x), want, atol=1e-5)


# ------------------------------------------------------------------ top-k routing
def test_token_topk_routing_matches_the_formula():
    g = torch.Generator().manual_seed(3)
    d, K = 16, 4
    gates = torch.randn(K, d, generator=g)
    x = torch.cat([gates[[2, 0, 3]] + 0.05 * torch.randn(3, d, generator=g), torch.randn(2, d, generator=g)])[None]
    w = token_topk_routing(x, gates, k=2)  # (1, 5, 4)
    scores = ln(x) @ ln(gates).T / math.sqrt(d)
    assert torch.allclose(gate_scores(x, gates), scores, atol=1e-5)
    assert w.argmax(-1)[0, :3].tolist() == [2, 0, 3]  # a token next to gate i goes to expert i first
    for j in range(5):
        s = scores[0, j]
        kept = s.topk(2).indices
        want = torch.zeros(K)
        want[kept] = torch.softmax(s[kept], -1)
        assert torch.allclose(w[0, j], want, atol=1e-5), j
        assert int((w[0, j] > 0).sum()) == 2
    assert torch.allclose(w.sum(-1), torch.ones(1, 5))
    dense = token_topk_routing(x, gates[:2], k=2)  # fewer experts than k: all of them, plain softmax
    assert torch.allclose(dense, torch.softmax(scores[..., :2], -1), atol=1e-5)
    assert torch.equal(token_topk_routing(x, gates[:1], k=2), torch.ones(1, 5, 1))


def test_evaluation_mixes_top_k_experts_per_token():
    method, _ = make_method()
    run_tasks(method, 3)
    method.prepare_batch({}, train=False)  # evaluation: no task id, no records needed
    layer = method.layers["layers.0.k_proj"]
    x = torch.randn(2, 4, HIDDEN)
    V = torch.stack(list(method.gates[layer.key])).detach()
    w = token_topk_routing(x, V, k=2)
    assert w.shape == (2, 4, 3) and torch.equal((w > 0).sum(-1), torch.full((2, 4), 2))
    with torch.no_grad():
        want = layer.base(x) + sum(w[..., k, None] * layer.expert_scales[k] * (x @ layer.experts_A[k].T)
                                   @ layer.experts_B[k].T for k in range(3))
        assert torch.allclose(layer(x), want, atol=1e-5)


# ------------------------------------------------------------------ state and evaluation
def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    method, model = make_method()
    run_tasks(method, 2)
    tensors, meta = method.state()
    assert tensors["routing_cl.gates.layers.1.o_proj"].shape == (2, HIDDEN)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps(meta))
    method2, model2 = make_method()  # same frozen base, no experts yet
    method2.load_state(load_file(str(tmp_path / "m.safetensors")), json.loads((tmp_path / "m.json").read_text()))
    x = ids()
    with torch.no_grad():
        method.prepare_batch({}, train=False)
        a = model(input_ids=x).logits
        method2.prepare_batch({}, train=False)
        b = model2(input_ids=x).logits
    assert torch.equal(a, b)
    for key in method.gates:
        assert torch.equal(method.stacked_gates(key), method2.stacked_gates(key))
    assert method2.param_counts() == method.param_counts()


def test_evaluation_needs_no_task_index():
    method, model = make_method()
    run_tasks(method, 2)
    assert method.uses_task_id_at_eval is False and method.current_task is None
    x = ids()
    with torch.no_grad():
        method.prepare_batch({"input_ids": x}, train=False)
        logits = model(input_ids=x).logits
        base = make_method()[1](input_ids=x).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, base)  # the experts are in use


def test_param_counts_are_honest():
    method, _ = make_method()
    assert method.param_counts() == {"trainable": 0, "stored": 0, "active_per_sample": 0}
    run_tasks(method, 3)
    one_expert = len(TARGETS) * LAYERS * 8 * (HIDDEN + HIDDEN)
    one_gate_set = len(TARGETS) * LAYERS * HIDDEN
    assert method.param_counts() == {"trainable": one_expert + one_gate_set, "stored": 3 * (one_expert + one_gate_set),
                                     "active_per_sample": 2 * one_expert + 3 * one_gate_set}


# ------------------------------------------------------------------ end to end
def test_quick_stream_end_to_end(tmp_path, monkeypatch):
    from cramcl.config import resolve_config
    from cramcl.engine.runner import run_stream
    from cramcl.methods import registry

    monkeypatch.setitem(registry._METHODS, "routing-cl", "cramcl.methods.routing_cl:RoutingCL:RoutingCLConfig")
    cfg = resolve_config(method="routing-cl", profile="quick",
                         overrides=["data.tasks=[shape,colour]", "train.steps_per_task=6"])
    matrix = run_stream(cfg, tmp_path / "run", log=lambda *a: None)
    scores = matrix["scores"]
    assert matrix["method"] == "routing-cl" and len(scores) == 2
    assert scores[1][1] is not None and scores[0][1] is None
    assert all(math.isfinite(s) and 0.0 <= s <= 100.0 for row in scores for s in row if s is not None)
    tensors = load_file(str(tmp_path / "run" / "checkpoints" / "task_1" / "method.safetensors"))
    assert tensors["routing_cl.gates.layers.0.q_proj"].shape[0] == 2


def test_quick_stream_with_the_phatgoose_budget(tmp_path, monkeypatch):
    """The expert takes all 6 steps of each task (budget in metrics.json), then 2 gate steps x 2 micro-batches."""
    from cramcl.config import resolve_config
    from cramcl.engine.runner import run_stream
    from cramcl.methods import registry

    monkeypatch.setitem(registry._METHODS, "routing-cl", "cramcl.methods.routing_cl:RoutingCL:RoutingCLConfig")
    assert resolve_config(method="routing-cl", profile="quick").method_args["gate_budget"] == "ours"  # the profile's
    cfg = resolve_config(method="routing-cl", profile="quick",
                         overrides=["data.tasks=[shape,colour]", "train.steps_per_task=6", "method.gate_budget=phatgoose",
                                    "method.gate_steps=2", "method.gate_accum=2"])
    run_stream(cfg, tmp_path / "run", log=lambda *a: None)
    metrics = json.loads((tmp_path / "run" / "results" / "metrics.json").read_text())
    assert metrics["budget"]["steps_per_task"] == [6, 6]
    gates = metrics["method_analysis"]["gate_training"]
    assert (gates["budget"], gates["steps"], gates["accum"], gates["lr"]) == ("phatgoose", 2, 2, 5e-3)
    assert [(g["task"], g["steps"], g["micro_batches"]) for g in gates["per_task"]] == [(0, 2, 4), (1, 2, 4)]
