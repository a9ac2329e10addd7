"""`olora`: O-LoRA (Wang et al., Findings of EMNLP 2023): a new LoRA per task, kept orthogonal to the old ones.

Per task t every adapted linear gets a fresh LoRA (rank 8, alpha 16, so scale 2); the earlier tasks' LoRAs are
frozen but stay in the forward with weight 1 (no routing, no task id):

    y = W0 x + sum_{i <= t} s B_i A_i x

and the task's loss adds the orthogonality penalty over every adapted module

    L = L_lm + lambda1 * sum_modules sum_{i < t} sum_{j, k} |(A_t A_i^T)_{jk}|      (lambda1 = 0.5)

which pushes the rows of the new A (the input subspace the new task writes from) away from the old ones.
The penalty (already multiplied by lambda1) is reported as the aux loss ``orth``. O-LoRA's optional L2 term on
the new LoRA (lambda2) is left out (PEERS.md names lambda1 only).

``PerTaskLora`` (one fresh, trainable LoRA per task; all earlier ones frozen) is shared with ``oracle-lora``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cramcl.methods.lora_ft import LoraFTConfig
from cramcl.methods.per_task import PerTaskLora


@dataclass
class OLoraConfig(LoraFTConfig):
    lambda1: float = 0.5


def olora_penalty(A_new: Tensor, old_As: list[Tensor]) -> Tensor:
    """O-LoRA's orthogonality energy of one module: ``sum_i sum_{j,k} |(A_new A_i^T)_{jk}|``.

    A_new: (r_t, d_in), the new task's LoRA down-projection (receives the gradient);
    old_As: [(r_i, d_in)], the earlier tasks' (detached: they are frozen). Returns a scalar (0 when no old A)."""
    if not old_As:
        return A_new.new_zeros(())
    old = torch.cat([a.detach().to(A_new.dtype) for a in old_As], dim=0)  # (sum_i r_i, d_in)
    return (A_new @ old.t()).abs().sum()  # (r_t, sum_i r_i) -> ()


class OLora(PerTaskLora):
    name = "olora"

    def compute_loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        loss, aux = super().compute_loss(model, batch)
        t = self.current_task
        if not t or self.cfg.lambda1 == 0:  # task 0 (or eval): no earlier LoRA to be orthogonal to
            return loss, aux
        energy = torch.stack([olora_penalty(layer.experts_A[t], [layer.experts_A[i] for i in range(t)])
                              for layer in self.layers.values()]).sum()
        orth = self.cfg.lambda1 * energy
        aux["orth"] = orth.detach()
        return loss + orth.to(loss.dtype), aux
    # every LoRA is in every forward: active per sample = stored (the base's count)
