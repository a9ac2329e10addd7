"""HiDe-LLaVA's expert fusion and anchor routing as pure tensor functions: the lower layers' merged expert and
the top layer's expert weights from image / text anchors (docs/peers.md, "HiDe-LLaVA").

Source: Ghy0501/HiDe-LLaVA (``HiDe/peft/tuners/clitmoelora.py``, ``llava/model/llava_arch.py``); LAMDA-CL/Prism's
port (``PEFT/tuners/custom/hidellava.py``) is the ``products`` fusion; read, not copied. Shapes: K = experts
(one per task), r = rank, d_in / d_out = the adapted linear's sizes, B = batch, D_q / D_t = image / text
routing-embedding sizes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cramcl.routing.prototypes import cosine_to_prototypes

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
