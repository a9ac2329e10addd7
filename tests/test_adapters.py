"""The multi-expert LoRA linear and its injection, on a tiny random transformers Llama (no network).

Invariants: injection wraps exactly the attention projections (and checks the count), a fresh expert is the
identity, the concatenated ragged-rank forward equals the naive per-expert sum (per-sample, per-token and
all-ones weights; buffer with float and per-sample weights), and samples do not see their batch-mates.
The adapter state's round trip is in test_adapter_state.py, the cached and half-precision paths in
test_adapter_fast_paths.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adapter_fixtures import (BATCH, D_IN, D_OUT, LAYERS, RANKS, TARGETS, T, input_ids, logits, naive, ragged_layer,
                              tiny_llama, x_and_weights)
from cramcl.adapters.inject import find_target_linears, inject_adapters
from cramcl.adapters.multi_lora import MultiLoRALinear, RoutingContext


# ------------------------------------------------------------------ injection
def test_inject_wraps_exactly_the_attention_projections():
    model = tiny_llama()
    ctx = RoutingContext()
    layers = inject_adapters(model, TARGETS, LAYERS * len(TARGETS), ctx)
    assert len(layers) == 8
    assert set(layers) == {f"layers.{i}.{p}" for i in range(LAYERS) for p in TARGETS}
    for i, block in enumerate(model.model.layers):
        for p in TARGETS:
            wrapped = getattr(block.self_attn, p)
            assert isinstance(wrapped, MultiLoRALinear)
            assert wrapped is layers[f"layers.{i}.{p}"]
            assert (wrapped.key, wrapped.layer_index, wrapped.num_experts) == (f"layers.{i}.{p}", i, 0)
            assert wrapped.context is ctx
        assert isinstance(block.mlp.gate_proj, nn.Linear)  # the MLP is left alone
    assert sum(isinstance(m, MultiLoRALinear) for m in model.modules()) == 8
    assert not any(p.requires_grad for p in model.parameters())  # the base is frozen


@pytest.mark.parametrize("targets, expected", [(TARGETS, 7), (TARGETS, 9), (["q_proj"], 8), (["qkv_proj"], 2)])
def test_inject_count_mismatch_raises_and_leaves_model_untouched(targets, expected):
    model = tiny_llama()
    with pytest.raises(RuntimeError, match=f"expected {expected} adapted modules"):
        inject_adapters(model, targets, expected, RoutingContext())
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())


def test_inject_ffn_targets():
    model = tiny_llama()
    layers = inject_adapters(model, ["gate_proj", "up_proj", "down_proj"], 6, RoutingContext())
    assert set(layers) == {f"layers.{i}.{p}" for i in range(LAYERS) for p in ("gate_proj", "up_proj", "down_proj")}
    assert isinstance(model.model.layers[1].mlp.down_proj, MultiLoRALinear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)
    assert not isinstance(model.model.layers[1].self_attn.q_proj, MultiLoRALinear)


def test_find_target_linears_skips_vision_modules():
    class VLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = tiny_llama(num_layers=1)  # also has layers.<i>.self_attn.q_proj
            self.language_model = tiny_llama()

    found = find_target_linears(VLM(), TARGETS)
    assert sorted(found) == sorted(f"layers.{i}.{p}" for i in range(LAYERS) for p in TARGETS)
    assert all(path.startswith("language_model.") for path, _, _ in found.values())


# ------------------------------------------------------------------ identity at init
def test_fresh_lora_expert_and_buffer_are_the_identity():
    model = tiny_llama()
    ids = input_ids()
    before = logits(model, ids)
    ctx = RoutingContext()
    layers = inject_adapters(model, TARGETS, 8, ctx)
    assert torch.equal(logits(model, ids), before)  # no experts yet
    for layer in layers.values():
        layer.add_expert(4, alpha=8.0)
        layer.add_expert(2, alpha=2.0)
        assert torch.count_nonzero(layer.experts_A[0]) > 0  # A is random, B is zero
        assert torch.count_nonzero(layer.experts_B[0]) == 0
        assert layer.expert_scales == [2.0, 1.0]
    assert torch.equal(logits(model, ids), before)
    for layer in layers.values():
        layer.init_buffer(8, 16.0)
        assert layer.buffer_scale == 2.0
    ctx.buffer_weight = 1.0
    ctx.route = lambda layer, x: torch.full((x.shape[0], layer.num_experts), 0.7)
    assert torch.equal(logits(model, ids), before)



def test_ragged_layer_shapes():
    layer, _, _, _ = ragged_layer()
    assert layer.ranks == list(RANKS) and layer.num_experts == 3
    assert (layer.in_features, layer.out_features) == (D_IN, D_OUT)
    delta = layer.expert_delta(1)
    A, B = layer.experts_A[1], layer.experts_B[1]
    assert torch.allclose(delta, layer.expert_scales[1] * B @ A)


@pytest.mark.parametrize("kind", ["per_sample", "per_token", "none"])
def test_concatenated_forward_equals_naive_sum(kind):
    layer, ctx, experts, _ = ragged_layer()
    x, per_sample, per_token = x_and_weights()
    weights = {"per_sample": per_sample, "per_token": per_token, "none": None}[kind]
    calls = []

    def route(lyr, inp):
        calls.append((lyr, inp.shape))
        return weights

    ctx.route = route
    with torch.no_grad():
        got = layer(x)
    assert calls == [(layer, x.shape)]  # the route is asked once per forward, with the layer and its input
    want = naive(layer, x, experts, weights)
    assert got.shape == (BATCH, T, D_OUT)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # and it is not the base output alone
    assert not torch.allclose(got, layer.base(x), atol=1e-3)


def test_no_route_means_all_ones():
    layer, ctx, experts, _ = ragged_layer()
    x, _, _ = x_and_weights()
    assert ctx.route is None
    with torch.no_grad():
        got = layer(x)
        ctx.route = lambda lyr, inp: torch.ones(inp.shape[0], lyr.num_experts)
        ones = layer(x)
    assert torch.allclose(got, naive(layer, x, experts, None), atol=1e-5, rtol=1e-5)
    assert torch.allclose(got, ones, atol=1e-6, rtol=0)


def test_zero_weight_switches_an_expert_off():
    layer, ctx, experts, _ = ragged_layer()
    x, _, _ = x_and_weights()
    w = torch.zeros(BATCH, 3)
    w[:, 1] = 1.0
    ctx.route = lambda lyr, inp: w
    with torch.no_grad():
        got = layer(x)
    assert torch.allclose(got, naive(layer, x, [experts[1]]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("buffer_weight", [0.6, "per_sample"])
@pytest.mark.parametrize("with_experts", [True, False])
def test_buffer_forward_equals_naive(buffer_weight, with_experts):
    layer, ctx, experts, buffer = ragged_layer(ranks=RANKS if with_experts else (), buffer_rank=4)
    x, per_sample, _ = x_and_weights()
    if buffer_weight == "per_sample":
        buffer_weight = torch.tensor([0.0, 0.5, 1.0, 2.0])
    ctx.buffer_weight = buffer_weight
    weights = per_sample if with_experts else None
    ctx.route = (lambda lyr, inp: weights) if with_experts else None
    with torch.no_grad():
        got = layer(x)
    want = naive(layer, x, experts, weights, buffer, buffer_weight)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    ctx.buffer_weight = None  # buffer off: the experts alone
    with torch.no_grad():
        off = layer(x)
    assert torch.allclose(off, naive(layer, x, experts, weights), atol=1e-5, rtol=1e-5)


def test_a_sample_does_not_depend_on_its_batch_mates():
    layer, ctx, _, _ = ragged_layer(buffer_rank=3)
    x, per_sample, _ = x_and_weights()
    bw = torch.tensor([0.3, 1.0, 0.0, 0.8])
    ctx.route = lambda lyr, inp: current["w"]
    current = {"w": per_sample}
    ctx.buffer_weight = bw
    with torch.no_grad():
        full = layer(x)
        for b in range(BATCH):
            current["w"] = per_sample[b:b + 1]
            ctx.buffer_weight = bw[b:b + 1]
            alone = layer(x[b:b + 1])
            # a batch of one may take another matmul kernel: allow float32 rounding of sums whose terms reach
            # ~30 (one ulp there is 2e-6), nothing more; a real dependence on batch mates moves outputs by O(1)
            tol = 1e-6 * float(full.abs().max())
            assert torch.allclose(alone[0], full[b], atol=tol, rtol=0), (b, (alone[0] - full[b]).abs().max())
        # change every other sample (inputs and weights): sample 0 is unchanged
        x2, w2 = x.clone(), per_sample.clone()
        x2[1:] = torch.randn_like(x2[1:])
        w2[1:] = torch.rand_like(w2[1:])
        current["w"] = w2
        ctx.buffer_weight = bw
        other = layer(x2)
    assert torch.allclose(other[0], full[0], atol=1e-6 * float(full.abs().max()), rtol=0)
    assert not torch.allclose(other[1], full[1], atol=1e-3)


def test_gradients_reach_only_trainable_experts():
    layer, ctx, _, _ = ragged_layer()
    layer.set_expert_trainable(0, False)
    layer.set_expert_trainable(2, False)
    x, per_sample, _ = x_and_weights()
    ctx.route = lambda lyr, inp: per_sample
    layer(x).pow(2).sum().backward()
    assert layer.experts_A[0].grad is None and layer.experts_B[2].grad is None
    assert layer.experts_A[1].grad is not None and torch.count_nonzero(layer.experts_B[1].grad) > 0
    assert layer.base.weight.grad is None

