"""Pure tensor helpers of the routing baselines (PEERS.md): routing-cl's token-level gates and HiDe-LLaVA's
merged lower-layer expert and anchor routing.

Shapes: B = batch, T = tokens, d = the adapted linear's input size, K = experts (one per task), r = rank,
D_q / D_t = image / text routing-embedding sizes. Routing computations run in at least float32.

Sources: routing-cl's gates and scores follow the PHATGOOSE authors' router (r-three/phatgoose,
``src/models/addons/moe.py``: LayerNorm'ed token and gate vector, top-k); HiDe's fusion and anchor mixing
follow Ghy0501/HiDe-LLaVA (``HiDe/peft/tuners/clitmoelora.py``, ``llava/model/llava_arch.py``), with Prism's
port (``PEFT/tuners/custom/hidellava.py`` in LAMDA-CL/EMNLP2026-CRAM) as the ``products`` variant. The
methods' modules (routing_cl.py, hide.py) list where we differ.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cramcl.routing.groups import cosine_to_prototypes


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ------------------------------------------------------------------------------------------ routing-cl
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


# ------------------------------------------------------------------------------------------ HiDe-LLaVA
FUSIONS = ("factors", "products")


def merged_factors(As: list[Tensor], Bs: list[Tensor], scales: list[float],
                   fusion: str = "factors") -> tuple[Tensor, Tensor, float]:
    """HiDe's lower-layer fusion of per-task LoRA experts into one (A, B, s).

    As: K x (r, d_in), Bs: K x (d_out, r), scales: K x s (all equal: every task's expert has the same rank and
    alpha). ``fusion``:

    * ``factors`` (the HiDe-LLaVA authors' code): sum of the A's and sum of the B's, (A (r, d_in), B (d_out, r));
      ``s * B @ A = s * (sum_i B_i)(sum_i A_i)`` keeps the cross terms B_i A_j, so it is not sum_i s B_i A_i;
    * ``products`` (LAMDA-CL/Prism's port): the A's stacked (K r, d_in) and the B's side by side (d_out, K r),
      so ``s * B @ A = s * sum_i B_i A_i`` exactly (rank K r, no cross terms).
    """
    if fusion not in FUSIONS:
        raise ValueError(f"merged_factors: fusion '{fusion}' is not one of {', '.join(FUSIONS)}")
    if not As or len(As) != len(Bs) or len(As) != len(scales):
        raise ValueError(f"merged_factors: need K >= 1 matching A's, B's and scales ({len(As)}, {len(Bs)}, "
                         f"{len(scales)})")
    if len({tuple(a.shape) for a in As}) != 1 or len({tuple(b.shape) for b in Bs}) != 1:
        raise ValueError("merged_factors: every expert must have the same rank and shapes")
    if max(scales) - min(scales) > 1e-12 * max(1.0, abs(max(scales))):
        raise ValueError(f"merged_factors: experts of different scales {sorted(set(scales))} cannot be summed")
    if fusion == "products":
        return (torch.cat([a.detach() for a in As], dim=0), torch.cat([b.detach() for b in Bs], dim=1),
                float(scales[0]))
    A = torch.stack([a.detach() for a in As]).sum(0)
    B = torch.stack([b.detach() for b in Bs]).sum(0)
    return A, B, float(scales[0])


def anchor_routing_weights(q: Tensor, t: Tensor, image_anchors: Tensor, text_anchors: Tensor,
                           image_weight: float = 0.5, text_weight: float = 0.5, scale: float = 10.0) -> Tensor:
    """HiDe's top-layer expert weights from the similarity of a sample to each task's anchors.

    q: (B, D_q) image embeddings, t: (B, D_t) text embeddings, image_anchors: (K, D_q), text_anchors: (K, D_t)
    -> (B, K) = softmax_k(scale * (image_weight * cos(q, a^img_k) + text_weight * cos(t, a^txt_k))).
    The defaults are the HiDe-LLaVA authors' (the mean of the two cosines, softmax(sim / 0.1)).
    """
    sim = image_weight * cosine_to_prototypes(q, image_anchors) + text_weight * cosine_to_prototypes(t, text_anchors)
    return torch.softmax(scale * sim, dim=-1)
