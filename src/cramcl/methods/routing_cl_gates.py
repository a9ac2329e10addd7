"""Routing-based CL's gates as pure tensor functions: the per-token sigmoid gate that trains one expert's gate
vector, and per-token top-k routing over every expert's gate vector (docs/peers.md, "Routing-based CL").

Source: the PHATGOOSE authors' router (r-three/phatgoose, ``src/models/addons/moe.py``: LayerNorm'ed token and
gate vector, top-k); read, not copied. Shapes: B = batch, T = tokens, d = the adapted linear's input size,
K = experts (one per task). Computations run in at least float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cramcl.utils.dtypes import at_least_float32


def _f32(x: Tensor) -> Tensor:
    return x.to(at_least_float32(x))


def sigmoid_gate_weights(x: Tensor, v: Tensor, index: int, num_experts: int) -> Tensor:
    """Gate-training weights of routing-cl: only expert ``index`` is on, gated per token.

    x: (B, T, d) layer input, v: (d,) that expert's gate vector -> (B, T, K) with column ``index`` equal to
    ``sigmoid(v . x)`` and every other column 0, so ``y = W0 x + sigmoid(v . x) s B_i A_i x``. Differentiable
    in v.
    """
    g = torch.sigmoid(_f32(x) @ _f32(v))  # (B, T)
    one_hot = F.one_hot(torch.tensor(index, device=x.device), num_experts).to(g.dtype)  # (K,)
    return g.unsqueeze(-1) * one_hot


def gate_scores(x: Tensor, gates: Tensor, eps: float = 1e-5) -> Tensor:
    """``score_i = LN(x) . LN(v_i) / sqrt(d)`` with LayerNorm without affine parameters.

    x: (..., d), gates: (K, d) -> (..., K).
    """
    d = x.shape[-1]
    xn = F.layer_norm(_f32(x), (d,), eps=eps)
    vn = F.layer_norm(_f32(gates).to(xn.device), (d,), eps=eps)
    return xn @ vn.T / math.sqrt(d)


def token_topk_routing(x: Tensor, gates: Tensor, k: int = 2, eps: float = 1e-5) -> Tensor:
    """Per-token top-k softmax routing over every expert's gate vector.

    x: (..., d), gates: (K, d) -> (..., K): the k best-scoring experts of each token (all K when K <= k) get
    the softmax of their scores, the others 0; each token's weights sum to 1.
    """
    scores = gate_scores(x, gates, eps)
    kk = min(int(k), scores.shape[-1])
    if kk < 1:
        raise ValueError(f"top-k routing needs k >= 1 and at least one expert (k={k}, K={scores.shape[-1]})")
    top, idx = scores.topk(kk, dim=-1)
    return torch.zeros_like(scores).scatter(-1, idx, torch.softmax(top, dim=-1))
