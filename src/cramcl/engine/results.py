"""results/matrix.json, results/metrics.json and report.md from the runner's state."""
from __future__ import annotations

from pathlib import Path

from cramcl.engine.checkpoint import write_json_atomic
from cramcl.engine.kill_points import kill_point
from cramcl.eval.metrics import continual_metrics, json_safe


def matrix_json(cfg, state: dict) -> dict:
    return {"method": cfg.method, "tasks": state["tasks"], "scores": state["scores"], "scorers": state["scorers"]}


def metrics_json(cfg, method, state: dict, partial: bool) -> dict:
    counts = method.param_counts()
    metrics = json_safe(continual_metrics(state["scores"]))
    done_train = [t for t in state["time_train"] if t is not None]
    done_eval = [t for t in state["time_eval"] if t is not None]
    metrics.update({
        "params": {"trainable_per_task": [n for n in state["trainable_per_task"] if n is not None],
                   "stored_total": counts["stored"], "active_per_sample": counts["active_per_sample"]},
        "time_s": {"train_per_task": [round(t, 2) for t in done_train], "eval_per_task": [round(t, 2) for t in done_eval],
                   "train_total": round(sum(done_train), 2), "eval_total": round(sum(done_eval), 2)},
        "uses_task_id_at_eval": method.uses_task_id_at_eval,
        "seed": cfg.seed,
        "skipped_steps": state.get("skipped_steps", []),  # per task: non-finite steps dropped (train.nonfinite=skip)
        # the optimizer steps each task ran (an epoch budget derives them from the task's size) and the global
        # batch (batch_size x processes x grad_accum) they were counted in
        "budget": {"steps_per_task": [n for n in state.get("steps_per_task", []) if n is not None],
                   "epochs_per_task": cfg.train.epochs_per_task, "global_batch_size": state.get("global_batch_size")},
        "eval_batches": cfg.train.eval_batches,  # mixed: test batches mixed the seen tasks; per_task: one at a time
        "complete": not partial,
    })
    return metrics


def write_results(out: Path, cfg, method, state: dict, partial: bool, seen_tasks=()) -> None:
    from cramcl.report.report import write_report

    matrix = matrix_json(cfg, state)
    metrics = metrics_json(cfg, method, state, partial)
    analysis = method.stream_analysis(list(seen_tasks))
    if analysis:
        metrics["method_analysis"] = analysis
    write_json_atomic(out / "results" / "matrix.json", matrix)
    kill_point("results_write")
    write_json_atomic(out / "results" / "metrics.json", metrics)
    write_report(out, matrix, metrics, extra_sections=method.report_sections())
