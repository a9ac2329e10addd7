"""The continual runner: for each task, train -> checkpoint -> evaluate every task seen so far -> results.

It knows nothing of any one method (only the lifecycle in ``cramcl.methods.base``). ``resume=True`` reloads
the resolved config and the last finished task's checkpoint and continues with the next task; since every
task reseeds from (seed, task) and evaluation is greedy, the final matrix equals an uninterrupted run's.
When the interrupted task left a step checkpoint (``train.step_checkpoint_every``; engine/step_checkpoint.py)
that task continues from it instead of from its first step, with the same result.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from cramcl.config import RunConfig
from cramcl.engine import session as session_module  # open_session looked up when called: a test may replace it
from cramcl.engine.budget import global_batch, task_steps
from cramcl.engine.checkpoint import (finished_checkpoints, newest_good_checkpoint, nonfinite_tensors, remove_orphans, save_checkpoint,
                                     write_json_atomic, write_yaml_atomic)
from cramcl.engine.env import environment_record
from cramcl.engine.kill_points import kill_point
from cramcl.engine.results import matrix_json, write_results
from cramcl.engine.resume_check import check_checkpoint_settings, check_resume, settings_record
from cramcl.engine.run_lock import hold_run_lock, refuse_if_held
from cramcl.engine.run_record import RunRecord
from cramcl.engine.saved_config import load_saved_config
from cramcl.engine.step_checkpoint import read_step_checkpoint, remove_step_checkpoint, save_step_checkpoint
from cramcl.engine.trainer import train_task
from cramcl.errors import BadInputError, TrainingFault
from cramcl.eval.evaluate import predict, score_records, write_jsonl_atomic
from cramcl.utils.dist import check_identical_across_processes


def _task_seed(seed: int, task_index: int) -> int:
    return seed * 1000 + task_index


#: the longest file name (one path component, in bytes) of ext4, XFS, Btrfs, tmpfs and APFS alike
NAME_MAX = 255


def check_output_dir(out: Path) -> None:
    """``out`` must be a directory we can create or write, checked before anything is built or written."""
    long_part = next((p for p in out.parts if len(os.fsencode(p)) > NAME_MAX), None)
    if long_part is not None:
        raise BadInputError(f"{str(out)[:80]}...: --out has a name of {len(os.fsencode(long_part))} bytes; "
                            f"filesystems allow {NAME_MAX}")
    if out.is_symlink() and not out.exists():
        raise BadInputError(f"{out}: --out is a symlink to '{os.readlink(out)}', which does not exist (or loops)")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out}: --out exists and is not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BadInputError(f"{out}: cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInputError(f"{out}: cannot write there ({probe} is read-only or not ours)")
    if str(out.resolve()).startswith(("/proc/", "/sys/")) or str(out.resolve()) in ("/proc", "/sys"):
        raise BadInputError(f"{out}: a kernel filesystem, not a place for a run directory")


def prepare_run_dir(cfg: RunConfig | None, out: Path, resume: bool, asked: dict | None = None,
                    force: bool = False) -> RunConfig:
    """Check ``out`` (never overwrite a run without --resume) and return the config to run.

    With ``resume``, ``asked`` holds the settings given alongside --resume (method, profile, config_file,
    benchmark, overrides): any that would change the saved run is refused (see engine/resume_check.py)."""
    saved = out / "config.yaml"
    if resume:
        return check_resume(load_saved_config(out), out, force, **(asked or {}))
    if saved.exists() or (out / "results").exists() or (out / "checkpoints").exists():
        raise BadInputError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    return cfg


def mixed_order(n: int, seed: int, after_task: int) -> list[int]:
    """The seeded shuffle of ``n`` test records that mixed-task evaluation feeds in batches."""
    g = torch.Generator().manual_seed(_task_seed(seed, after_task) + 7919)
    return torch.randperm(n, generator=g).tolist()


def check_finite_state(method, task_index: int, task_name: str, when: str = "after training",
                       tensors: dict | None = None) -> None:
    """Every floating tensor of the method's state (or of ``tensors``) must be finite before it is evaluated
    or checkpointed."""
    tensors = method.state()[0] if tensors is None else tensors
    bad = nonfinite_tensors(tensors)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingFault(f"task {task_index} ('{task_name}'), {when}: {len(bad)} tensor(s) of the method "
                            f"state are not finite ({shown}); no checkpoint was written for it")


def step_checkpointer(accelerator, method, out: Path, task_index: int, task_name: str, log):
    """The trainer's ``step_checkpoint`` callback for one task: the method's state and phase state, with the
    trainer's part (optimizer, RNG, counters), written by the main process; None when the method cannot
    continue mid-task (``Method.mid_task_resume``)."""
    if not type(method).mid_task_resume:
        return None

    def save(done: int, trainer_tensors: dict, trainer_meta: dict) -> None:
        if not accelerator.is_main_process:
            return
        tensors, meta = method.state()
        phase_tensors, phase_meta = method.phase_state()
        check_finite_state(method, task_index, task_name, f"at optimizer step {done}", tensors)
        trainer_tensors = {**trainer_tensors, **{f"phase.{k}": v.detach().cpu() for k, v in phase_tensors.items()}}
        save_step_checkpoint(out, task_index, done, (tensors, meta), trainer_tensors,
                             {**trainer_meta, "phase_state": phase_meta})

    return save


def resume_mid_task(method, resume, log, task_name: str):
    """Overlay a step checkpoint's method state on the task just begun (``before_task`` has run)."""
    method.load_state(resume.method_tensors, resume.method_meta)
    method.load_phase_state(resume.prefixed("phase."), resume.trainer_meta.get("phase_state", {}))
    log(f"    resuming '{task_name}' after optimizer step {resume.step} ({resume.trainer_meta['phase']} phase) "
        "from checkpoints/step")


def evaluate_tasks(session, tasks, pred_dir: Path, after_task: int = 0) -> dict[str, float]:
    """Score the session's method on each task's test records (no task id), writing predictions.

    ``train.eval_batches``: ``mixed`` (default) shuffles the union of the tasks' test records with a
    seeded permutation, so batches mix tasks as a deployed model's inputs do, and scores each task
    afterwards; ``per_task`` evaluates one task at a time."""
    stream = session.bench.task_names()
    bs = session.cfg.train.eval_batch_size
    workers = session.loader_workers
    run = lambda records, ids, desc: predict(session.accelerator, session.backbone, session.method, records, bs,
                                             desc=desc, task_ids=ids, loader_workers=workers)
    if session.cfg.train.eval_batches == "per_task":
        preds = {t.name: run(list(t.test), [stream.index(t.name)] * len(t.test), f"eval {t.name}") for t in tasks}
    else:
        union = [(t.name, stream.index(t.name), r) for t in tasks for r in t.test]
        order = mixed_order(len(union), session.cfg.seed, after_task)
        shuffled = run([union[i][2] for i in order], [union[i][1] for i in order], f"eval {len(tasks)} tasks mixed")
        by_position = dict(zip(order, shuffled))
        flat = [by_position[i] for i in range(len(union))]
        preds, start = {}, 0
        for t in tasks:
            preds[t.name], start = flat[start:start + len(t.test)], start + len(t.test)
    scores = {}
    for task in tasks:
        score, rows = score_records(task.scorer, list(task.test), preds[task.name], dict(task.scorer_params))
        scores[task.name] = round(float(score), 4)
        if session.accelerator.is_main_process:
            write_jsonl_atomic(pred_dir / f"{task.name}.jsonl", rows)
    return scores


def check_same_base(out: Path, backbone) -> None:
    """A resumed run must continue on the frozen base it started on: a saved base whose files changed, or a
    cached base stage rebuilt under another torch version or thread count, would mix two bases in one run."""
    try:
        recorded = json.loads((out / "env.json").read_text())["backbone"].get("base_stage")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no record to compare (an interrupted start): nothing trained on any base yet
    current = backbone.describe().get("base_stage")
    if recorded is not None and current != recorded:
        raise BadInputError(f"{out / 'env.json'}: the run started on base {recorded}, this resume builds {current} "
                            "(the saved base at backbone.base_path changed, or torch or the thread count differ); "
                            "resuming would mix two bases, start a new run instead")


def run_stream(cfg: RunConfig, out: Path, *, resume: bool = False, log=print, stop_after_task: int | None = None,
               asked: dict | None = None, force: bool = False) -> dict:
    """Run the whole stream; returns the final ``matrix.json`` dict. ``stop_after_task`` (tests) simulates an
    interruption right after that task's checkpoint. ``asked``/``force``: see :func:`prepare_run_dir`.

    The run holds ``out/run.lock`` from before it reads the saved run to its end (engine/run_lock.py): a
    second writer on ``out`` is refused naming this one."""
    out = Path(out)
    check_output_dir(out)
    if not resume:  # an existing run is refused before the lock, which would create and delete a file in it
        refuse_if_held(out)
        prepare_run_dir(cfg, out, resume, asked, force)
    with hold_run_lock(out, log=log):
        return _run_locked(cfg, out, resume=resume, log=log, stop_after_task=stop_after_task, asked=asked,
                           force=force)


def _run_locked(cfg: RunConfig, out: Path, *, resume: bool, log, stop_after_task: int | None, asked: dict | None,
                force: bool) -> dict:
    cfg = prepare_run_dir(cfg, out, resume, asked, force)
    resume_from = None  # the newest checkpoint that reads back whole and finite (others are reported and skipped)
    if resume:
        resume_from = newest_good_checkpoint(out, warn=log)
        if resume_from is not None:  # config.yaml must still say what the checkpoint was made under
            check_checkpoint_settings(cfg, resume_from, out, log=log)
        elif finished_checkpoints(out):
            log("warning: no checkpoint of this run is usable; it starts again from its first task")
    session = session_module.open_session(cfg, out, log=log, check_images=cfg.data.validate_images)
    bench, accelerator, backbone, method = session.bench, session.accelerator, session.backbone, session.method
    tasks = list(bench.tasks)
    names = [t.name for t in tasks]
    if resume:
        check_same_base(out, backbone)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_yaml_atomic(out / "config.yaml", cfg.to_dict())
        write_json_atomic(out / "env.json", environment_record(cfg, accelerator, backbone, bench))

    record = RunRecord.start(tasks)
    start = 0
    ckpt = None
    if resume:
        orphans = remove_orphans(out) if accelerator.is_main_process else []
        if orphans:
            log(f"removed {len(orphans)} unfinished checkpoint write(s) of the interrupted run: {', '.join(orphans)}")
        ckpt = resume_from.path if resume_from is not None else None
    if ckpt is not None:
        done, record = session_module.restore_checkpoint(session, resume_from)
        if record.tasks != names:
            raise BadInputError(f"{ckpt}: checkpoint was made for tasks {record.tasks}, the stream has {names}")
        start = done + 1
        log(f"resuming after task {start - 1} ({names[start - 1]}) from {ckpt}")

    record.global_batch_size = global_batch(cfg.train, accelerator.num_processes)
    step_resume = None
    if resume and start < len(tasks):
        step_resume = read_step_checkpoint(out, start, warn=log)
        if step_resume is not None and not type(method).mid_task_resume:
            log(f"note: {cfg.method} does not resume mid-task; task {start} restarts from its first step")
            step_resume = None
        if step_resume is None and accelerator.is_main_process:
            remove_step_checkpoint(out)  # stale (its task has a checkpoint) or unusable: reported above

    all_test = [r for t in tasks for r in t.test]
    backbone.prepare(all_test, desc="image features (test)")
    method.precompute(all_test)
    for t in range(start, len(tasks)):
        task = tasks[t]
        kill_point("task_start")
        log(f"[{t + 1}/{len(tasks)}] {cfg.method}: training on '{task.name}' ({len(task.train)} records)")
        torch.manual_seed(_task_seed(cfg.seed, t))  # fresh experts, dropout: identical on resume
        method.before_task(t, task)
        records = method.training_records(t, task, tasks)  # the task's own, or with replayed / joint records
        backbone.prepare(records, desc=f"image features ({task.name})")
        method.precompute(records)
        budget = dataclasses.replace(cfg.train, steps_per_task=task_steps(cfg.train, len(task.train),
                                                                           accelerator.num_processes))
        mid = step_resume if step_resume is not None and step_resume.task == t else None
        if mid is not None:
            resume_mid_task(method, mid, log, task.name)
        result = train_task(accelerator, backbone, method, records, budget, t,
                            seed=_task_seed(cfg.seed, t), global_step=record.global_step, task_name=task.name,
                            step_checkpoint=step_checkpointer(accelerator, method, out, t, task.name, log),
                            resume=mid, loader_workers=session.loader_workers)
        method.after_task(t)
        check_finite_state(method, t, task.name)
        if accelerator.num_processes > 1:  # experts, centroids, prototypes must match on every process
            n = check_identical_across_processes(method.state()[0], f"method state after task {t}")
            log(f"    method state identical on {n} processes")
        record.record_training(t, result.steps, result.seconds, result.trained_params, result.skipped_steps)
        if result.skipped_steps:
            log(f"    warning: {result.skipped_steps} optimizer step(s) of '{task.name}' skipped for a non-finite "
                "loss or gradient (train.nonfinite=skip)")

        t_eval = time.perf_counter()
        scores = evaluate_tasks(session, tasks[: t + 1], out / "results" / "predictions" / f"after_{t}", t)
        for i in range(t + 1):
            record.scores[t][i] = scores[names[i]]
        record.time_eval[t] = time.perf_counter() - t_eval
        row = ", ".join(f"{names[i]} {record.scores[t][i]:.1f}" for i in range(t + 1))
        log(f"    after '{task.name}': {row}  (train {result.seconds:.1f}s, eval {record.time_eval[t]:.1f}s)")

        if accelerator.is_main_process:
            tensors, meta = method.state()
            save_checkpoint(out, t, tensors, meta, record.to_json(), settings_record(cfg))
            remove_step_checkpoint(out)  # the task's own checkpoint supersedes it
            kill_point("checkpoint_done")
            write_results(out, cfg, method, record, partial=t + 1 < len(tasks), seen_tasks=tasks[: t + 1])
        accelerator.wait_for_everyone()
        if stop_after_task is not None and t == stop_after_task:
            accelerator.end_training()
            return matrix_json(cfg, record)

    if start >= len(tasks) and accelerator.is_main_process:
        write_results(out, cfg, method, record, partial=False, seen_tasks=tasks)  # a resume of a finished run: refresh outputs
    accelerator.end_training()
    return matrix_json(cfg, record)
