"""CRAM's routing state: instruction groups (level 1), per-(layer, expert) centroids (level 2), and the
per-sample expert weights every adapted layer reads.

Expert k lives in every adapted module at index k (one expert per task, appended in task order); it belongs
to group ``expert_group[k]``. For a batch, ``layer_weights`` is (L, B, K): at layer l, sample b's weights
over *all* K experts, zero outside the sample's group, an RBF softmax over the group's experts inside it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cramcl.routing.centroid import (batch_mean_routing_weights, centroid_gap, rbf_routing_weights, squared_distances,
                                    uniform_routing_weights)
from cramcl.utils.device import to_device


class CentroidBank(nn.Module):
    """One learnable (L, D) centroid tensor per expert: centroid of expert k at layer l = ``bank[k][l]``."""

    def __init__(self):
        super().__init__()
        self.centroids = nn.ParameterList()

    def add(self, init: Tensor, num_layers: int) -> int:
        """init: (D,) -> a new expert's centroids at every layer, all starting at ``init``."""
        self.centroids.append(nn.Parameter(init.detach().float().unsqueeze(0).repeat(num_layers, 1).clone()))
        return len(self.centroids) - 1

    def stacked(self, experts: list[int]) -> Tensor:
        """(L, len(experts), D)"""
        return torch.stack([self.centroids[k] for k in experts], dim=1)


SIGMA_UNITS = ("absolute", "gap")
ROUTING_METRICS = ("euclidean", "standardized")


def group_layer_weights(q: Tensor, centroids: Tensor, sigma: float, mode: str, oracle: Tensor | None = None,
                        sigma_units: str = "absolute", scale: Tensor | None = None) -> Tensor:
    """Routing weights over one group's experts at every layer.

    q: (B, D) image embeddings; centroids: (L, K_g, D) -> (L, B, K_g). ``mode``: per_sample | batch_mean |
    uniform | oracle (``oracle``: (B,) position of each sample's own expert within the group).
    ``sigma_units``: "absolute" -- sigma in the embedding's units (the paper's); "gap" -- sigma relative to
    the layer's closest pair of centroids in the group (``sigma_eff^2 = sigma^2 * centroid_gap``), so that
    the sharpness between two domains does not depend on how far apart the embedding happens to put them.
    ``scale``: (D,) per-coordinate scale of the ``standardized`` metric (``routing.centroid.standardizing_scale``),
    applied to both q and the centroids before any distance (and before the gap); None: Euclidean.
    """
    if sigma_units not in SIGMA_UNITS:
        raise ValueError(f"sigma_units must be one of {SIGMA_UNITS}, got {sigma_units!r}")
    L, K, _ = centroids.shape
    B = q.shape[0]
    if mode == "uniform":
        return uniform_routing_weights(B, K, device=q.device).unsqueeze(0).expand(L, B, K)
    if mode == "oracle":
        one_hot = torch.nn.functional.one_hot(oracle, K).float()
        return one_hot.unsqueeze(0).expand(L, B, K)
    if scale is not None:
        q, centroids = q * scale.to(q.dtype), centroids * scale.to(centroids.dtype)
    # every layer in one op chain (a (L, B, K, D) difference), not L small chains per batch and per backward
    fn = batch_mean_routing_weights if mode == "batch_mean" else rbf_routing_weights
    if sigma_units == "gap":
        return fn(q, centroids, sigma * centroid_gap(centroids).sqrt().view(L, 1, 1))
    return fn(q, centroids, sigma)


def scatter_group_weights(per_group: dict[int, tuple[Tensor, Tensor, list[int]]], B: int, K: int, L: int) -> Tensor:
    """Assemble (L, B, K) full weights from {group: (sample indices (B_g,), weights (L, B_g, K_g), experts)}."""
    first = next(iter(per_group.values()))[1] if per_group else None
    out = torch.zeros(L, B, K, dtype=first.dtype if first is not None else torch.float32,
                      device=first.device if first is not None else None)
    for rows, weights, experts in per_group.values():
        cols = to_device(torch.tensor(experts), out.device)  # host index lists go over without a sync
        block = torch.zeros(L, rows.numel(), K, dtype=out.dtype, device=out.device)
        block[:, :, cols] = weights
        out = out.index_put((torch.arange(L, device=out.device)[:, None], to_device(rows, out.device)[None, :]),
                            block, accumulate=True)
    return out


def routing_check(q: Tensor, centroids: Tensor, own: int, sigma: float) -> dict:
    """How well one group's centroids route a task's own images to its own expert (CRAM's level 2).

    q: (N, D) image embeddings of the task's samples; centroids: (K, D) of the group's experts at one
    layer; own: position of the task's expert among the K. Returns plain numbers:
      own_weight      mean RBF weight on the own expert (1/K = uniform);
      separable       share of samples whose nearest centroid is the own one (the images tell the experts
                      apart whatever sigma is);
      gap             median over samples of (squared distance to the nearest other centroid - to the own);
      sigma_for_0_9   the largest sigma that gives the own expert weight >= 0.9 at that median gap
                      (None when the gap is <= 0);
      near_uniform    the own weight is less than a quarter of the way from uniform to one-hot although
                      >= 80% of the samples are nearest to their own centroid: sigma is too large for
                      these embeddings.
    """
    K = centroids.shape[0]
    d2 = squared_distances(q, centroids)  # (N, K)
    w = rbf_routing_weights(q, centroids, sigma)[:, own]  # (N,)
    others = torch.cat([d2[:, :own], d2[:, own + 1:]], 1)
    gap = float((others.min(1).values - d2[:, own]).median()) if K > 1 else float("inf")
    separable = float((d2.argmin(1) == own).float().mean())
    own_weight = float(w.mean())
    sigma_ok = (gap / (2 * math.log(9 * (K - 1)))) ** 0.5 if K > 1 and gap > 0 else None
    near_uniform = K > 1 and separable >= 0.8 and own_weight - 1 / K < 0.25 * (1 - 1 / K)
    return {"experts": K, "own_weight": round(own_weight, 4), "uniform": round(1 / K, 4),
            "separable": round(separable, 4), "gap": round(gap, 4) if K > 1 else None,
            "sigma": sigma, "sigma_for_0_9": None if sigma_ok is None else round(sigma_ok, 4),
            "near_uniform": bool(near_uniform)}


def best_two_expert_weight(sigma: float, max_sq_distance: float = 4.0) -> float:
    """The most one of two experts can get: softmax over squared distances that differ by at most
    ``max_sq_distance`` (4 for unit vectors: antipodal points). sigma 2 on unit vectors -> 0.62."""
    return 1.0 / (1.0 + math.exp(-max_sq_distance / (2.0 * sigma ** 2)))
