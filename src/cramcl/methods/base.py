"""One lifecycle for every method; the runner knows nothing of any one method.

    setup(services)                       once: inject adapters, build routers
    before_task(t, task)                  a task starts (its training records are known; no test data)
    training_records(t, task, stream)     what the task trains on (default: the task's own records)
    phases(t, steps) -> [Phase]           how the task's optimizer steps split (e.g. warm-up / stable)
    begin_phase(phase) / end_phase(phase) change the trainable set (the trainer re-prepares the optimizer)
    trainable_parameters()                what the optimizer sees in the current phase
    optimizer_groups(lr)                  how those parameters split into learning-rate groups (default: one)
    prepare_batch(batch, train)           set routing state for this batch; at eval no task id is given
    compute_loss(model, batch)            -> (loss, {name: aux loss}) ; the trainer backpropagates `loss`
    after_task(t)                         freeze, consolidate statistics
    state() / load_state(tensors, meta)   everything needed to resume or evaluate (safetensors + JSON)
    phase_state() / load_phase_state(..)  mid-task extras for a step checkpoint (see ``mid_task_resume``)
    param_counts()                        trainable this task / stored total / active per sample
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cramcl.adapters.inject import adapter_state, inject_adapters, load_adapter_state
from cramcl.adapters.multi_lora import MultiLoRALinear, RoutingContext


@dataclass(frozen=True)
class Phase:
    name: str
    steps: int
    lr: float | None = None  # None: the run's lr (train.lr) on the task's schedule


@dataclass
class Services:
    """What a method may use: the backbone, the run config, a logger, and (lazily) routing encoders."""
    backbone: Any
    run_config: Any
    log: Any = print
    encoders: Any = None  # cramcl.encoders.RoutingEncoders, built on first use


class Method:
    name: ClassVar[str] = ""
    uses_task_id_at_eval: ClassVar[bool] = False  # only oracle methods may; the runner records it
    # True: a step checkpoint (train.step_checkpoint_every) can continue a task mid-way. A method opts in once
    # state() + phase_state() hold everything its training steps change, and begin_phase() (re)sets the
    # trainable set from a loaded state (load_state freezes every expert). Resuming runs, in this order:
    # before_task(t), load_state(step state), load_phase_state(..), begin_phase(current phase); earlier
    # phases of the task are not re-run. Off by default: a method that gathers statistics during the steps
    # and does not save them would resume with them lost; it then restarts the task from step 0.
    mid_task_resume: ClassVar[bool] = False

    def __init__(self, config):
        self.cfg = config
        self.layers: dict[str, MultiLoRALinear] = {}
        self.context = RoutingContext()
        self.current_task: int | None = None
        self.task_names: list[str] = []

    # ---- lifecycle (defaults = a plain single-phase method)
    def setup(self, services: Services) -> None:
        self.services = services
        bb = services.backbone
        targets = services.run_config.backbone.targets
        self.layers = inject_adapters(bb.language_model, targets, bb.num_layers * len(targets), self.context,
                                      dropout=getattr(self.cfg, "dropout", 0.0))

    def before_task(self, task_index: int, task) -> None:
        self.current_task = task_index
        self.task_names.append(task.name)

    def precompute(self, records) -> None:
        """Per-record routing inputs in one batched pass, so that batches only look them up: the runner calls it
        on each task's training records before training and on every test record before evaluating. The
        default fills the method's routing encoders' caches (``self.encoders``), if it has any."""
        encoders = getattr(self, "encoders", None)
        if encoders is not None and records:
            encoders.precompute(records)

    def training_records(self, task_index: int, task, stream: list) -> list:
        """The records of this task's optimizer steps (replay mixes a buffer in; multi-task sees all)."""
        return list(task.train)

    def phases(self, task_index: int, total_steps: int) -> list[Phase]:
        return [Phase("train", total_steps)]

    def begin_phase(self, phase: Phase) -> None:
        pass

    def end_phase(self, phase: Phase) -> None:
        pass

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.parameters() if p.requires_grad]

    def optimizer_groups(self, lr: float) -> list[dict]:
        """``trainable_parameters()`` as optimizer groups ``[{"params": [...], "lr": peak lr}, ...]``, each
        following the run's schedule from its own peak; every trainable parameter in exactly one group."""
        return [{"params": self.trainable_parameters(), "lr": lr}]

    def prepare_batch(self, batch: dict, train: bool) -> None:
        pass

    def compute_loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        out = model(**self.services.backbone.model_inputs(batch))
        return out.loss, {}

    def after_task(self, task_index: int) -> None:
        pass

    # ---- state
    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors, meta = adapter_state(self.layers)
        return tensors, {"adapters": meta, "task_names": list(self.task_names)}

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        load_adapter_state(self.layers, tensors, meta["adapters"])
        self.task_names = list(meta.get("task_names", []))

    def phase_state(self) -> tuple[dict[str, Tensor], dict]:
        """What a task's training steps have changed that ``state()`` does not hold (statistics gathered
        so far in the task, the current phase's bookkeeping); saved in step checkpoints only. Default: none."""
        return {}, {}

    def load_phase_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore :meth:`phase_state` (called after ``load_state`` and before ``begin_phase``)."""

    # ---- accounting
    def param_counts(self) -> dict[str, int]:
        stored = sum(p.numel() for layer in self.layers.values() for p in layer.parameters()
                     if p is not layer.base.weight and p is not layer.base.bias)
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {"trainable": trainable, "stored": stored, "active_per_sample": stored}

    def report_sections(self) -> list[tuple[str, str]]:
        return []

    def expert_for_task(self, task_index: int) -> int | None:
        """The index of the one expert that serves a task on its own (for export), or None when the method
        has no such expert (it mixes shared experts, or the task has not trained)."""
        return None

    def expert_created_for(self, task_index: int) -> int | None:
        """The expert added for this task, whose routing weight on the task's own inputs shows whether the
        router finds it (eval/routing_probe.py); by default the one that serves it alone."""
        return self.expert_for_task(task_index)

    def stream_analysis(self, tasks) -> dict:
        """Method-specific numbers about the stream so far (e.g. CRAM's group accuracy); JSON-able."""
        return {}


def lora_params(layer: MultiLoRALinear, rank: int) -> int:
    return rank * (layer.in_features + layer.out_features)


def freeze_all_experts(layers: dict[str, MultiLoRALinear]) -> None:
    for layer in layers.values():
        for k in range(layer.num_experts):
            layer.set_expert_trainable(k, False)


@torch.no_grad()
def copy_expert(layer: MultiLoRALinear, src: int, dst: int) -> None:
    layer.experts_A[dst].copy_(layer.experts_A[src])
    layer.experts_B[dst].copy_(layer.experts_B[src])
