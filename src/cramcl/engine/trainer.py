"""The training loop for one task: explicit, on Accelerate (prepare, accumulate, backward, clip, step).

The task's step budget is split into the method's phases; each phase re-creates the optimizer over the
phase's trainable set and re-prepares model, optimizer and data with Accelerate (a phase change may change
which parameters train, e.g. CRAM's warm-up -> stable). The learning-rate schedule (linear warm-up, cosine)
runs over the whole task, across phases. Batches are global: ``batch_size * world_size * grad_accum``
records per optimizer step, the same sequence whatever the number of processes.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from cramcl.utils.progress import bar as progress_bar

from cramcl.config import TrainConfig
from cramcl.engine.kill_points import kill_point
from cramcl.errors import TrainingFault


class _Records(Dataset):
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


class FixedBatches(Sampler):
    """Precomputed global batches; ``batch_size`` lets Accelerate split each one across processes."""

    def __init__(self, batches: list[list[int]], batch_size: int):
        self.batches = batches
        self.batch_size = batch_size

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def lr_factor(step: int, total: int, warmup_ratio: float, kind: str) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of ``total``."""
    warmup = max(1, math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def global_batches(n_records: int, n_batches: int, batch_size: int, seed: int) -> list[list[int]]:
    """``n_batches`` lists of indices: shuffled epochs, seeded, without repeats inside an epoch."""
    rng = random.Random(seed)
    out, pool = [], []
    for _ in range(n_batches):
        batch = []
        while len(batch) < batch_size:
            if not pool:
                pool = list(range(n_records))
                rng.shuffle(pool)
            batch.append(pool.pop())
        out.append(batch)
    return out


@dataclass
class TaskTrainResult:
    steps: int
    seconds: float
    final_loss: float | None
    trained_params: int = 0  # distinct parameters that trained in any phase of the task
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite loss or gradient (train.nonfinite=skip)


def _fault(task_name: str, task_index: int, step: int, phase: str, what: str) -> TrainingFault:
    return TrainingFault(f"task {task_index} ('{task_name}'), optimizer step {step} ({phase} phase): {what} is not "
                         "finite; training stopped and no checkpoint holds it (lower train.lr, or pass "
                         "train.nonfinite=skip to drop such steps)")


def train_task(accelerator, backbone, method, records, cfg: TrainConfig, task_index: int, seed: int,
               global_step: int = 0, task_name: str = "") -> TaskTrainResult:
    """Train ``method`` on one task's ``records`` for ``cfg.steps_per_task`` optimizer steps.

    ``seed`` fixes the data order; the caller seeds torch before the task (dropout, fresh experts)."""
    t0 = time.perf_counter()
    phases = method.phases(task_index, cfg.steps_per_task)
    total = sum(p.steps for p in phases)  # usually steps_per_task; a method may take another budget (mtl)
    if not phases or total == 0:
        return TaskTrainResult(0, 0.0, None)
    world = accelerator.num_processes
    micro_global = cfg.batch_size * world  # one forward across all processes
    all_batches = global_batches(len(records), total * cfg.grad_accum, micro_global, seed)
    done, last_loss, trained, skipped = 0, None, {}, 0
    bar = progress_bar(total=total, desc=f"task {task_index}", disable=not accelerator.is_local_main_process, leave=False)
    for phase in phases:
        method.begin_phase(phase)
        params = method.trainable_parameters()
        if not params:
            raise RuntimeError(f"{method.name}: phase '{phase.name}' has nothing to train")
        trained.update({id(p): p.numel() for p in params})
        base_lr = phase.lr if phase.lr is not None else cfg.lr
        phase_start = done
        opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=cfg.weight_decay)
        phase_batches = all_batches[done * cfg.grad_accum:(done + phase.steps) * cfg.grad_accum]
        loader = DataLoader(_Records(records), batch_sampler=FixedBatches(phase_batches, micro_global),
                            collate_fn=lambda recs: backbone.collate(recs, train=True))
        model, opt, loader = accelerator.prepare(backbone.model, opt, loader)
        # parameters a method keeps outside the model (e.g. CRAM's centroids) are not seen by DDP:
        # their gradients are averaged across processes here
        in_model = {id(p) for p in backbone.model.parameters()}
        outside = [p for p in params if id(p) not in in_model] if accelerator.num_processes > 1 else []
        model.train()
        t_phase = time.perf_counter()
        finite = True  # every micro-batch loss of the current optimizer step
        for micro, batch in enumerate(loader):
            with accelerator.accumulate(model):
                method.prepare_batch(batch, train=True)
                loss, aux = method.compute_loss(model, batch)
                finite = finite and bool(torch.isfinite(loss.detach()))
                accelerator.backward(loss)
                skip = False
                if accelerator.sync_gradients:
                    for p in outside:
                        if p.grad is not None:
                            p.grad = accelerator.reduce(p.grad, reduction="mean")
                    norm = accelerator.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                    what = "the loss" if not finite else None
                    if what is None and norm is not None and not bool(torch.isfinite(torch.as_tensor(norm))):
                        what = "the gradient norm"
                    if what is not None:
                        if cfg.nonfinite == "stop":
                            bar.close()
                            raise _fault(task_name, task_index, done + 1, phase.name, what)
                        skip = True
                    # a phase with its own lr (e.g. routing-cl's gates) runs its own schedule from step 0
                    step, span = (done - phase_start, phase.steps) if phase.lr is not None else (done, total)
                    for group in opt.param_groups:
                        group["lr"] = base_lr * lr_factor(step, span, cfg.warmup_ratio, cfg.scheduler)
                if not skip:
                    opt.step()
                opt.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            done += 1
            global_step += 1
            kill_point("train_step")
            skipped += int(skip)
            finite = True
            last_loss = loss.item()
            rate = (micro + 1) / cfg.grad_accum / max(1e-9, time.perf_counter() - t_phase)
            bar.update(1)
            bar.set_postfix(phase=phase.name, loss=f"{last_loss:.3f}", steps_s=f"{rate:.1f}", refresh=False)
            if done % cfg.log_every == 0 or done == total:
                scalars = {f"train/{task_index}/loss": last_loss, "train/lr": opt.param_groups[0]["lr"]}
                scalars.update({f"train/{task_index}/{k}": float(v) for k, v in aux.items()})
                accelerator.log(scalars, step=global_step)
        method.end_phase(phase)
        model.eval()
        accelerator.free_memory()  # drop the phase's prepared optimizer/loader before the next phase
    bar.close()
    return TaskTrainResult(done, time.perf_counter() - t0, last_loss, sum(trained.values()), skipped)
