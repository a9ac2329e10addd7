"""`olora`: O-LoRA (Wang et al., Findings of EMNLP 2023): a new LoRA per task, kept orthogonal to the old ones.

Source: the authors' code (cmnfriend/O-LoRA: the orthogonality loss in its model code, lambda1 = 0.5 in its
training scripts) and MCITlib's multimodal port (lambda1 = 0.05); read, not copied (docs/peers.md, "O-LoRA").

Per task t every adapted linear gets a fresh LoRA (rank 8, alpha 16, so scale 2); the earlier tasks' LoRAs are
frozen but stay in the forward with weight 1 (no routing, no task id):

    y = W0 x + sum_{i <= t} s B_i A_i x

and the task's loss adds the orthogonality penalty over every adapted module

    L = L_lm + lambda1 * sum_modules sum_{i < t} sum_{j, k} |(A_t A_i^T)_{jk}|

which pushes the rows of the new A (the input subspace the new task writes from) away from the old ones.
The penalty (already multiplied by lambda1) is reported as the aux loss ``orth``.

``lambda1`` is a number or a named value: ``original`` = 0.5 (the O-LoRA scripts; the default, as a faithful
baseline) or ``mcitlib`` = 0.05 (MCITlib's multimodal port). At 0.5 the penalty outweighs the LM loss, so
new tasks learn less; both values forget, since every later LoRA stays in the forward of the earlier tasks'
inputs (docs/peers.md, "O-LoRA").

Where we differ from the sources:
* the LoRAs sit on q, k, v, o of every decoder layer (the adapted set every method here shares);
* O-LoRA's optional L2 term on the new LoRA (lambda2) is left out (the original scripts turn it off);
* MCITlib's port also trains the new LoRA alone (the old ones out of its forward); we keep O-LoRA's forward,
  with every earlier LoRA in it, for both values of lambda1.

``PerTaskLora`` (one fresh, trainable LoRA per task; all earlier ones frozen) is shared with ``oracle-lora``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cramcl.errors import BadInputError
from cramcl.methods.lora_ft import LoraFTConfig
from cramcl.methods.per_task import PerTaskLora


LAMBDA1 = {"original": 0.5, "mcitlib": 0.05}  # O-LoRA's scripts; MCITlib's multimodal port


@dataclass
class OLoraConfig(LoraFTConfig):
    lambda1: float | str = "original"  # a number >= 0 or a name of LAMBDA1

    def lambda1_value(self) -> float:
        """The penalty weight in effect (a name resolved through LAMBDA1)."""
        return float(LAMBDA1[self.lambda1]) if isinstance(self.lambda1, str) else float(self.lambda1)

    def problems(self) -> list[str]:
        """Settings out of range, one line each (checked when the config is resolved)."""
        if isinstance(self.lambda1, str):
            ok = self.lambda1 in LAMBDA1
        else:
            ok = self.lambda1 >= 0
        out = [] if ok else [f"lambda1: {self.lambda1!r} must be a number >= 0 or one of "
                             f"{', '.join(f'{k} ({v})' for k, v in LAMBDA1.items())}"]
        return out + ([] if 0 <= self.dropout < 1 else [f"dropout: {self.dropout!r} must be in [0, 1)"])


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

    def __init__(self, config: OLoraConfig):
        super().__init__(config)
        problems = config.problems()
        if problems:
            raise BadInputError([f"method.{p}" for p in problems])
        self.lambda1 = config.lambda1_value()

    def compute_loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        loss, aux = super().compute_loss(model, batch)
        t = self.current_task
        if not t or self.lambda1 == 0:  # task 0 (or eval): no earlier LoRA to be orthogonal to
            return loss, aux
        energy = torch.stack([olora_penalty(layer.experts_A[t], [layer.experts_A[i] for i in range(t)])
                              for layer in self.layers.values()]).sum()
        orth = self.lambda1 * energy
        aux["orth"] = orth.detach()
        return loss + orth.to(loss.dtype), aux
    # every LoRA is in every forward: active per sample = stored (the base's count)
