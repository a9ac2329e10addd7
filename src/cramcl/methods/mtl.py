"""`mtl`: multi-task training, one LoRA on all tasks jointly (the upper bound most papers quote).

How it fills the accuracy matrix (the stream protocol is kept so the runner and metrics stay unchanged):
at the first task it trains ONE LoRA (rank 8, alpha 16, like lora-ft) on the union of every task's training
records for the sum of every task's step budget (``steps_per_task * T`` for T tasks; with
``train.epochs_per_task`` each task's budget comes from its own size, engine/budget.py; the learning-rate
schedule runs over that whole budget), i.e. the same number of steps a sequential method spends on the stream. Batches are
drawn uniformly from the union, so tasks are seen in proportion to their sizes. Every later task trains
nothing (no training records, no phases). Each row t of the matrix therefore evaluates the same joint model
on the tasks 0..t: the rows agree, BWT = 0 and forgetting = 0 by construction; MFN / final accuracy is the
number to compare. It sees every task's data at the start: it is a bound, not a continual method.

Source: the field's multi-task upper bound (docs/peers.md, "Bounds: MTL, oracle-LoRA, LoRA-FT, zero-shot");
no single original. Where it differs from how papers usually train it: the joint budget is the stream's (the
sum of the tasks' budgets), so it sees as many batches as a sequential method, not more epochs.
"""
from __future__ import annotations

from dataclasses import dataclass

from accelerate import PartialState

from cramcl.engine.budget import task_steps
from cramcl.methods.base import Phase
from cramcl.methods.lora_ft import LoraFT, LoraFTConfig


@dataclass
class MultiTaskConfig(LoraFTConfig):
    pass  # rank 8, alpha 16, dropout 0.05 (lora-ft's)


class MultiTask(LoraFT):
    name = "mtl"

    def __init__(self, config: MultiTaskConfig):
        super().__init__(config)
        self.num_tasks = 1  # set from the stream at the first training_records call
        self.task_sizes: list[int] = []  # training records of every task of the stream (the same call)

    def before_task(self, task_index: int, task) -> None:
        super().before_task(task_index, task)
        for layer in self.layers.values():
            layer.set_expert_trainable(0, task_index == 0)

    def training_records(self, task_index: int, task, stream: list) -> list:
        self.num_tasks = len(stream)
        self.task_sizes = [len(t.train) for t in stream]
        if task_index > 0:
            return []  # the joint model was trained at task 0
        return [record for t in stream for record in t.train]

    def phases(self, task_index: int, total_steps: int) -> list[Phase]:
        if task_index > 0:
            return []
        return [Phase("joint", self.joint_steps(total_steps))]

    def joint_steps(self, first_task_steps: int) -> int:
        """The joint budget: every task's budget summed (a fixed budget: ``steps_per_task * T``)."""
        train = getattr(getattr(self, "services", None), "run_config", None)
        train = getattr(train, "train", None)
        if train is None or train.epochs_per_task is None or not self.task_sizes:
            return first_task_steps * self.num_tasks
        world = PartialState().num_processes
        return sum(task_steps(train, n, world) for n in self.task_sizes)

    def after_task(self, task_index: int) -> None:
        for layer in self.layers.values():
            layer.set_expert_trainable(0, False)
        self.current_task = None

    def report_sections(self) -> list[tuple[str, str]]:
        return [("Multi-task bound", f"One LoRA trained once, at the first task, on all {self.num_tasks} tasks' "
                 "training records jointly (every task's step budget summed); later rows re-evaluate that model, "
                 "so BWT = 0 by construction.")]
