"""CRAM's gated orthogonality penalty over a model's adapted modules during a stable phase (CRAM.md part 6):
the new expert's output on each module's image-token-pooled input, projected onto the group's history
subspace, weighted per sample by the routing mass the earlier experts receive.

The math is in :mod:`cramcl.methods.cram_math`; this holds the per-phase state: each module's history basis,
the pooled inputs of the current forward (captured by the adapters) and how modules are batched on a GPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cramcl.adapters.multi_lora import MultiLoRALinear
from cramcl.methods.cram_math import gated_orthogonality_penalty, orth_history_basis, stacked_gated_penalties


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
        # per module: no launches to save on a CPU, and its op order is the published CPU results'
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
