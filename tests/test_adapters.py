"""The multi-expert LoRA linear and its injection, on a tiny random transformers Llama (no network).

Invariants: injection wraps exactly the attention projections (and checks the count), a fresh expert is the
identity, the concatenated ragged-rank forward equals the naive per-expert sum (per-sample, per-token and
all-ones weights; buffer with float and per-sample weights), samples do not see their batch-mates, and the
canonical adapter state round-trips bit-exactly (also through a safetensors file).
"""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from cramcl.adapters.inject import adapter_state, find_target_linears, inject_adapters, load_adapter_state
from cramcl.adapters.multi_lora import MultiLoRALinear, RoutingContext

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
HIDDEN, LAYERS, HEADS, VOCAB = 32, 2, 4, 50


def tiny_llama(num_layers: int = LAYERS, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, intermediate_size=64,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def input_ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


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


# ------------------------------------------------------------------ the forward equals the naive sum
RANKS = (2, 5, 3)
D_IN, D_OUT, BATCH, T = 12, 10, 4, 6


def ragged_layer(seed: int = 0, ranks=RANKS, buffer_rank: int | None = None):
    """A MultiLoRALinear with experts of the given ranks, random A, B, scales; and its naive factors."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        base.weight.copy_(torch.randn(D_OUT, D_IN, generator=g))
        base.bias.copy_(torch.randn(D_OUT, generator=g))
    ctx = RoutingContext()
    layer = MultiLoRALinear(base, "layers.0.q_proj", 0, ctx)
    experts = []
    for r in ranks:
        A, B = torch.randn(r, D_IN, generator=g), torch.randn(D_OUT, r, generator=g)
        scale = float(torch.rand((), generator=g) * 2 + 0.1)
        layer.add_expert(A=A, B=B, scale=scale)
        experts.append((A, B, scale))
    buffer = None
    if buffer_rank:
        layer.init_buffer(buffer_rank, alpha=3.0)
        with torch.no_grad():
            layer.buffer_A.copy_(torch.randn(buffer_rank, D_IN, generator=g))
            layer.buffer_B.copy_(torch.randn(D_OUT, buffer_rank, generator=g))
        buffer = (layer.buffer_A.detach().clone(), layer.buffer_B.detach().clone(), 3.0 / buffer_rank)
    return layer, ctx, experts, buffer


def naive(layer, x, experts, weights=None, buffer=None, buffer_weight=None):
    """y = W0 x + b + sum_k w_k scale_k B_k A_k x [+ w_buf scale_buf B_buf A_buf x], one expert at a time."""
    with torch.no_grad():
        y = x @ layer.base.weight.T + layer.base.bias
        for k, (A, B, s) in enumerate(experts):
            term = s * (x @ A.T @ B.T)  # (B, T, d_out)
            if weights is None:
                w = 1.0
            elif weights.dim() == 2:  # (B, K)
                w = weights[:, k].view(-1, 1, 1)
            else:  # (B, T, K)
                w = weights[..., k].unsqueeze(-1)
            y = y + w * term
        if buffer is not None and buffer_weight is not None:
            A, B, s = buffer
            w = buffer_weight.view(-1, 1, 1) if torch.is_tensor(buffer_weight) else buffer_weight
            y = y + w * s * (x @ A.T @ B.T)
    return y


def x_and_weights(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, T, D_IN, generator=g)
    per_sample = torch.rand(BATCH, len(RANKS), generator=g)
    per_token = torch.rand(BATCH, T, len(RANKS), generator=g)
    return x, per_sample, per_token


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


# ------------------------------------------------------------------ adapter state round trip
def adapted_model(seed: int = 0, num_layers: int = LAYERS):
    """A tiny Llama with, in every projection, frozen experts of ranks (2, 5) (as a finished task's checkpoint
    holds them) with random non-zero B, per-layer scales, and a random buffer."""
    model = tiny_llama(num_layers)
    ctx = RoutingContext()
    layers = inject_adapters(model, TARGETS, num_layers * len(TARGETS), ctx)
    g = torch.Generator().manual_seed(seed)
    for key, layer in layers.items():
        offset = 0.5 + 0.1 * layer.layer_index + 0.01 * TARGETS.index(key.split(".")[-1])
        for r in (2, 5):
            k = layer.add_expert(A=0.1 * torch.randn(r, HIDDEN, generator=g), B=0.1 * torch.randn(HIDDEN, r, generator=g),
                                 scale=offset + r)
            layer.set_expert_trainable(k, False)
        layer.init_buffer(3, alpha=6.0)
        with torch.no_grad():
            layer.buffer_B.copy_(0.1 * torch.randn(HIDDEN, 3, generator=g))
    ctx.buffer_weight = 0.9
    ctx.route = lambda lyr, inp: torch.linspace(0.2, 1.0, inp.shape[0] * lyr.num_experts).view(inp.shape[0], -1)
    return model, layers, ctx


def fresh_target(num_layers: int = LAYERS, with_lora: bool = True):
    """A freshly injected model with the same base weights (seed 0), optionally with one fresh rank-8
    LoRA already in place (as a method's setup would leave it before loading a checkpoint)."""
    model = tiny_llama(num_layers)
    ctx = RoutingContext()
    layers = inject_adapters(model, TARGETS, num_layers * len(TARGETS), ctx)
    if with_lora:
        for layer in layers.values():
            layer.add_expert(8, alpha=16.0)
    return model, layers, ctx


def assert_same_state(src_layers, dst_layers):
    t1, m1 = adapter_state(src_layers)
    t2, m2 = adapter_state(dst_layers)
    assert m1 == m2
    assert set(t1) == set(t2)
    for k in t1:
        assert t1[k].dtype == t2[k].dtype and torch.equal(t1[k], t2[k]), k


def test_adapter_state_keys_and_meta():
    _, layers, _ = adapted_model()
    tensors, meta = adapter_state(layers)
    want = {f"layers.{i}.{p}.{part}.{ab}" for i in range(LAYERS) for p in TARGETS
            for part in ("expert.0", "expert.1", "buffer") for ab in "AB"}
    assert set(tensors) == want
    assert tensors["layers.1.o_proj.expert.1.A"].shape == (5, HIDDEN)
    assert tensors["layers.1.o_proj.expert.1.B"].shape == (HIDDEN, 5)
    assert tensors["layers.0.q_proj.buffer.A"].shape == (3, HIDDEN)
    assert set(meta) == {f"layers.{i}.{p}" for i in range(LAYERS) for p in TARGETS}
    assert meta["layers.0.q_proj"] == {"ranks": [2, 5], "scales": [2.5, 5.5], "buffer_scale": 2.0, "buffer": True}
    assert meta["layers.1.v_proj"]["scales"] == [0.5 + 0.1 + 0.02 + 2, 0.5 + 0.1 + 0.02 + 5]
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())


@pytest.mark.parametrize("with_lora", [True, False])
def test_adapter_state_round_trip_is_bit_exact(with_lora):
    src, src_layers, src_ctx = adapted_model()
    ids = input_ids()
    want = logits(src, ids)
    tensors, meta = adapter_state(src_layers)
    dst, dst_layers, dst_ctx = fresh_target(with_lora=with_lora)
    dst_ctx.route, dst_ctx.buffer_weight = src_ctx.route, src_ctx.buffer_weight
    assert not torch.equal(logits(dst, ids), want)
    load_adapter_state(dst_layers, tensors, meta)
    assert_same_state(src_layers, dst_layers)
    for layer in dst_layers.values():
        assert layer.ranks == [2, 5]
        assert not any(p.requires_grad for p in [*layer.experts_A, *layer.experts_B])  # loaded experts are frozen
    assert torch.equal(logits(dst, ids), want)


def test_loading_state_without_buffer_drops_the_target_buffer():
    src, src_layers, src_ctx = adapted_model()
    for layer in src_layers.values():
        layer.drop_buffer()
    tensors, meta = adapter_state(src_layers)
    assert not any(".buffer." in k for k in tensors)
    dst, dst_layers, dst_ctx = fresh_target()
    for layer in dst_layers.values():
        layer.init_buffer(4, 4.0)
    load_adapter_state(dst_layers, tensors, meta)
    assert all(layer.buffer_A is None for layer in dst_layers.values())
    dst_ctx.route, dst_ctx.buffer_weight = src_ctx.route, src_ctx.buffer_weight
    assert torch.equal(logits(dst, input_ids()), logits(src, input_ids()))


@pytest.mark.parametrize("num_layers", [1, 3])
def test_loading_into_a_model_with_another_layer_count_raises(num_layers):
    _, src_layers, _ = adapted_model()
    tensors, meta = adapter_state(src_layers)
    _, dst_layers, _ = fresh_target(num_layers=num_layers)
    with pytest.raises(RuntimeError, match="adapter state does not match the model"):
        load_adapter_state(dst_layers, tensors, meta)


def test_safetensors_file_round_trip(tmp_path):
    src, src_layers, src_ctx = adapted_model()
    ids = input_ids()
    want = logits(src, ids)
    tensors, meta = adapter_state(src_layers)
    path = tmp_path / "adapters.safetensors"
    save_file(tensors, str(path))
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    key_re = re.compile(r"^layers\.\d+\.(q|k|v|o)_proj\.(expert\.\d+|buffer)\.(A|B)$")
    assert all(key_re.match(k) for k in loaded), sorted(loaded)
    assert "layers.0.q_proj.expert.0.A" in loaded and "layers.1.v_proj.expert.1.B" in loaded
    dst, dst_layers, dst_ctx = fresh_target()
    dst_ctx.route, dst_ctx.buffer_weight = src_ctx.route, src_ctx.buffer_weight
    load_adapter_state(dst_layers, loaded, meta)
    assert_same_state(src_layers, dst_layers)
    assert torch.equal(logits(dst, ids), want)


def test_state_is_keyed_canonically_not_by_module_path():
    """The same state loads into a model whose modules live under another path (a transformers rename)."""
    src, src_layers, src_ctx = adapted_model()
    tensors, meta = adapter_state(src_layers)

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_model = tiny_llama()

    dst = Renamed()
    layers = inject_adapters(dst, TARGETS, 8, RoutingContext())
    assert dst.text_model.model.layers[1].self_attn.k_proj is layers["layers.1.k_proj"]
    load_adapter_state(layers, tensors, meta)
    assert_same_state(src_layers, layers)


# ------------------------------------------------------------------ only the active experts run
@pytest.mark.parametrize("active", [(0, 2), (1,), (), (0, 1, 2)])
@pytest.mark.parametrize("trainable", [(), (2,), (0, 2)])
def test_only_the_active_experts_run_with_the_same_numbers(active, trainable):
    """Weights are zero outside ``active`` (as a method that names the active set guarantees): the output
    equals the naive sum over every expert, frozen experts from the cache and trainable ones on their own."""
    layer, ctx, experts, _ = ragged_layer()
    for k in range(layer.num_experts):
        layer.set_expert_trainable(k, k in trainable)
    x, per_sample, _ = x_and_weights()
    mask = torch.zeros(layer.num_experts)
    mask[list(active)] = 1.0
    weights = per_sample * mask
    ctx.route = lambda lyr, inp: weights
    ctx.active = active
    got = layer(x)
    want = naive(layer, x, experts, weights)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    if trainable and set(trainable) & set(active):  # gradients reach the active trainable experts only
        got.sum().backward()
        for k in trainable:
            assert (layer.experts_A[k].grad is not None) == (k in active)


def test_frozen_factors_are_built_once_and_rebuilt_when_an_expert_changes(monkeypatch):
    layer, ctx, experts, _ = ragged_layer()
    for k in range(layer.num_experts):
        layer.set_expert_trainable(k, False)
    x, per_sample, _ = x_and_weights()
    ctx.route = lambda lyr, inp: per_sample
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    first = layer(x)
    n = len(calls)
    assert n == 2  # A's and B's of the frozen experts, once
    assert torch.equal(layer(x), first) and len(calls) == n  # reused
    with torch.no_grad():
        layer.experts_B[1].mul_(2.0)  # an in-place write (e.g. a checkpoint load)
    changed = layer(x)
    assert len(calls) == n + 2 and not torch.allclose(changed, first)
    layer.add_expert(A=torch.randn(2, D_IN), B=torch.randn(D_OUT, 2))  # trainable: joins without a re-cat
    ctx.route = lambda lyr, inp: torch.ones(inp.shape[0], lyr.num_experts)
    layer(x)
    assert len(calls) == n + 4  # the cache was dropped by add_expert and rebuilt for the frozen three
    layer(x)
    assert len(calls) == n + 4


# ------------------------------------------------------------------ precision
def test_half_precision_inputs_are_not_upcast_and_gradients_reach_float32_factors():
    """A bf16 model's activations stay bf16 through the adapter (no fp32 copy of x per module), the result
    matches the fp32 computation to bf16 precision, and the float32 master factors receive float32 grads."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layer, ctx, experts, _ = ragged_layer()
    layer.set_expert_trainable(0, False)
    layer.base.to(torch.bfloat16)
    x, per_sample, _ = x_and_weights()
    ctx.route = lambda lyr, inp: per_sample
    with torch.no_grad():
        want = (x.to(torch.bfloat16).float() @ layer.base.weight.float().T + layer.base.bias.float()
                + sum(per_sample[:, k].view(-1, 1, 1) * s * (x.to(torch.bfloat16).float() @ A.T @ B.T)
                      for k, (A, B, s) in enumerate(experts)))

    seen = []

    class MatmulDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
                seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    with MatmulDtypes():
        got = layer(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert seen and all(d == {torch.bfloat16} for d in seen), seen
    assert torch.allclose(got.float(), want, atol=0.05 * float(want.abs().max()), rtol=0)
    got.float().pow(2).sum().backward()
    assert layer.experts_A[1].grad.dtype == torch.float32 and torch.count_nonzero(layer.experts_B[1].grad) > 0


def test_column_multipliers_are_reused_only_while_the_same_weights_come_back():
    """Decoding steps of one batch route with the same weights: the per-column multiplier is built once. A new
    batch's weights, an in-place change, or weights that carry a graph (training) are never served stale."""
    layer, ctx, experts, _ = ragged_layer()
    for k in range(layer.num_experts):
        layer.set_expert_trainable(k, False)
    x, per_sample, _ = x_and_weights()
    table = torch.stack([per_sample, per_sample.flip(0)])  # (L=2, B, K): the method's per-layer weights
    ctx.route = lambda lyr, inp: table[0]  # a fresh view of the same memory on every call, as CramMethod's
    with torch.no_grad():
        first = layer(x)
        plan = next(iter(layer._plans.values()))
        built = plan._multiplier
        assert torch.equal(layer(x), first) and plan._multiplier is built  # reused
        assert torch.allclose(first, naive(layer, x, experts, table[0]), atol=1e-5, rtol=1e-5)
        table.mul_(0.5)  # written in place: rebuilt
        assert torch.allclose(layer(x), naive(layer, x, experts, table[0]), atol=1e-5, rtol=1e-5)
        other = torch.rand_like(per_sample)  # another batch's weights
        ctx.route = lambda lyr, inp: other
        assert torch.allclose(layer(x), naive(layer, x, experts, other), atol=1e-5, rtol=1e-5)
    trained = per_sample.clone().requires_grad_(True)  # routing that trains: a new graph every step
    ctx.route = lambda lyr, inp: trained
    layer(x).sum().backward()
    assert trained.grad is not None and torch.count_nonzero(trained.grad) > 0
    assert plan._weights_seen is None or not plan._weights_seen.requires_grad


def test_optimizer_steps_on_the_trainable_expert_do_not_rebuild_the_frozen_factors(monkeypatch):
    """A training step writes the trainable expert in place; the frozen experts' concatenation (and its host-to-
    device copies of column owners and scales, a sync on a GPU) must not be rebuilt for that."""
    layer, ctx, experts, _ = ragged_layer()
    layer.set_expert_trainable(0, False)
    layer.set_expert_trainable(1, False)
    x, per_sample, _ = x_and_weights()
    ctx.route = lambda lyr, inp: per_sample
    opt = torch.optim.SGD([layer.experts_A[2], layer.experts_B[2]], lr=0.1)
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    before = layer.experts_B[2].detach().clone()
    for _ in range(3):
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(layer.experts_B[2], before)  # it did train
    assert len(calls) == 2  # one concatenation of the frozen A's and B's, at the first forward only
