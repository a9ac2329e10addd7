"""The canonical adapter state round-trips bit-exactly (in memory and through a safetensors file), is keyed
canonically, and refuses a model of another shape."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapter_fixtures import HIDDEN, LAYERS, TARGETS, input_ids, logits, tiny_llama
from cramcl.adapters.inject import adapter_state, inject_adapters, load_adapter_state
from cramcl.adapters.multi_lora import RoutingContext


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
            k = layer.add_expert(A=0.1 * torch.randn(r, HIDDEN, generator=g),
                                 B=0.1 * torch.randn(HIDDEN, r, generator=g),
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

