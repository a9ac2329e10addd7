"""CRAM's gated orthogonality penalty during a stable phase, docs/cram.md "Orthogonality penalty": the new
expert's output on each adapted module's image-token-pooled input, projected onto the group's history
subspace, weighted per sample by the routing mass the earlier experts receive.

The math is in pure functions (history basis, energy, gated penalty); :class:`OrthogonalityPenalty` holds the
per-phase state: each module's history basis, the pooled inputs of the current forward (captured by the
adapters) and how modules are batched on a GPU.

Shapes: B = batch, d_in / d_out = the adapted linear's input / output size, r = the new expert's rank,
m = size of a history basis, M = modules stacked in one batched pass.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cramcl.adapters.multi_lora import MultiLoRALinear
from cramcl.methods.cram.consolidation import history_basis
from cramcl.utils.dtypes import at_least_float32


def column_history_basis(Bs: list[Tensor], tol: float = 1e-6, *, dim: int | None = None) -> Tensor:
    """Orthonormal basis of the union of the column spaces of the B's.

    Bs: list of (d_out, r_j) -> (d_out, m); ``dim`` = d_out for an empty list.
    """
    return history_basis([b.T for b in Bs], tol, dim=dim)


def orth_history_basis(As: list[Tensor], Bs: list[Tensor], d_in: int, d_out: int,
                       tol: float = 1e-6) -> Tensor:
    """Q_hist for the orthogonality penalty: a basis in output space.

    As: list of (r_j, d_in), Bs: list of (d_out, r_j) of the earlier same-group experts ->
    (d_out, m): the row space of the A's when d_in == d_out, else the column space of the B's.
    """
    if d_in == d_out:
        return history_basis(As, tol, dim=d_in)
    return column_history_basis(Bs, tol, dim=d_out)


def orthogonality_energy(z: Tensor, Q_hist: Tensor) -> Tensor:
    """Energy of the new expert's output inside the history subspace: ``E_b = ||Q_hist^T z_b||^2``.

    z: (B, d_out) = the new expert's output on the pooled image-token hidden states,
    Q_hist: (d_out, m) orthonormal -> (B,) in at least float32; zeros when m = 0 (gradient still flows).
    """
    dtype = at_least_float32(z, Q_hist)
    proj = z.to(dtype) @ Q_hist.to(device=z.device, dtype=dtype)  # (B, m)
    return proj.pow(2).sum(-1)


def gated_orthogonality_penalty(z: Tensor, Q_hist: Tensor, gate: Tensor) -> Tensor:
    """``mean_b gate_b * E_b`` for one adapted module (lambda and the mean over layers: caller's).

    z: (B, d_out), Q_hist: (d_out, m), gate: (B,) = summed routing weight of the earlier experts
    per sample -> scalar. 0 for an empty batch.
    """
    E = orthogonality_energy(z, Q_hist)  # (B,)
    if E.numel() == 0:
        return E.sum()
    return (gate.to(device=E.device, dtype=E.dtype).reshape(-1) * E).mean()


def stacked_gated_penalties(h: Tensor, A: Tensor, B: Tensor, scale: Tensor, Q_hist: Tensor, gate: Tensor) -> Tensor:
    """:func:`gated_orthogonality_penalty` of M same-shaped modules in one batched pass (one launch per op
    instead of one per module: on a GPU, 128 modules' small ops otherwise leave the device waiting on the host).

    h: (M, B, d_in) pooled inputs, A: (M, r, d_in), B: (M, d_out, r), scale: (M,) the new expert's scales,
    Q_hist: (M, d_out, m), gate: (M, B) -> (M,) penalties, equal to the per-module function's (same op order).
    """
    dtype = at_least_float32(A, Q_hist)
    hA = torch.bmm(h.to(A.dtype), A.transpose(1, 2))  # (M, B, r)
    z = torch.bmm(scale.to(hA.dtype).view(-1, 1, 1) * hA, B.transpose(1, 2))  # (M, B, d_out)
    E = torch.bmm(z.to(dtype), Q_hist.to(device=z.device, dtype=dtype)).pow(2).sum(-1)  # (M, B)
    if E.shape[1] == 0:
        return E.sum(-1)
    return (gate.to(device=E.device, dtype=E.dtype) * E).mean(-1)


class OrthogonalityPenalty:
    def __init__(self):
        self.new: int | None = None
        self.q_hist: dict[str, Tensor] = {}  # module key -> (d_out, m) history basis
        self.batches: list[list[int]] = []  # module positions stacked together on a GPU (one shape each)
        self._indices: list[tuple] = []  # per batch, on device: layer indices, new expert's scales, stacked bases
        self._order: Tensor | None = None  # batched results back to the modules' order
        self.pooled: dict[str, Tensor] = {}  # module key -> (B, d_in), this forward's pooled inputs

    @property
    def active(self) -> bool:
        return bool(self.q_hist)

    def start(self, layers: dict[str, MultiLoRALinear], new: int, history: list[int], device) -> None:
        """A stable phase begins: expert ``new`` trains beside the group's earlier experts ``history``."""
        self.new = new
        self.q_hist = {key: orth_history_basis([layer.experts_A[k].detach().float() for k in history],
                                               [layer.experts_B[k].detach().float() for k in history],
                                               layer.in_features, layer.out_features).to(device)
                       for key, layer in layers.items()} if history else {}
        by_shape: dict[tuple, list[int]] = {}
        for i, (key, layer) in enumerate(layers.items() if self.q_hist else ()):
            shape = (*layer.experts_A[new].shape, layer.out_features, self.q_hist[key].shape[1])
            by_shape.setdefault(shape, []).append(i)
        self.batches = list(by_shape.values())
        # fixed for the phase: built once here, so a step copies nothing from the host
        mods = list(layers.values())
        self._indices = [(torch.tensor([mods[i].layer_index for i in b], device=device),
                          torch.tensor([mods[i].expert_scales[new] for i in b], device=device),
                          torch.stack([self.q_hist[mods[i].key] for i in b])) for b in self.batches]
        positions = [i for b in self.batches for i in b]
        self._order = torch.tensor(positions).argsort().to(device) if positions else None

    def stop(self) -> None:
        self.new, self.q_hist, self.batches, self.pooled = None, {}, [], {}
        self._indices, self._order = [], None

    def capture(self, layer: MultiLoRALinear, x: Tensor, image_mask: Tensor) -> None:
        """x: (B, T, d_in), image_mask: (B, T, 1) in x's dtype -> the module's input pooled over image tokens;
        detached: the penalty shapes the new expert, not the hidden states."""
        self.pooled[layer.key] = ((x * image_mask).sum(1) / image_mask.sum(1).clamp(min=1)).detach()

    def __call__(self, layers: dict[str, MultiLoRALinear], gates: Tensor) -> Tensor:
        """gates: (L, B) routing mass on the earlier experts -> (modules,) penalties in ``layers``' order."""
        new = self.new
        if gates.is_cuda:  # a GPU step is bound by launches: one batched pass per module shape, not 128
            return self._stacked(layers, gates)
        # per module: no launches to save on a CPU, and this op order is what CPU runs have always computed
        return torch.stack([gated_orthogonality_penalty(
            layer.expert_scales[new] * (self.pooled[key].to(layer.experts_A[new].dtype)
                                        @ layer.experts_A[new].t()) @ layer.experts_B[new].t(),
            self.q_hist[key], gates[layer.layer_index]) for key, layer in layers.items()])

    def _stacked(self, layers: dict[str, MultiLoRALinear], gates: Tensor) -> Tensor:
        new, mods = self.new, list(layers.values())
        values = []
        for batch, (layer_index, scales, q_hist) in zip(self.batches, self._indices):
            group = [mods[i] for i in batch]
            values.append(stacked_gated_penalties(
                torch.stack([self.pooled[m.key] for m in group]), torch.stack([m.experts_A[new] for m in group]),
                torch.stack([m.experts_B[new] for m in group]), scales, q_hist, gates[layer_index]))
        return torch.cat(values)[self._order]
