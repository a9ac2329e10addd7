"""The training loop for one task: explicit, on Accelerate (prepare, accumulate, backward, clip, step).

The task's step budget is split into the method's phases; each phase re-creates the optimizer over the
phase's trainable set and re-prepares model, optimizer and data with Accelerate (a phase change may change
which parameters train, e.g. CRAM's warm-up -> stable). The learning-rate schedule (linear warm-up, cosine)
runs over the whole task, across phases. Batches are global: ``batch_size * world_size * grad_accum``
records per optimizer step, the same sequence whatever the number of processes.

No host work per step: under ``train.nonfinite=stop`` the loop never reads a device value inside an optimizer
step. Non-finite losses and gradient norms are recorded on the device (:class:`NonFiniteWatch`: a flag and
the first bad step) and read every ``train.log_every`` steps, at the end of each phase and before any
checkpoint is written, so a GPU host keeps queueing work ahead while nothing non-finite is ever
checkpointed. The loss is read only when it is logged or when the progress bar is about to redraw.
``train.nonfinite=skip`` must decide before ``optimizer.step()`` whether to step, so it reads one flag per
step (one sync per step; the price of skipping).

Step checkpoints (``train.step_checkpoint_every``, engine/step_checkpoint.py): every N optimizer steps the
trainer hands the optimizer state, RNG states and counters to the runner's ``step_checkpoint`` callback;
``resume`` continues a task from such a checkpoint, step for step as if uninterrupted.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from cramcl.utils.progress import bar as progress_bar, due as progress_due

from cramcl.config import TrainConfig
from cramcl.engine.kill_points import kill_point
from cramcl.engine.loader import make_loader
from cramcl.engine.step_checkpoint import (StepResume, capture_rng, flatten_optimizer_state, restore_rng,
                                           unflatten_optimizer_state)
from cramcl.errors import TrainingFault


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


class NonFiniteWatch:
    """A device-side record of the first optimizer step whose loss or gradient norm was not finite.

    :meth:`note_loss` / :meth:`note_step` only queue tensor ops (no host read); :meth:`first_bad` reads the
    record (one sync) and is called where the host must know: when logging, at a phase's end, before a
    checkpoint, and per step under ``train.nonfinite=skip``."""

    LOSS, NORM = 1, 2

    def __init__(self, device):
        self.device = device
        self.step_ok = torch.ones((), dtype=torch.bool, device=device)  # the micro-batch losses of this step
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.what = torch.zeros((), dtype=torch.long, device=device)

    def note_loss(self, loss: torch.Tensor) -> None:
        self.step_ok = self.step_ok & torch.isfinite(loss.detach()).all()

    def note_step(self, step: int, norm) -> torch.Tensor:
        """Close optimizer step ``step`` (1-based) given its gradient norm; returns its ok flag (a device bool)."""
        loss_ok = self.step_ok
        norm_ok = torch.ones((), dtype=torch.bool, device=self.device) if norm is None else \
            torch.isfinite(torch.as_tensor(norm, device=self.device)).all()
        ok = loss_ok & norm_ok
        first = ~ok & (self.first_step < 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.what = torch.where(first, torch.where(loss_ok, self.NORM, self.LOSS), self.what)
        self.step_ok = torch.ones((), dtype=torch.bool, device=self.device)
        return ok

    def first_bad(self) -> tuple[int, str] | None:
        """(first bad step, "the loss" | "the gradient norm"), or None; one device read."""
        step, what = (int(v) for v in torch.stack([self.first_step, self.what]).tolist())
        return None if step < 0 else (step, "the loss" if what == self.LOSS else "the gradient norm")

    def forget(self) -> None:
        """Clear the record (skip mode: a skipped step is counted, not a fault)."""
        self.first_step = torch.full((), -1, dtype=torch.long, device=self.device)


def _checked_groups(method, lr: float, params: list) -> list[dict]:
    """The method's optimizer groups, checked to hold every trainable parameter exactly once."""
    groups = [g for g in method.optimizer_groups(lr) if g["params"]]
    ids = [id(p) for g in groups for p in g["params"]]
    if len(ids) != len(set(ids)) or set(ids) != {id(p) for p in params}:
        raise RuntimeError(f"{method.name}: optimizer_groups() must hold each trainable parameter exactly once")
    return groups


def _lr_position(done: int, phase_start: int, phase, total: int) -> tuple[int, int]:
    """(step, span) of the lr schedule at optimizer step ``done`` of the task: a phase with its own lr (e.g.
    routing-cl's gates) runs its own schedule from the phase's first step; the others share the task's."""
    return (done - phase_start, phase.steps) if phase.lr is not None else (done, total)


def _step_checkpoint_due(done: int, every: int) -> bool:
    """A step checkpoint after optimizer step ``done`` of the task: every ``every`` steps (0: never). One on a
    phase's last step is taken before the phase change (``end_phase``), which the resumed run then performs."""
    return every > 0 and done % every == 0


def _trainer_state(opt, phase_index: int, phase_name: str, skipped: int, trained_earlier: int,
                   last_loss: float | None) -> tuple[dict, dict]:
    """The trainer's part of a step checkpoint: (tensors: optimizer state + RNG states, JSON meta).
    ``trained_earlier``: distinct parameters trained in the task's finished phases and not in this one (the
    resumed run cannot see those phases' parameters, only count them)."""
    tensors, optim_meta = flatten_optimizer_state(opt.state_dict())
    rng_tensors, rng_meta = capture_rng()
    meta = {"phase_index": phase_index, "phase": phase_name, "skipped": skipped, "trained_earlier": trained_earlier,
            "last_loss": last_loss, "optimizer": optim_meta, **rng_meta}
    return {**tensors, **rng_tensors}, meta


def train_task(accelerator, backbone, method, records, cfg: TrainConfig, task_index: int, seed: int,
               global_step: int = 0, task_name: str = "", step_checkpoint=None,
               resume: StepResume | None = None, loader_workers: int = 0) -> TaskTrainResult:
    """Train ``method`` on one task's ``records`` for ``cfg.steps_per_task`` optimizer steps.

    ``seed`` fixes the data order; the caller seeds torch before the task (dropout, fresh experts).
    ``step_checkpoint(done, tensors, meta)``: called every ``cfg.step_checkpoint_every`` steps with the
    trainer's part of a step checkpoint (never with a non-finite value pending). ``resume``: continue after
    ``resume.step`` steps; the caller has already loaded the method's state from the same checkpoint.
    ``loader_workers``: processes building the batches (engine/loader.py); pinned on a GPU."""
    t0 = time.perf_counter()
    phases = method.phases(task_index, cfg.steps_per_task)
    total = sum(p.steps for p in phases)  # usually steps_per_task; a method may take another budget (mtl)
    if not phases or total == 0:
        return TaskTrainResult(0, 0.0, None)
    world = accelerator.num_processes
    micro_global = cfg.batch_size * world  # one forward across all processes
    all_batches = global_batches(len(records), total * cfg.grad_accum, micro_global, seed)
    done, last_loss, trained, skipped, trained_before = 0, None, {}, 0, 0
    if resume is not None:
        done, skipped = resume.step, int(resume.trainer_meta["skipped"])
        trained_before, last_loss = int(resume.trainer_meta["trained_earlier"]), resume.trainer_meta["last_loss"]
        global_step += done
    watch = NonFiniteWatch(accelerator.device)
    bar = progress_bar(total=total, initial=done, desc=f"task {task_index}",
                       disable=not accelerator.is_local_main_process, leave=False)

    def check(phase_name: str) -> None:
        bad = watch.first_bad()
        if bad is not None:
            bar.close()
            raise _fault(task_name, task_index, bad[0], phase_name, bad[1])

    for index, phase in enumerate(phases):
        phase_start, phase_end = sum(p.steps for p in phases[:index]), sum(p.steps for p in phases[:index + 1])
        if resume is not None and index < resume.phase_index:  # finished before the step checkpoint
            continue
        resuming = resume is not None and index == resume.phase_index
        method.begin_phase(phase)
        params = method.trainable_parameters()
        if not params:
            raise RuntimeError(f"{method.name}: phase '{phase.name}' has nothing to train")
        trained.update({id(p): p.numel() for p in params})
        base_lr = phase.lr if phase.lr is not None else cfg.lr
        groups = _checked_groups(method, base_lr, params)
        peak_lrs = [g["lr"] for g in groups]  # kept here, not in the groups: a step checkpoint restores those
        opt = torch.optim.AdamW(groups, lr=base_lr, weight_decay=cfg.weight_decay)
        phase_batches = all_batches[done * cfg.grad_accum:phase_end * cfg.grad_accum]
        loader = make_loader(records, phase_batches, micro_global, backbone, train=True, workers=loader_workers,
                             pin=accelerator.device.type == "cuda")
        shards = getattr(backbone, "shards", None)
        if shards is None:
            model, opt, loader = accelerator.prepare(backbone.model, opt, loader)
        else:  # FSDP2 on the frozen base (engine/sharding.py): no DDP wrapper, every trainable is reduced below
            opt, loader = accelerator.prepare(opt, loader)
            model = backbone.model
            shards.sharded()
        if resuming:
            opt.load_state_dict(unflatten_optimizer_state(resume.trainer_tensors, resume.trainer_meta["optimizer"]))
        pending_rng = (resume.prefixed(""), resume.trainer_meta) if resuming else None
        # parameters a method keeps outside the model (e.g. CRAM's centroids) are not seen by DDP, and
        # with a sharded base there is no DDP: their gradients are averaged across processes here
        in_model = {id(p) for p in backbone.model.parameters()}
        outside = [p for p in params if id(p) not in in_model or shards is not None] if accelerator.num_processes > 1 else []
        model.train()
        t_phase, steps_at_start = time.perf_counter(), done
        for micro, batch in enumerate(loader):
            if pending_rng is not None:  # after the loader drew its seed, as the uninterrupted run's state was
                restore_rng(*pending_rng)
                pending_rng = None
            with accelerator.accumulate(model):
                method.prepare_batch(batch, train=True)
                loss, aux = method.compute_loss(model, batch)
                watch.note_loss(loss)
                accelerator.backward(loss)
                skip = False
                if accelerator.sync_gradients:
                    for p in outside:
                        if p.grad is not None:
                            p.grad = accelerator.reduce(p.grad, reduction="mean")
                    norm = accelerator.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                    ok = watch.note_step(done + 1, norm)
                    if cfg.nonfinite == "skip":  # must know before stepping: one read per step
                        skip = not bool(ok)
                        watch.forget()
                    step, span = _lr_position(done, phase_start, phase, total)
                    factor = lr_factor(step, span, cfg.warmup_ratio, cfg.scheduler)
                    for group, peak in zip(opt.param_groups, peak_lrs):
                        group["lr"] = peak * factor
                if not skip:
                    opt.step()
                opt.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            done += 1
            global_step += 1
            kill_point("train_step")
            skipped += int(skip)
            logging = done % cfg.log_every == 0 or done == total
            if logging:
                check(phase.name)
            if logging or progress_due(bar):
                last_loss = loss.item()
                rate = (done - steps_at_start) / max(1e-9, time.perf_counter() - t_phase)
                bar.set_postfix(phase=phase.name, loss=f"{last_loss:.3f}", steps_s=f"{rate:.1f}", refresh=False)
            bar.update(1)
            if logging:
                scalars = {f"train/{task_index}/loss": last_loss, "train/lr": opt.param_groups[0]["lr"]}
                scalars.update({f"train/{task_index}/{k}": float(v) for k, v in aux.items()})
                accelerator.log(scalars, step=global_step)
            if step_checkpoint is not None and _step_checkpoint_due(done, cfg.step_checkpoint_every):
                check(phase.name)  # nothing non-finite is ever checkpointed
                in_phase = {id(p) for p in params}
                earlier = trained_before + sum(n for i, n in trained.items() if i not in in_phase)
                step_checkpoint(done, *_trainer_state(opt, index, phase.name, skipped, earlier, last_loss))
                kill_point("step_checkpoint_done")
        if pending_rng is not None:  # resumed at the phase's last step: no batch left, the phase change is next
            restore_rng(*pending_rng)
        check(phase.name)  # before the phase change (e.g. an SVD of the buffer) and before any checkpoint
        if shards is not None:
            shards.gathered()  # the phase change (CRAM's consolidation) and evaluation run on the whole base
        method.end_phase(phase)
        model.eval()
        accelerator.free_memory()  # drop the phase's prepared optimizer/loader before the next phase
    bar.close()
    return TaskTrainResult(done, time.perf_counter() - t0, last_loss, trained_before + sum(trained.values()), skipped)
