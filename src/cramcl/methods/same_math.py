"""SAME's math as pure tensor functions (docs/peers.md, "SAME").

* spectra of a layer's inputs: a randomized range finder for the top principal directions and their stds,
  the energy rule that keeps k of them, and the merge of two spectra (a task's batches, the tasks so far);
* router drift control: smoothed, clipped per-direction factors and the router-gradient rewrite;
* expert drift control: the curvature preconditioner of a LoRA A-gradient;
* adaptive activation: EMAs of utilisation / importance and the freezing mask;
* routing: the batch-mean masked router weights (training) and the prototype prior with top-k (inference).

Shapes: N = tokens, d = the adapted linear's input size, k = kept directions, K = experts (one per task),
B = batch, T = sequence length, r = an expert's rank, D = an embedding size. Computations run in at least
float32 (float64 stays float64).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from cramcl.routing.prototypes import cosine_to_prototypes

_EPS = 1e-12


def _work(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ------------------------------------------------------------------------------------------- spectra
def principal_directions(X: Tensor, k: int = 64, oversample: int = 8, power_iters: int = 2,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Top principal directions of the rows of X by a randomized range finder (Halko et al.).

    X: (N, d) samples (centred here) -> V: (d, k') orthonormal columns, s: (k',) stds (sigma_j / sqrt(N-1)),
    descending, with k' = min(k, N, d). Sketch Y = Xc Omega (Omega: (d, k' + oversample) Gaussian), a few
    power iterations with re-orthonormalisation, then the SVD of the small (l, d) matrix Q^T Xc.
    """
    X = _work(X.detach())
    N, d = X.shape
    k = min(int(k), N, d)
    if k <= 0:
        return X.new_zeros(d, 0), X.new_zeros(0)
    Xc = X - X.mean(0, keepdim=True)
    l = min(k + int(oversample), N, d)
    gen_device = generator.device if generator is not None else X.device
    omega = torch.randn(d, l, generator=generator, dtype=X.dtype, device=gen_device).to(X.device)
    Q = torch.linalg.qr(Xc @ omega).Q  # (N, l)
    for _ in range(int(power_iters)):
        Z = torch.linalg.qr(Xc.T @ Q).Q  # (d, l)
        Q = torch.linalg.qr(Xc @ Z).Q  # (N, l)
    _, S, Vh = torch.linalg.svd(Q.T @ Xc, full_matrices=False)  # (l,), (l, d)
    return Vh[:k].T.contiguous(), S[:k] / math.sqrt(max(N - 1, 1))


def energy_rank(s: Tensor, energy: float = 0.9) -> int:
    """Smallest k whose directions cover ``energy`` of sum(s^2). s: (n,) descending -> int in [0, n]."""
    e = _work(s.detach()).pow(2)
    total = float(e.sum())
    if total <= 0.0:
        return 0
    covered = torch.cumsum(e, 0) / total
    return min(int((covered < energy - 1e-6).sum()) + 1, int(s.numel()))


def merge_spectra(V1: Tensor, s1: Tensor, w1: float, V2: Tensor, s2: Tensor, w2: float,
                  k: int = 64) -> tuple[Tensor, Tensor]:
    """Spectrum of the weighted covariance mix (w1 C1 + w2 C2) / (w1 + w2), C_i = V_i diag(s_i^2) V_i^T.

    V_i: (d, k_i), s_i: (k_i,) -> V: (d, k'), s: (k',), k' = min(k, k1 + k2, d): SVD of the stacked
    rows sqrt(w_i / (w1 + w2)) diag(s_i) V_i^T.
    """
    total = float(w1) + float(w2)
    rows = [math.sqrt(w / total) * _work(s)[:, None] * _work(V).T for V, s, w in ((V1, s1, w1), (V2, s2, w2)) if w > 0]
    _, S, Vh = torch.linalg.svd(torch.cat(rows, 0), full_matrices=False)
    k = min(int(k), S.numel())
    return Vh[:k].T.contiguous(), S[:k]


# ------------------------------------------------------------------------------------------- router drift
def smooth(s: Tensor, window: int = 3) -> Tensor:
    """Moving average over neighbouring directions; edges average the entries they have. (k,) -> (k,)"""
    s = _work(s)
    if window <= 1 or s.numel() <= 1:
        return s.clone()
    kernel = torch.ones(1, 1, window, dtype=s.dtype, device=s.device)
    pad = window // 2
    total = torch.nn.functional.conv1d(s.view(1, 1, -1), kernel, padding=pad).view(-1)[: s.numel()]
    count = torch.nn.functional.conv1d(torch.ones_like(s).view(1, 1, -1), kernel, padding=pad).view(-1)[: s.numel()]
    return total / count


def spectral_factors(s: Tensor, window: int = 3, lo: float = 0.8, hi: float = 1.2) -> Tensor:
    """c_j = clip((1/s~_j) / max(1/s~), lo, hi) with s~ = smooth(s, window). s: (k,) -> c: (k,).

    (1/s~_j)/max(1/s~) = min(s~)/s~_j <= 1: the strongest input directions are damped down to ``lo``."""
    if s.numel() == 0:
        return _work(s).clone()
    inv = 1.0 / smooth(s, window).clamp_min(_EPS)
    return (inv / inv.max()).clamp(lo, hi)


def spectral_router_grad(G: Tensor, V: Tensor, c: Tensor) -> Tensor:
    """G' = (G V) diag(c) V^T + G (I - V V^T).

    G: (K, d) router-weight gradient, V: (d, k) orthonormal, c: (k,) -> (K, d) in G's dtype. The part of
    each row inside span(V) is rescaled direction by direction; the part outside is left unchanged."""
    Gw, V, c = _work(G), V.to(device=G.device, dtype=_work(G).dtype), c.to(device=G.device, dtype=_work(G).dtype)
    P = Gw @ V  # (K, k)
    return (Gw + (P * (c - 1.0)) @ V.T).to(G.dtype)


# ------------------------------------------------------------------------------------------- expert drift
def curvature_precondition(G_A: Tensor, U: Tensor, s: Tensor, mu: float = 0.9) -> Tensor:
    """G_A^T <- U diag(1/(s_j + mu)) U^T G_A^T + (1/mu) (I - U U^T) G_A^T.

    G_A: (r, d) gradient of a LoRA A, U: (d, k) orthonormal directions of earlier tasks' inputs, s: (k,)
    their stds -> (r, d) in G_A's dtype. Written on rows: G U diag(1/(s+mu)) U^T + (G - G U U^T) / mu."""
    Gw = _work(G_A)
    U, s = U.to(device=G_A.device, dtype=Gw.dtype), s.to(device=G_A.device, dtype=Gw.dtype)
    P = Gw @ U  # (r, k)
    return ((P / (s + mu)) @ U.T + (Gw - P @ U.T) / mu).to(G_A.dtype)


# ------------------------------------------------------------------------------------------- activation
def ema_update(old: Tensor, new: Tensor, decay: float = 0.95, fresh: Tensor | None = None) -> Tensor:
    """decay * old + (1 - decay) * new; entries where ``fresh`` (bool) is set take ``new`` as is.
    old, new, fresh: (K,) -> (K,)"""
    out = decay * old + (1.0 - decay) * new
    return torch.where(fresh, new, out) if fresh is not None else out


def minmax(x: Tensor) -> Tensor:
    """(x - min) / (max - min); a constant vector gives zeros. (K,) -> (K,)"""
    span = x.max() - x.min() if x.numel() else x.new_zeros(())
    return (x - x.min()) / span if float(span) > 0 else torch.zeros_like(x)


def activation_mask(usage: Tensor, importance: Tensor, current: int, threshold: float = 0.1) -> Tensor:
    """Experts kept active: score = minmax(usage) - minmax(importance) >= threshold, and always ``current``.

    usage, importance: (K,) EMAs -> bool (K,)."""
    keep = (minmax(_work(usage)) - minmax(_work(importance))) >= threshold
    keep[current] = True
    return keep


def masked_batch_weights(probs: Tensor, valid: Tensor, mask: Tensor) -> Tensor:
    """g = normalize(m * mean_n softmax(W_r x_n)) over the batch's valid tokens.

    probs: (B, T, K) per-token router softmax, valid: (B, T) 0/1, mask: bool (K,) -> (K,) summing to 1."""
    v = valid.to(probs.dtype).unsqueeze(-1)
    p = (probs * v).sum((0, 1)) / v.sum().clamp_min(1.0)
    g = p * mask.to(p.dtype)
    return g / g.sum().clamp_min(_EPS)


def token_mean(probs: Tensor, valid: Tensor) -> Tensor:
    """Per-sample mean of the router softmax over its valid tokens. probs: (B, T, K), valid: (B, T) -> (B, K)"""
    v = valid.to(probs.dtype).unsqueeze(-1)
    return (probs * v).sum(1) / v.sum(1).clamp_min(1.0)


# ------------------------------------------------------------------------------------------- inference
def prototype_prior(q: Tensor, t: Tensor, protos_img: Tensor, protos_txt: Tensor, image_weight: float = 0.2,
                    scale: float = 28.0) -> Tensor:
    """Task prior softmax(scale * (w cos(q, P_img) + (1 - w) cos(t, P_txt))).

    q: (B, D_q) image and t: (B, D_t) text embeddings, protos_img: (K, D_q), protos_txt: (K, D_t) -> (B, K)."""
    sim = image_weight * cosine_to_prototypes(q, protos_img) + (1 - image_weight) * cosine_to_prototypes(t, protos_txt)
    return torch.softmax(scale * sim, dim=-1)


def topk_renormalize(w: Tensor, k: int = 2) -> Tensor:
    """Keep each row's k largest entries, zero the rest, renormalise rows to 1. w: (B, K) -> (B, K)"""
    k = min(int(k), w.shape[-1])
    idx = w.topk(k, dim=-1).indices
    kept = torch.zeros_like(w).scatter(-1, idx, w.gather(-1, idx))
    return kept / kept.sum(-1, keepdim=True).clamp_min(_EPS)
