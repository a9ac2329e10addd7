"""CRAM's consolidation at the end of a task's warm-up, as pure tensor functions: the buffer's SVD, adaptive
rank and the capability gap (novelty filter, projection off the group's history), docs/cram.md
"Consolidation".

Scale convention (used everywhere in cramcl):
  * the buffer LoRA's update is ``delta_buf = s * B_buf @ A_buf`` with ``s = alpha / R``;
  * an expert's factors absorb everything: ``delta_k = B_k @ A_k`` (scale 1).
Consolidation therefore factors ``s * B_buf @ A_buf`` itself, and an adapted layer applies experts with
scale 1. (The authors' code applies s a second time to the experts; we do not.)

Shapes: d_in / d_out = the adapted linear's input / output size, R = buffer rank, R' = min(d_out, R,
d_in) directions of the buffer's SVD, r = the new expert's rank, m = size of a history basis.
Computations run in at least float32 (float64 inputs stay float64); results come back in that dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cramcl.utils.dtypes import at_least_float32
from cramcl.utils.threads import lapack_on_one_thread

_EPS = 1e-12


# ------------------------------------------------------------------------------------------- SVD
def buffer_update_svd(B_buf: Tensor, A_buf: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the buffer's update ``scale * B_buf @ A_buf`` without forming it.

    B_buf: (d_out, R), A_buf: (R, d_in) -> U: (d_out, R'), S: (R',) descending, Vh: (R', d_in),
    with U diag(S) Vh = scale * B_buf @ A_buf. QR of the tall B_buf, then SVD of the small core
    ``scale * R_B @ A_buf`` ((<= R) x d_in): O(d R^2) instead of an SVD of a d_out x d_in matrix.
    """
    dtype = at_least_float32(B_buf, A_buf)
    Q_B, R_B = torch.linalg.qr(B_buf.detach().to(dtype), mode="reduced")  # (d_out, k), (k, R)
    core = float(scale) * (R_B @ A_buf.detach().to(dtype))  # (k, d_in)
    U_c, S, Vh = torch.linalg.svd(core, full_matrices=False)  # (k, R'), (R',), (R', d_in)
    return Q_B @ U_c, S, Vh


# ------------------------------------------------------------------------------------------- history
@lapack_on_one_thread  # its SVD feeds a rank and a penalty basis: the same bits at any thread count
def history_basis(As: list[Tensor], tol: float = 1e-6, *, dim: int | None = None) -> Tensor:
    """Orthonormal basis of the union of the row spaces of the A's.

    As: list of (r_j, d_in) -> (d_in, m). Directions whose singular value in the stacked rows is below
    ``tol * max`` are dropped (rank-deficient or duplicated history). An empty list (or all-zero rows)
    gives (d_in, 0); ``dim`` supplies d_in when the list is empty.
    """
    if not As:
        if dim is None:
            raise ValueError("history_basis: empty list needs dim=d_in")
        return torch.zeros(dim, 0)
    dtype = at_least_float32(*As)
    M = torch.cat([a.detach().to(dtype) for a in As], dim=0)  # (sum r_j, d_in)
    if dim is not None and M.shape[1] != dim:
        raise ValueError(f"history_basis: rows have size {M.shape[1]}, expected {dim}")
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    if S.numel() == 0 or float(S[0]) <= 0.0:
        return torch.zeros(M.shape[1], 0, dtype=dtype, device=M.device)
    keep = S > tol * S[0]
    return Vh[keep].T.contiguous()


def novelty(Vh: Tensor, Q: Tensor) -> Tensor:
    """Share of each direction outside span(Q): ``||v - Q Q^T v|| / ||v||``.

    Vh: (n, d_in) rows v, Q: (d_in, m) orthonormal columns -> (n,) in [0, 1]; all ones when m = 0.
    """
    dtype = at_least_float32(Vh, Q)
    V, Q = Vh.to(dtype), Q.to(device=Vh.device, dtype=dtype)
    resid = V - (V @ Q) @ Q.T  # (n, d_in)
    return resid.norm(dim=-1) / V.norm(dim=-1).clamp_min(_EPS)


# ------------------------------------------------------------------------------------------- selection
ALLOC_UNITS = ("absolute", "energy")


def allocation_count(S: Tensor, tau_alloc: float, alloc_units: str = "absolute") -> int:
    """How many of the strongest directions pass the allocation threshold (before the r_max cap).

    S: (R',) singular values. ``absolute`` (the paper's): directions with S > tau_alloc, a threshold in the
    update's own units, so what passes depends on the layer width and the learning rate. ``energy``: the fewest
    strongest directions whose squared singular values hold a share tau_alloc (in (0, 1]) of the update's
    squared Frobenius norm, a threshold that means the same at any width and lr (docs/cram.md, "Consolidation").
    """
    S = S.detach().reshape(-1).double()
    if alloc_units == "absolute":
        return int((S > tau_alloc).sum())
    if alloc_units != "energy":
        raise ValueError(f"alloc_units must be one of {ALLOC_UNITS}, got {alloc_units!r}")
    energy = S.sort(descending=True).values.pow(2)
    total = float(energy.sum())
    if total <= 0:
        return 0
    share = energy.cumsum(0) / total
    # the first position whose cumulative share reaches tau (tolerant to the last bit of rounding)
    return min(int((share < tau_alloc - 1e-12).sum()) + 1, int(S.numel()))


def select_expert_directions(S: Tensor, novelty: Tensor | None, tau_alloc: float, tau_novel: float,
                             r_min: int, r_max: int, fixed_rank: int | None = None,
                             alloc_units: str = "absolute") -> Tensor:
    """Which SVD directions of the buffer become the new expert (docs/cram.md "Consolidation", steps 2-4).

    S: (R',) singular values, novelty: (R',) or None (no earlier experts in the group, or the capability gap
    switched off) -> LongTensor (r,) of kept indices into S, in descending-S order.
      2. candidates: the strongest directions passing tau_alloc (:func:`allocation_count`), at most r_max;
         none passes -> the strongest one;
      3. with novelty: keep candidates with novelty > tau_novel; none survives -> the strongest
         candidate;
      4. pad with the next strongest directions not yet kept up to r_min; never above r_max nor R'.
    ``fixed_rank`` (ablation "adaptive rank off"): exactly min(fixed_rank, R') directions, whatever tau_alloc,
    r_min and r_max say; with novelty the novel directions (novelty > tau_novel) come first, strongest first,
    then the strongest of the others, so the capability gap still picks which directions are kept.
    """
    S = S.detach().reshape(-1)
    n = int(S.shape[0])
    order = torch.argsort(S, descending=True, stable=True).tolist()
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    nov = None
    if novelty is not None:
        nov = novelty.detach().reshape(-1)
        if nov.shape[0] != n:
            raise ValueError(f"novelty has {nov.shape[0]} entries, S has {n}")
    rank_of = {i: pos for pos, i in enumerate(order)}
    if fixed_rank is not None:
        if fixed_rank < 1:
            raise ValueError(f"fixed_rank must be >= 1, got {fixed_rank}")
        novel_first = sorted(order, key=lambda i: (nov is not None and float(nov[i]) <= tau_novel, rank_of[i]))
        return torch.tensor(sorted(novel_first[:min(int(fixed_rank), n)], key=rank_of.__getitem__), dtype=torch.long)
    if r_max < 1:
        raise ValueError(f"r_max must be >= 1, got {r_max}")
    cand = order[:min(allocation_count(S, tau_alloc, alloc_units), r_max)] or [order[0]]
    kept = ([i for i in cand if float(nov[i]) > tau_novel] or [cand[0]]) if nov is not None else list(cand)
    target = min(int(r_min), int(r_max), n)
    for i in order:  # padding in S order, among every direction (not only candidates)
        if len(kept) >= target:
            break
        if i not in kept:
            kept.append(i)
    return torch.tensor(sorted(kept, key=rank_of.__getitem__), dtype=torch.long)


def _project_off(V: Tensor, Q: Tensor) -> tuple[Tensor, int]:
    """Project rows of V off span(Q) and renormalise (step 5).

    V: (r, d_in), Q: (d_in, m) -> ((r, d_in) unit rows orthogonal to span(Q), number replaced).
    Projection is done twice ("twice is enough") so float32 residues stay ~1e-7. A row lying (almost)
    entirely inside span(Q) has no direction left to renormalise; it is replaced by the unit vector
    e_j, projected off span(Q) and the rows kept so far, with j chosen to keep the most of it — it stays
    orthogonal to the history as required (a zero row if span(Q) + kept rows fill the whole space).
    """
    out, replaced = [], 0
    for v in V:
        for _ in range(2):
            v = v - Q @ (Q.T @ v)
        nrm = v.norm()
        if float(nrm) <= 1e-6:
            replaced += 1
            cols = [Q] + ([torch.stack(out, 1)] if out else [])
            basis, _ = torch.linalg.qr(torch.cat(cols, 1), mode="reduced")  # (d_in, m')
            if basis.shape[1] >= basis.shape[0]:
                out.append(torch.zeros_like(v))
                continue
            j = int(torch.argmin(basis.pow(2).sum(1)))  # e_j with the largest part outside span
            v = torch.zeros_like(v)
            v[j] = 1.0
            for _ in range(2):
                v = v - basis @ (basis.T @ v)
            nrm = v.norm()
        out.append(v / nrm)
    return (torch.stack(out, 0) if out else V[:0]), replaced


@dataclass
class ConsolidationResult:
    """A new expert from the buffer. B: (d_out, r), A: (r, d_in) with delta = B @ A (scale 1)."""

    B: Tensor
    A: Tensor
    rank: int
    kept: Tensor  # LongTensor (r,): indices of the kept SVD directions, descending S
    singular_values: Tensor  # (r,): S of the kept directions
    novelty: Tensor | None  # (R',): novelty of every direction, None without history
    n_candidates: int  # directions passing tau_alloc (capped at r_max; 1 if none passed)
    spectrum: Tensor | None = None  # (R',): every singular value of the buffer's update, descending
    n_replaced: int = 0  # kept directions that lay inside span(Q) and were replaced (see _project_off)


@lapack_on_one_thread  # a rank is a threshold on singular values: the same bits at any thread count
def consolidate_buffer(B_buf: Tensor, A_buf: Tensor, scale: float, history_As: list[Tensor], *,
                       tau_alloc: float = 0.08, tau_novel: float = 0.99, r_min: int = 4,
                       r_max: int = 9, fixed_rank: int | None = None, alloc_units: str = "absolute",
                       capability_gap: bool = True, tol: float = 1e-6) -> ConsolidationResult:
    """Turn one module's buffer into the task's new expert (docs/cram.md "Consolidation", steps 1-6).

    B_buf: (d_out, R), A_buf: (R, d_in), scale = alpha / R; history_As: A's (r_j, d_in) of the
    earlier experts in the same group (empty list: none).
      1. U S Vh = svd(scale * B_buf A_buf);  2-4. pick directions (:func:`select_expert_directions`);
      5. project kept rows of Vh off span(Q) (history row space) and renormalise;
      6. B = U_S diag(S_S^1/2), A = diag(S_S^1/2) V_S^T.
    Without history (or with ``capability_gap=False``, or ``tau_novel <= 0`` as in the authors' code: no
    filter, no projection), B @ A is the rank-r truncation of the buffer's update. With history, the rows of A
    are orthogonal to span(Q). Returns tensors in at least float32, detached.
    """
    U, S, Vh = buffer_update_svd(B_buf, A_buf, scale)
    d_in = A_buf.shape[1]
    if not capability_gap or tau_novel <= 0:
        # the ablation "no capability gap": neither the novelty filter nor the projection off the history,
        # so the expert is the buffer's plain truncation
        history_As = []
    Q = history_basis(history_As, tol, dim=d_in).to(device=Vh.device, dtype=Vh.dtype)
    has_history = Q.shape[1] > 0
    nov = novelty(Vh, Q) if has_history else None
    idx = select_expert_directions(S, nov, tau_alloc, tau_novel, r_min, r_max, fixed_rank, alloc_units)
    idx_dev = idx.to(S.device)
    n_cand = max(1, min(allocation_count(S, tau_alloc, alloc_units), int(r_max)))
    S_k, U_k, V_k = S[idx_dev], U[:, idx_dev], Vh[idx_dev]
    replaced = 0
    if has_history:
        V_k, replaced = _project_off(V_k, Q)
    root = S_k.clamp_min(0).sqrt()
    return ConsolidationResult(
        B=(U_k * root[None, :]).contiguous(),
        A=(root[:, None] * V_k).contiguous(),
        rank=int(idx.numel()),
        kept=idx,
        singular_values=S_k,
        novelty=nov,
        n_candidates=n_cand,
        n_replaced=replaced,
        spectrum=S.detach(),
    )
