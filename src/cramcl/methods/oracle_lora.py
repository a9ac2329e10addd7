"""`oracle-lora`: one LoRA per task, picked at evaluation by the TRUE TASK ID (an isolation upper bound).

This method is an oracle: it declares ``uses_task_id_at_eval = True``, so the evaluation hands it
``batch["task_index"]`` (the stream index of the task the test records belong to) and it routes each sample
one-hot to that task's LoRA. Real users at inference do not have the task id; results of this method are
marked as using it (``metrics.json: uses_task_id_at_eval``, "(uses task id)" in comparisons) and bound what
perfect task identification plus perfect isolation can reach. Parameters grow linearly with the stream.

Training: task t adds a fresh LoRA (rank 8, alpha 16) on every adapted linear and trains it alone (routing
one-hot on t; every earlier LoRA is frozen and gets weight 0), so tasks never interfere: BWT = 0 up to
numerical noise. The one-hot weights run through the shared ragged-rank matmul of ``MultiLoRALinear`` (the
zero-weighted experts cost compute but contribute nothing); ``active_per_sample`` counts one LoRA.

Source: the field's per-task LoRA with the oracle task id (docs/peers.md, "Bounds: MTL, oracle-LoRA,
LoRA-FT, zero-shot"); no single original. Ours: rank 8, alpha 16 on q, k, v, o, the same expert shape as the
other per-task baselines, so its gap to them is routing alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from cramcl.methods.base import Services
from cramcl.methods.lora_ft import LoraFTConfig
from cramcl.methods.per_task import PerTaskLora


@dataclass
class OracleLoraConfig(LoraFTConfig):
    """rank, alpha, dropout of each task's LoRA."""


class OracleLora(PerTaskLora):
    name = "oracle-lora"
    uses_task_id_at_eval = True  # routing reads batch["task_index"] at evaluation (see the module docstring)

    def setup(self, services: Services) -> None:
        super().setup(services)
        self._task_ids: int | Tensor | None = None
        self.context.route = self._route

    def prepare_batch(self, batch: dict, train: bool) -> None:
        if train:
            self._task_ids = self.current_task
            return
        ids = batch.get("task_index")
        if ids is None:
            raise RuntimeError("oracle-lora routes by the true task id: evaluation must pass batch['task_index'] "
                               "(the method declares uses_task_id_at_eval = True)")
        self._task_ids = ids

    def _route(self, layer, x: Tensor) -> Tensor:
        """(B, K) one-hot weights: each sample uses only its task's LoRA."""
        ids = self._task_ids
        if ids is None:
            raise RuntimeError("oracle-lora: forward before prepare_batch (no task id to route by)")
        ids = torch.as_tensor(ids, device=x.device).long()
        if ids.dim() == 0:
            ids = ids.expand(x.shape[0])
        if ids.numel() and (int(ids.max()) >= layer.num_experts or int(ids.min()) < 0):
            raise RuntimeError(f"oracle-lora: task index {ids.tolist()} has no LoRA ({layer.num_experts} trained)")
        return F.one_hot(ids, layer.num_experts).to(x.dtype)

    def param_counts(self) -> dict[str, int]:
        counts = super().param_counts()
        trained = any(layer.num_experts for layer in self.layers.values())
        counts["active_per_sample"] = self.one_expert_params() if trained else 0
        return counts
