"""CRAM's level 2: per-(layer, expert) centroids and RBF routing inside an instruction group, docs/cram.md
"Level 2: centroid routing inside the group".

Every (layer, expert) pair owns a learnable centroid c_k in image-embedding space; an input with image
embedding q is routed with ``pi_k = softmax_k(-||q - c_k||^2 / (2 sigma^2))`` over all experts of its
group (no top-k). This module holds the routing-weight functions (per sample, the authors' batch-mean
variant, and the uniform / oracle ablations), sigma's "gap" unit, the ``standardized`` metric's scale, the
centroid bank, the routing check made at a stable phase's start, and the accumulator that averages a task's
image embeddings into the buffer centroid c_buf during warm-up.

Expert k lives in every adapted module at index k (one expert per task, appended in task order). For a
batch, the full weights are (L, B, K): at layer l, sample b's weights over *all* K experts, zero outside the
sample's group, an RBF softmax over the group's experts inside it.

Shapes: L = layers, B = batch, K = experts (in the group, or all), D = image-embedding size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cramcl.methods.cram.config import SIGMA_UNITS
from cramcl.utils.device import to_device
from cramcl.utils.dtypes import at_least_float32


def squared_distances(q: Tensor, centroids: Tensor) -> Tensor:
    """||q_b - c_k||^2 for every pair.

    q: (B, D), centroids: (K, D) -> (B, K); or centroids (L, K, D) (every layer at once) -> (L, B, K). In at
    least float32. Uses the explicit difference (B, K, D) rather than the expanded form ||q||^2 + ||c||^2 -
    2 q.c: it cannot go negative by cancellation, and unlike cdist its gradient is finite at zero distance.
    B * K * D stays small here (K <= a few tens).
    """
    dtype = at_least_float32(q, centroids)
    diff = q.to(dtype)[..., :, None, :] - centroids.to(dtype)[..., None, :, :]  # ([L,] B, K, D)
    return diff.pow(2).sum(-1)


def rbf_routing_weights(q: Tensor, centroids: Tensor, sigma: float | Tensor) -> Tensor:
    """Per-sample RBF routing weights.

    q: (B, D), centroids: (K, D) -> (B, K) = softmax_k(-||q_b - c_k||^2 / (2 sigma^2)); rows sum to 1.
    Every layer at once: centroids (L, K, D) with sigma a float or (L, 1, 1) -> (L, B, K).
    Differentiable with respect to both q and centroids. Returned in at least float32 (cast for use).
    softmax subtracts the row max, so far-away inputs do not underflow to 0/0.
    """
    if not torch.is_tensor(sigma) and sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if q.dim() != 2 or centroids.dim() not in (2, 3) or q.shape[1] != centroids.shape[-1]:
        raise ValueError(f"expected q (B, D) and centroids (K, D) or (L, K, D), got {tuple(q.shape)} "
                         f"and {tuple(centroids.shape)}")
    sigma = sigma if torch.is_tensor(sigma) else float(sigma)  # a tensor (sigma_units = "gap") stays on device
    logits = -squared_distances(q, centroids) / (2.0 * sigma ** 2)  # ([L,] B, K)
    return torch.softmax(logits, dim=-1)


def centroid_gap(centroids: Tensor, eps: float = 1e-8) -> Tensor:
    """The squared distance between the two closest centroids: centroids (K, D) -> 0-d tensor (detached);
    (L, K, D) -> (L,), every layer at once.

    The unit in which ``sigma_units = "gap"`` states sigma: with ``sigma_eff^2 = sigma^2 * gap``, an input
    at a centroid prefers it over its nearest rival by ``1 / (2 sigma^2)`` logits, whatever the scale of
    the embedding. Detached, so that the centroids cannot sharpen or flatten the routing by moving apart.
    Fewer than two centroids: 1 (a single expert gets weight 1 anyway). Clamped at ``eps``: identical
    centroids give identical distances, hence uniform weights, not 0/0.
    """
    K = centroids.shape[-2]
    if K < 2:
        return torch.ones(centroids.shape[:-2], dtype=at_least_float32(centroids), device=centroids.device)
    c = centroids.detach().to(at_least_float32(centroids))
    d = squared_distances(c, c)
    d = d + torch.diag(torch.full((K,), float("inf"), dtype=d.dtype, device=d.device))  # ([L,] K, K)
    return d.flatten(-2).min(dim=-1).values.clamp(min=eps)


def standardizing_scale(variances: Tensor, shrinkage: float = 1.0) -> Tensor:
    """Per-coordinate scale of the ``standardized`` routing metric: a diagonal Mahalanobis distance
    ``sum_d s_d^2 (q_d - c_d)^2``, computed as the Euclidean distance of ``q * s`` and ``c * s``.

    variances: (K, D), each expert's within-task variance of its warm-up images -> s: (D,) with
    ``s^2 = 1 / (v + shrinkage * mean(v))``, ``v`` the experts' mean variance, normalised so that
    ``mean(s^2) = 1`` (the metric's overall scale is left to sigma). Coordinates along which the group's
    domains vary a lot within a task count less, quiet ones more; ``shrinkage`` (> 0) keeps a coordinate that
    is quiet in every domain from being amplified without bound (towards 0: plain standardisation; large:
    back towards Euclidean). Identical images everywhere (zero variance): all ones.
    """
    if variances.dim() != 2:
        raise ValueError(f"expected variances (K, D), got {tuple(variances.shape)}")
    if shrinkage <= 0:
        raise ValueError(f"shrinkage must be > 0, got {shrinkage}")
    v = variances.to(torch.float64).clamp(min=0).mean(0)  # (D,)
    if float(v.mean()) == 0.0:
        return torch.ones(v.shape, dtype=torch.float32, device=v.device)
    s2 = 1.0 / (v + shrinkage * v.mean())
    return (s2 / s2.mean()).sqrt().to(torch.float32)


def batch_mean_routing_weights(q: Tensor, centroids: Tensor, sigma: float | Tensor) -> Tensor:
    """The authors' behaviour: route the whole batch by its mean image embedding.

    q: (B, D), centroids: (K, D) or (L, K, D) -> (B, K) or (L, B, K) with every row equal to
    ``rbf_routing_weights(q.mean(0, keepdim=True), centroids, sigma)``. Mis-routes mixed-task batches;
    kept only for comparison with the paper.
    """
    w = rbf_routing_weights(q.mean(dim=0, keepdim=True), centroids, sigma)  # ([L,] 1, K)
    return w.expand(*w.shape[:-2], q.shape[0], w.shape[-1]).clone()


def uniform_routing_weights(B: int, K: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Ablation: every expert of the group weighted 1/K. -> (B, K) (an empty (B, 0) when K = 0)."""
    if K == 0:
        return torch.zeros(B, 0, device=device, dtype=dtype)
    return torch.full((B, K), 1.0 / K, device=device, dtype=dtype)


def oracle_routing_weights(expert_of_sample: Tensor, K: int, *, dtype=torch.float32) -> Tensor:
    """Ablation: weight 1 on the expert trained on each sample's own task.

    expert_of_sample: LongTensor (B,) with values in [0, K) -> one-hot (B, K).
    """
    idx = expert_of_sample.long().reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= K):
        raise ValueError(f"expert indices must lie in [0, {K}), got {idx.tolist()}")
    return F.one_hot(idx, num_classes=K).to(dtype)


class CentroidAccumulator:
    """Running sum, sum of squares and count of image embeddings: c_buf = their mean over a task's warm-up,
    and their per-coordinate variance (read by ``routing_metric = "standardized"``).

    Sums are kept in float64 on the CPU so that per-process (sum, count) pairs can be all-reduced by
    summation and give the same mean as one process seeing every sample.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.reset()

    def reset(self) -> None:
        self._sum = None if self.dim is None else torch.zeros(self.dim, dtype=torch.float64)
        self._square_sum = None if self.dim is None else torch.zeros(self.dim, dtype=torch.float64)
        self.count = 0

    def add(self, q: Tensor) -> None:
        """q: (B, D) (or (D,)) image embeddings of one batch; detached (c_buf is not trained)."""
        q = q.detach()
        if q.dim() == 1:
            q = q[None]
        q64 = q.to(device="cpu", dtype=torch.float64)
        s = q64.sum(0)  # (D,)
        if self._sum is None:
            self.dim = int(s.shape[0])
            self._sum = torch.zeros(self.dim, dtype=torch.float64)
            self._square_sum = torch.zeros(self.dim, dtype=torch.float64)
        if s.shape[0] != self.dim:
            raise ValueError(f"embedding size {s.shape[0]} != accumulator size {self.dim}")
        self._sum += s
        self._square_sum += q64.pow(2).sum(0)
        self.count += int(q.shape[0])

    def sums(self) -> tuple[Tensor, int]:
        """(sum (D,) float64, count) — all-reduce both by summation, then :meth:`load_sums`."""
        if self._sum is None:
            raise RuntimeError("CentroidAccumulator is empty and has no size yet")
        return self._sum.clone(), self.count

    def square_sums(self) -> Tensor:
        """(D,) float64 sum of squared embeddings — all-reduced like :meth:`sums`."""
        if self._square_sum is None:
            raise RuntimeError("CentroidAccumulator is empty and has no size yet")
        return self._square_sum.clone()

    def load_sums(self, sum_vec: Tensor, count: int, square_sum: Tensor | None = None) -> None:
        """Replace the state by (sum_vec (D,), count[, square_sum (D,)]), e.g. the all-reduced totals.
        Without ``square_sum`` (a checkpoint written before it was kept) :meth:`variance` is unavailable."""
        s = sum_vec.detach().reshape(-1).to(device="cpu", dtype=torch.float64).clone()
        if int(count) < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.dim, self._sum, self.count = int(s.shape[0]), s, int(count)
        self._square_sum = None if square_sum is None else \
            square_sum.detach().reshape(-1).to(device="cpu", dtype=torch.float64).clone()

    def mean(self) -> Tensor:
        """c_buf: (D,) float32, the mean of every embedding added (or loaded) so far."""
        if self.count == 0:
            raise RuntimeError("CentroidAccumulator.mean() with no embeddings added")
        return (self._sum / self.count).to(torch.float32)

    def variance(self) -> Tensor:
        """(D,) float32 per-coordinate (population) variance of every embedding added so far."""
        if self.count == 0 or self._square_sum is None:
            raise RuntimeError("CentroidAccumulator.variance() with no embeddings (or no square sums) loaded")
        mean = self._sum / self.count
        return (self._square_sum / self.count - mean.pow(2)).clamp(min=0).to(torch.float32)


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


def group_layer_weights(q: Tensor, centroids: Tensor, sigma: float, mode: str, sigma_units: str = "absolute",
                        scale: Tensor | None = None) -> Tensor:
    """Routing weights over one group's experts at every layer.

    q: (B, D) image embeddings; centroids: (L, K_g, D) -> (L, B, K_g). ``mode``: per_sample | batch_mean |
    uniform (oracle routing overrides these weights where a record's own expert is known: method.py).
    ``sigma_units``: "absolute" -- sigma in the embedding's units (the paper's); "gap" -- sigma relative to
    the layer's closest pair of centroids in the group (``sigma_eff^2 = sigma^2 * centroid_gap``), so that
    the sharpness between two domains does not depend on how far apart the embedding happens to put them.
    ``scale``: (D,) per-coordinate scale of the ``standardized`` metric (:func:`standardizing_scale`),
    applied to both q and the centroids before any distance (and before the gap); None: Euclidean.
    """
    if sigma_units not in SIGMA_UNITS:
        raise ValueError(f"sigma_units must be one of {SIGMA_UNITS}, got {sigma_units!r}")
    L, K, _ = centroids.shape
    B = q.shape[0]
    if mode == "uniform":
        return uniform_routing_weights(B, K, device=q.device).unsqueeze(0).expand(L, B, K)
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
