"""One fresh LoRA per task, earlier ones frozen: the shared base of O-LoRA, oracle-LoRA, routing-CL and HiDe.

Source: none of its own (a building block); each subclass names its source and where it differs.
"""
from __future__ import annotations

from cramcl.methods.base import Method, freeze_all_experts, lora_params


class PerTaskLora(Method):
    """One fresh LoRA per task on every adapted linear (expert index == task index); earlier ones frozen.

    Subclasses decide how the experts mix (O-LoRA: all with weight 1; oracle-lora: one-hot on the task id)."""

    def before_task(self, task_index: int, task) -> None:
        super().before_task(task_index, task)
        freeze_all_experts(self.layers)
        for layer in self.layers.values():
            if layer.num_experts != task_index:
                raise RuntimeError(f"{self.name}: {layer.key} holds {layer.num_experts} experts before task "
                                   f"{task_index}; one per finished task was expected")
            k = layer.add_expert(self.cfg.rank, alpha=self.cfg.alpha)
            layer.set_expert_trainable(k, True)

    def after_task(self, task_index: int) -> None:
        freeze_all_experts(self.layers)
        self.current_task = None

    def expert_for_task(self, task_index: int) -> int | None:
        experts = next(iter(self.layers.values())).num_experts
        return task_index if task_index < experts else None

    def one_expert_params(self) -> int:
        return sum(lora_params(layer, self.cfg.rank) for layer in self.layers.values())

    def param_counts(self) -> dict[str, int]:
        counts = super().param_counts()  # stored: every task's LoRA
        counts["trainable"] = self.one_expert_params()  # the current task's LoRA only
        return counts
