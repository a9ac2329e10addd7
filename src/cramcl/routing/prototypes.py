"""Cosine similarity to prototypes: CRAM's instruction groups, SAME's and HiDe-LLaVA's anchors all route by it.

Shapes: B = inputs, D = embedding size, G = prototypes.
"""
from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-12


def cosine_to_prototypes(t: Tensor, protos: Tensor) -> Tensor:
    """Cosine similarity of every embedding to every prototype.

    t: (B, D), protos: (G, D) -> (B, G), computed in float32 (float64 if either input is float64).
    A zero vector has cosine 0 to everything (norms are clamped, not NaN).
    """
    dtype = torch.promote_types(torch.promote_types(t.dtype, protos.dtype), torch.float32)
    t = t.to(dtype)
    protos = protos.to(device=t.device, dtype=dtype)
    tn = t / t.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    pn = protos / protos.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return tn @ pn.T  # (B, D) @ (D, G) -> (B, G)
