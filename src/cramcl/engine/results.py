"""results/matrix.json, results/metrics.json and report.md from the run's record (engine/run_record.py)."""
from __future__ import annotations

from pathlib import Path

from cramcl.engine.checkpoint import write_json_atomic
from cramcl.engine.kill_points import kill_point
from cramcl.engine.run_record import RunRecord
from cramcl.eval.metrics import continual_metrics, json_safe
from cramcl.report.report import write_report


def matrix_json(cfg, record: RunRecord) -> dict:
    return {"method": cfg.method, "tasks": record.tasks, "scores": record.scores, "scorers": record.scorers}


def metrics_json(cfg, method, record: RunRecord, partial: bool) -> dict:
    counts = method.param_counts()
    metrics = json_safe(continual_metrics(record.scores))
    done_train = [t for t in record.time_train if t is not None]
    done_eval = [t for t in record.time_eval if t is not None]
    metrics.update({
        "params": {"trainable_per_task": [n for n in record.trainable_per_task if n is not None],
                   "stored_total": counts["stored"], "active_per_sample": counts["active_per_sample"]},
        "time_s": {"train_per_task": [round(t, 2) for t in done_train], "eval_per_task": [round(t, 2) for t in done_eval],
                   "train_total": round(sum(done_train), 2), "eval_total": round(sum(done_eval), 2)},
        "uses_task_id_at_eval": method.uses_task_id_at_eval,
        "seed": cfg.seed,
        "skipped_steps": record.skipped_steps or [],  # per task: non-finite steps dropped (train.nonfinite=skip)
        # the optimizer steps each task ran (an epoch budget derives them from the task's size) and the global
        # batch (batch_size x processes x grad_accum) they were counted in
        "budget": {"steps_per_task": [n for n in record.steps_per_task or [] if n is not None],
                   "epochs_per_task": cfg.train.epochs_per_task, "global_batch_size": record.global_batch_size},
        "eval_batches": cfg.train.eval_batches,  # mixed: test batches mixed the seen tasks; per_task: one at a time
        "complete": not partial,
    })
    return metrics


def write_results(out: Path, cfg, method, record: RunRecord, partial: bool, seen_tasks=()) -> None:
    matrix = matrix_json(cfg, record)
    metrics = metrics_json(cfg, method, record, partial)
    analysis = method.stream_analysis(list(seen_tasks))
    if analysis:
        metrics["method_analysis"] = analysis
    write_json_atomic(out / "results" / "matrix.json", matrix)
    kill_point("results_write")
    write_json_atomic(out / "results" / "metrics.json", metrics)
    write_report(out, matrix, metrics, extra_sections=method.report_sections())
