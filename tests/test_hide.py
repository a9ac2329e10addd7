"""HiDe-LLaVA: the lower-layer merge equals W0 x + s (sum B)(sum A) x, the top layer's weights follow the anchor
formula, training is one-hot on the task's expert with the merge off, a bit-exact save/load round trip,
evaluation without a task id, and one end-to-end quick run."""
from __future__ import annotations

import torch

torch.set_num_threads(1)

import json  # noqa: E402
import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
from conftest import assert_refused  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from cramcl.methods.base import Phase, Services  # noqa: E402
from cramcl.methods.hide_fusion import merged_factors  # noqa: E402
from cramcl.methods.hide import HiDe, HiDeConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
HIDDEN, LAYERS, VOCAB, DQ, DT = 32, 3, 50, 6, 5


class FakeEncoders:
    """Fixed random image / text embeddings per record id (stands in for RoutingEncoders)."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.q, self.t = {}, {}

    def _get(self, table, r, dim):
        if r.id not in table:
            table[r.id] = torch.randn(dim, generator=self.g)
        return table[r.id]

    def image_embeddings(self, records):
        return torch.stack([self._get(self.q, r, DQ) for r in records])

    def text_embeddings(self, records):
        return torch.stack([self._get(self.t, r, DT) for r in records])


def records(prefix: str, n: int) -> list:
    return [SimpleNamespace(id=f"{prefix}-{i}", question=f"q {prefix}", image=None) for i in range(n)]


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def make_method(encoders=None, **cfg) -> tuple[HiDe, LlamaForCausalLM]:
    model = tiny_model()
    backbone = SimpleNamespace(language_model=model, num_layers=LAYERS, model=model)
    run_config = SimpleNamespace(backbone=SimpleNamespace(targets=TARGETS))
    method = HiDe(HiDeConfig(**{"dropout": 0.0, **cfg}))
    method.setup(Services(backbone=backbone, run_config=run_config, log=lambda *a: None,
                          encoders=encoders or FakeEncoders()))
    return method, model


@torch.no_grad()
def pretend_trained(method: HiDe, t: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in method.layers.values():
        layer.experts_A[t].copy_(torch.randn(layer.experts_A[t].shape, generator=g) * 0.3)
        layer.experts_B[t].copy_(torch.randn(layer.experts_B[t].shape, generator=g) * 0.3)


def run_tasks(method: HiDe, n: int) -> list[list]:
    tasks = [records(f"task{t}", 4) for t in range(n)]
    for t in range(n):
        method.before_task(t, SimpleNamespace(name=f"task{t}", train=tasks[t]))
        pretend_trained(method, t, seed=10 + t)
        method.after_task(t)
    return tasks


def ids(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def lora(layer, k: int, x: torch.Tensor) -> torch.Tensor:
    return layer.expert_scales[k] * (x @ layer.experts_A[k].T) @ layer.experts_B[k].T


# ------------------------------------------------------------------ the merge
def test_merged_factors_are_the_sums():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(4, 7, generator=g) for _ in range(3)]
    Bs = [torch.randn(5, 4, generator=g) for _ in range(3)]
    A, B, s = merged_factors(As, Bs, [2.0, 2.0, 2.0])
    assert torch.allclose(A, As[0] + As[1] + As[2]) and torch.allclose(B, Bs[0] + Bs[1] + Bs[2]) and s == 2.0
    with pytest.raises(ValueError, match="scales"):
        merged_factors(As, Bs, [2.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="rank"):
        merged_factors([As[0], torch.randn(3, 7)], [Bs[0], torch.randn(5, 3)], [2.0, 2.0])


def test_merged_products_are_the_sum_of_the_products():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(4, 7, generator=g) for _ in range(3)]
    Bs = [torch.randn(5, 4, generator=g) for _ in range(3)]
    A, B, s = merged_factors(As, Bs, [2.0, 2.0, 2.0], "products")
    assert A.shape == (12, 7) and B.shape == (5, 12) and s == 2.0
    assert torch.allclose(B @ A, sum(b @ a for a, b in zip(As, Bs)), atol=1e-5)  # sum_k B_k A_k by hand
    Af, Bf, _ = merged_factors(As, Bs, [2.0, 2.0, 2.0], "factors")
    assert not torch.allclose(Bf @ Af, B @ A, atol=1e-3)  # the cross terms
    with pytest.raises(ValueError, match="fusion"):
        merged_factors(As, Bs, [2.0, 2.0, 2.0], "mean")


@pytest.mark.parametrize("fusion", ["factors", "products"])
def test_fusion_setting_decides_the_lower_layers_output(fusion):
    """The same trained experts: ``factors`` gives W0 x + s (sum B)(sum A) x, ``products`` W0 x + s sum B_k A_k x
    (computed by hand), and the two differ."""
    method, _ = make_method(fusion=fusion)
    run_tasks(method, 3)
    method.prepare_batch({"records": records("test", 2)}, train=False)
    x = torch.randn(2, 5, HIDDEN)
    lower = [layer for layer in method.layers.values() if layer.layer_index != LAYERS - 1]
    for layer in lower:
        s = layer.expert_scales[0]
        with torch.no_grad():
            factors = layer.base(x) + s * (x @ sum(layer.experts_A[k] for k in range(3)).T) @ \
                sum(layer.experts_B[k] for k in range(3)).T
            products = layer.base(x) + sum(lora(layer, k, x) for k in range(3))
            got = layer(x)
        want, other = (factors, products) if fusion == "factors" else (products, factors)
        assert torch.allclose(got, want, atol=1e-4), layer.key
        assert not torch.allclose(got, other, atol=1e-3), layer.key


@pytest.mark.parametrize("override, message", [
    ("method.fusion=sum", "method.fusion: 'sum' must be one of factors, products"),
    ("method.anchor_mixing=prism", "method.anchor_mixing: 'prism' must be one of authors, same"),
    ("method.anchor_scale=0", "method.anchor_scale: 0.0 must be null or > 0"),
    ("method.image_weight=-1", "method.image_weight: -1.0 must be null or >= 0"),
])
def test_hide_settings_are_checked(override, message):
    assert_refused("hide", [override], message)


def test_lower_layers_compute_the_merged_expert():
    method, _ = make_method()
    run_tasks(method, 3)
    assert method.top_indices == {LAYERS - 1}
    method.prepare_batch({"records": records("test", 2)}, train=False)
    x = torch.randn(2, 5, HIDDEN)
    for key, layer in method.layers.items():
        if layer.layer_index == LAYERS - 1:
            assert layer.buffer_A is None, key  # the top layer keeps its experts apart
            continue
        sum_A = sum(layer.experts_A[k] for k in range(3))
        sum_B = sum(layer.experts_B[k] for k in range(3))
        s = layer.expert_scales[0]
        with torch.no_grad():
            got = layer(x)
            want = layer.base(x) + s * (x @ sum_A.T) @ sum_B.T  # W0 x + s (sum B)(sum A) x
            assert torch.allclose(got, want, atol=1e-4), key
            separate = layer.base(x) + sum(lora(layer, k, x) for k in range(3))  # no cross terms: not HiDe
            assert not torch.allclose(got, separate, atol=1e-3), key


@pytest.mark.parametrize("settings, w_img, w_txt, scale", [
    ({}, 0.5, 0.5, 10.0),  # the authors' default: (cos image + cos text) / 2, softmax(sim / 0.1)
    ({"anchor_mixing": "authors"}, 0.5, 0.5, 10.0),
    ({"anchor_mixing": "same"}, 0.2, 0.8, 28.0),  # SAME's prior
    ({"anchor_mixing": "same", "anchor_scale": 5.0}, 0.2, 0.8, 5.0),  # one part overridden
    ({"image_weight": 1.0, "text_weight": 0.0}, 1.0, 0.0, 10.0),
])
def test_top_layer_weights_follow_the_anchor_formula(settings, w_img, w_txt, scale):
    enc = FakeEncoders(seed=3)
    method, _ = make_method(encoders=enc, **settings)
    tasks = run_tasks(method, 3)
    img = torch.stack([torch.stack([enc.q[r.id] for r in recs]).mean(0) for recs in tasks])  # (K, D_q)
    txt = torch.stack([torch.stack([enc.t[r.id] for r in recs]).mean(0) for recs in tasks])  # (K, D_t)
    test = tasks[1][:2] + records("new", 2)  # two seen records and two unseen ones
    q, t = enc.image_embeddings(test), enc.text_embeddings(test)
    cos_i = F.cosine_similarity(q[:, None], img[None], dim=-1)
    cos_t = F.cosine_similarity(t[:, None], txt[None], dim=-1)
    want = torch.softmax(scale * (w_img * cos_i + w_txt * cos_t), dim=-1)  # (4, 3)
    assert torch.allclose(method.top_layer_weights(test), want, atol=1e-5)
    method.prepare_batch({"records": test}, train=False)
    layer = method.layers[f"layers.{LAYERS - 1}.o_proj"]
    x = torch.randn(4, 3, HIDDEN)
    with torch.no_grad():
        mixed = layer.base(x) + sum(want[:, k, None, None] * lora(layer, k, x) for k in range(3))
        assert torch.allclose(layer(x), mixed, atol=1e-4)


def test_training_is_one_hot_and_ignores_the_merge():
    method, model = make_method()
    run_tasks(method, 2)
    method.before_task(2, SimpleNamespace(name="task2", train=records("task2", 4)))
    pretend_trained(method, 2, seed=99)
    method.begin_phase(Phase("train", 1))
    params = method.trainable_parameters()
    assert {id(p) for p in params} == {id(p) for l in method.layers.values() for p in (l.experts_A[2], l.experts_B[2])}
    method.prepare_batch({"records": records("task2", 2)}, train=True)
    x = torch.randn(2, 5, HIDDEN)
    for key, layer in method.layers.items():  # lower layers still hold the merge of tasks 0-1: it stays off
        with torch.no_grad():
            assert torch.allclose(layer(x), layer.base(x) + lora(layer, 2, x), atol=1e-5), key


# ------------------------------------------------------------------ state and evaluation
def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    enc = FakeEncoders(seed=1)
    method, model = make_method(encoders=enc)
    tasks = run_tasks(method, 2)
    tensors, meta = method.state()
    assert tensors["hide.anchors.image"].shape == (2, DQ) and tensors["hide.anchors.text"].shape == (2, DT)
    assert "layers.0.q_proj.buffer.A" in tensors and f"layers.{LAYERS - 1}.q_proj.buffer.A" not in tensors
    save_file(tensors, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps(meta))
    method2, model2 = make_method(encoders=enc)
    method2.load_state(load_file(str(tmp_path / "m.safetensors")), json.loads((tmp_path / "m.json").read_text()))
    batch = {"records": tasks[0][:1] + tasks[1][:1], "input_ids": ids()}
    with torch.no_grad():
        method.prepare_batch(batch, train=False)
        a = model(input_ids=batch["input_ids"]).logits
        method2.prepare_batch(batch, train=False)
        b = model2(input_ids=batch["input_ids"]).logits
    assert torch.equal(a, b)
    assert not any(p.requires_grad for l in method2.layers.values() for p in l.parameters())
    assert method2.param_counts() == method.param_counts()


def test_evaluation_needs_no_task_index():
    method, model = make_method()
    tasks = run_tasks(method, 2)
    assert method.uses_task_id_at_eval is False and method.current_task is None
    batch = {"records": [tasks[1][0], tasks[0][0]], "input_ids": ids()}  # no "task_index"
    with torch.no_grad():
        method.prepare_batch(batch, train=False)
        logits = model(input_ids=batch["input_ids"]).logits
        base = tiny_model()(input_ids=batch["input_ids"]).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, base)


def test_param_counts_are_honest():
    method, _ = make_method()
    assert method.param_counts() == {"trainable": 0, "stored": 0, "active_per_sample": 0}
    run_tasks(method, 3)
    per_linear = 8 * (HIDDEN + HIDDEN)
    lower, top = (LAYERS - 1) * len(TARGETS), len(TARGETS)
    assert method.param_counts() == {
        "trainable": (lower + top) * per_linear,
        "stored": 3 * (lower + top) * per_linear + lower * per_linear + 3 * (DQ + DT),
        "active_per_sample": lower * per_linear + 3 * top * per_linear}


# ------------------------------------------------------------------ end to end
def test_quick_stream_end_to_end(tmp_path, monkeypatch):
    from cramcl.config import resolve_config
    from cramcl.engine.runner import run_stream
    from cramcl.methods import registry

    monkeypatch.setitem(registry._METHODS, "hide", "cramcl.methods.hide:HiDe:HiDeConfig")
    cfg = resolve_config(method="hide", profile="quick", overrides=["data.tasks=[shape,colour]", "train.steps_per_task=6"])
    matrix = run_stream(cfg, tmp_path / "run", log=lambda *a: None)
    scores = matrix["scores"]
    assert matrix["method"] == "hide" and len(scores) == 2
    assert scores[1][1] is not None and scores[0][1] is None
    assert all(math.isfinite(s) and 0.0 <= s <= 100.0 for row in scores for s in row if s is not None)
    metrics = json.loads((tmp_path / "run" / "results" / "metrics.json").read_text())
    assert set(metrics["method_analysis"]["top_layer_routing_accuracy"]) == {"shape", "colour"}
