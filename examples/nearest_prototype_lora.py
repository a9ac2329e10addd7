"""A complete continual method in one file: one LoRA per task, routed at test time to the task whose mean
image embedding (its prototype) lies nearest the sample's own (no task id).

Run it like a built-in method:

    cramcl run --method examples/nearest_prototype_lora.py:NearestPrototypeLora --profile quick
    cramcl compare --methods cram,examples/nearest_prototype_lora.py:NearestPrototypeLora --profile quick

See docs/methods.md for the lifecycle every method follows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cramcl.methods.base import Method, Services, freeze_all_experts


@dataclass
class NearestPrototypeConfig:
    """Settings (``method.rank=4`` on the command line); defaults used when nothing is given."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05


class NearestPrototypeLora(Method):
    name = "nearest-prototype-lora"
    config_class = NearestPrototypeConfig

    def setup(self, services: Services) -> None:
        super().setup(services)  # injects the adapted layers (no experts yet)
        self.prototypes: list[Tensor] = []  # one (D,) mean image embedding per finished task
        self._sum: Tensor | None = None
        self._count = 0
        self._route: Tensor | None = None
        self.context.route = lambda layer, x: self._route  # (B, K) weights every adapted layer reads

    def _embed(self, records) -> Tensor:
        """(B, D) unit-norm image embeddings from the backbone's own frozen vision features."""
        return F.normalize(self.services.backbone.pooled_image_features(records).float(), dim=-1)

    def before_task(self, task_index: int, task) -> None:
        super().before_task(task_index, task)
        freeze_all_experts(self.layers)
        for layer in self.layers.values():  # a fresh, trainable LoRA for this task
            layer.add_expert(self.cfg.rank, alpha=self.cfg.alpha)
        self._sum, self._count = None, 0

    def prepare_batch(self, batch: dict, train: bool) -> None:
        records = batch["records"]
        q = self._embed(records)
        k = len(self.prototypes) + (1 if train else 0)  # experts that exist now
        if train:  # the task's own LoRA, and its images into the prototype
            self._sum = q.sum(0) if self._sum is None else self._sum + q.sum(0)
            self._count += len(records)
            owner = torch.full((len(records),), k - 1)
            self.context.active = (k - 1,)
        else:  # no task id: the nearest prototype picks each sample's LoRA
            owner = (q @ torch.stack(self.prototypes).T).argmax(-1)
            self.context.active = tuple(sorted(set(owner.tolist())))
        self._route = F.one_hot(owner, k).float().to(next(iter(self.layers.values())).base.weight.device)

    def after_task(self, task_index: int) -> None:
        self.prototypes.append(F.normalize(self._sum / max(1, self._count), dim=0))
        freeze_all_experts(self.layers)

    def state(self):
        tensors, meta = super().state()
        if self.prototypes:
            tensors["prototypes"] = torch.stack(self.prototypes).contiguous()
        return tensors, meta

    def load_state(self, tensors, meta) -> None:
        super().load_state(tensors, meta)
        self.prototypes = list(tensors["prototypes"]) if "prototypes" in tensors else []

    def param_counts(self) -> dict[str, int]:
        counts = super().param_counts()
        per_task = counts["stored"] // max(1, len(self.prototypes))
        return {**counts, "active_per_sample": per_task}
