"""`cramcl compare`: several methods on the same stream, seed and step budget; resumable per method.

Each method runs in ``OUT/<method>/`` (a normal run directory); a finished one is reused, an interrupted one
is resumed. Then ``compare.json``, ``compare.md`` and three plots summarise them side by side.
"""
from __future__ import annotations

import json
from pathlib import Path

from cramcl.engine.checkpoint import write_json_atomic
from cramcl.errors import BadInputError

COLUMNS = ("MFT", "MFN", "MAA", "BWT", "forgetting")


def _finished(run: Path) -> bool:
    metrics = run / "results" / "metrics.json"
    return metrics.exists() and json.loads(metrics.read_text()).get("complete", False)


def run_compare(methods: list[str], out: Path, *, profile=None, config_file=None, benchmark=None, overrides=(),
                log=print) -> dict:
    from cramcl.config import resolve_config
    from cramcl.engine.runner import run_stream

    if not methods:
        raise BadInputError("--methods: give at least one method")
    # resolve every config first: a typo in any method's settings fails before hours of training
    configs = {m: resolve_config(method=m, profile=profile, config_file=config_file, benchmark=benchmark,
                                 overrides=list(overrides)) for m in methods}
    for method, cfg in configs.items():
        run = out / method
        if _finished(run):
            log(f"== {method}: finished earlier, reusing {run}")
            continue
        resume = (run / "config.yaml").exists()
        log(f"== {method}: {'resuming' if resume else 'running'} in {run}")
        run_stream(None if resume else cfg, run, resume=resume, log=log)
    return write_comparison(out, methods)


def write_comparison(out: Path, methods: list[str]) -> dict:
    from cramcl.report.compare_plots import plot_final_rows, plot_heatmap_grid, plot_mfn_vs_params

    rows, matrices, tasks = [], {}, None
    for method in methods:
        matrix = json.loads((out / method / "results" / "matrix.json").read_text())
        metrics = json.loads((out / method / "results" / "metrics.json").read_text())
        if tasks is None:
            tasks = matrix["tasks"]
        elif matrix["tasks"] != tasks:
            raise BadInputError(f"{out / method}: its tasks {matrix['tasks']} differ from {tasks}")
        last = max((t for t, row in enumerate(matrix["scores"]) if any(v is not None for v in row)), default=0)
        rows.append({"method": method, **{c: metrics.get(c) for c in COLUMNS},
                     "stored_params": metrics["params"]["stored_total"],
                     "active_params": metrics["params"]["active_per_sample"],
                     "train_s": metrics["time_s"]["train_total"], "eval_s": metrics["time_s"]["eval_total"],
                     "uses_task_id_at_eval": metrics.get("uses_task_id_at_eval", False),
                     "final_row": matrix["scores"][last]})
        matrices[method] = matrix["scores"]
    result = {"tasks": tasks, "methods": rows}
    write_json_atomic(out / "compare.json", result)
    plot_mfn_vs_params(rows, out / "mfn_vs_params.png")
    plot_final_rows(tasks, rows, out / "final_rows.png")
    plot_heatmap_grid(tasks, matrices, out / "heatmaps.png")
    (out / "compare.md").write_text(format_comparison(result))
    return result


def format_comparison(result: dict) -> str:
    def f(v, d=2):
        return "–" if v is None else f"{v:.{d}f}"

    lines = ["# Comparison", "", f"Tasks: {', '.join(result['tasks'])}", "",
             "| method | MFT | MFN | MAA | BWT | forgetting | stored params | active params | train s | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["methods"], key=lambda r: -(r["MFN"] if r["MFN"] is not None else -1e9)):
        name = r["method"] + (" (uses task id)" if r["uses_task_id_at_eval"] else "")
        lines.append(f"| {name} | {f(r['MFT'])} | {f(r['MFN'])} | {f(r['MAA'])} | {f(r['BWT'])} | "
                     f"{f(r['forgetting'])} | {r['stored_params']:,} | {r['active_params']:,} | "
                     f"{f(r['train_s'], 1)} | {f(r['eval_s'], 1)} |")
    lines += ["", "![MFN vs parameters](mfn_vs_params.png)", "", "![final rows](final_rows.png)", "",
              "![heatmaps](heatmaps.png)", ""]
    return "\n".join(lines)
