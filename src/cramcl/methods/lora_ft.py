"""`lora-ft`: one LoRA trained task after task (the lower bound: it forgets).

Source: the field's sequential-LoRA baseline (LAMDA-CL/Prism and LAMDA-CL/EMNLP2026-CRAM configure it in
``config/methods/ft_lora.py``; docs/peers.md, "Bounds: MTL, oracle-LoRA, LoRA-FT, zero-shot"); no single
original to follow. Ours: rank 8, alpha 16, dropout 0.05 on
q, k, v, o of every decoder layer, the same LoRA continuing from task to task with a fresh optimizer per task.
"""
from __future__ import annotations

from dataclasses import dataclass

from cramcl.methods.base import Method, Phase, Services


@dataclass
class LoraFTConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05

    def problems(self) -> list[str]:
        """Settings out of range, one line each (checked when the config is resolved, for every method whose
        config extends this one)."""
        checks = [("rank", self.rank >= 1, ">= 1"), ("alpha", self.alpha > 0, "> 0"),
                  ("dropout", 0 <= self.dropout < 1, "in [0, 1)")]
        return [f"{name}: {getattr(self, name)!r} must be {want}" for name, ok, want in checks if not ok]


class LoraFT(Method):
    name = "lora-ft"
    mid_task_resume = True  # all it trains is the one LoRA, in state()

    def setup(self, services: Services) -> None:
        super().setup(services)
        for layer in self.layers.values():
            layer.add_expert(self.cfg.rank, alpha=self.cfg.alpha)

    def before_task(self, task_index: int, task) -> None:
        super().before_task(task_index, task)
        for layer in self.layers.values():  # loaded checkpoints come back frozen; this LoRA keeps training
            layer.set_expert_trainable(0, True)

    def begin_phase(self, phase: Phase) -> None:
        for layer in self.layers.values():  # again here: a mid-task resume loads the state after before_task
            layer.set_expert_trainable(0, True)

    def expert_for_task(self, task_index: int) -> int | None:
        return 0 if task_index < len(self.task_names) else None  # the one LoRA, as it stands after the stream

    def param_counts(self) -> dict[str, int]:
        counts = super().param_counts()
        counts["trainable"] = counts["stored"]  # the same LoRA trains on every task
        return counts
