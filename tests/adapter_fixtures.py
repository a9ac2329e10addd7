"""Tiny models and ragged multi-expert layers shared by the adapter tests (no network)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

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

