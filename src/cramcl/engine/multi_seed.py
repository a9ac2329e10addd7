"""Several seeds of one run: ``--seeds 0,1,2`` puts one run directory per seed under ``OUT/seed_<s>/`` and a
summary beside them (``summary.json``, ``summary.md``, ``final_row_seeds.png``) with the mean and standard
deviation of every continual metric and of every cell of the final row.

The standard deviation is the sample one (ddof = 1; 0 for a single seed), the usual choice for "mean +- std
over three seeds". A difference between two methods smaller than their spread is noise, and the summary
says how many seeds it rests on.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from cramcl.config_checks import MAX_SEED
from cramcl.engine.checkpoint import write_json_atomic
from cramcl.engine.run_lock import hold_run_lock
from cramcl.engine.runner import check_output_dir, run_stream
from cramcl.engine.saved_config import load_saved_config
from cramcl.errors import BadInputError
from cramcl.report.compare_plots import plot_final_rows

METRICS = ("MFT", "MFN", "MAA", "BWT", "forgetting")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; distinct integers in [0, MAX_SEED], in the order given."""
    seeds = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if not (part.isascii() and part.isdigit()):  # str.isdigit() also holds for '²' and other digits int() refuses
            raise BadInputError(f"--seeds: '{part}' is not a non-negative integer (expected e.g. 0,1,2)")
        if len(part) > len(str(MAX_SEED)) or int(part) > MAX_SEED:
            shown = part if len(part) <= 30 else f"{part[:20]}... ({len(part)} digits)"
            raise BadInputError(f"--seeds: {shown} is too large (a seed is in [0, {MAX_SEED}])")
        seeds.append(int(part))
    if not seeds:
        raise BadInputError("--seeds: give at least one seed, e.g. 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise BadInputError(f"--seeds: a seed is repeated in {text!r}")
    return seeds


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed_{seed}"


def mean_std(values: list[float | None]) -> dict:
    """{"mean", "std", "n", "values"} over the non-missing values (sample std, ddof = 1; 0 when n = 1)."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": round(mean, 4), "std": round(std, 4), "n": n, "values": list(values)}


def _final_row(scores: list[list]) -> list:
    last = max((t for t, row in enumerate(scores) if any(v is not None for v in row)), default=0)
    return scores[last]


def summarise_runs(runs: dict[int, Path]) -> dict:
    """Mean +- std over seeds of the metrics and of every final-row cell of finished run directories.

    runs: {seed: run directory}. Every run must be over the same tasks."""
    tasks, finals, metrics, params = None, {}, {m: [] for m in METRICS}, []
    for seed, run in runs.items():
        try:
            matrix = json.loads((run / "results" / "matrix.json").read_text())
            found = json.loads((run / "results" / "metrics.json").read_text())
        except (OSError, ValueError) as e:
            raise BadInputError(f"{run}: no finished results to summarise ({e})") from None
        if tasks is None:
            tasks = matrix["tasks"]
        elif matrix["tasks"] != tasks:
            raise BadInputError(f"{run}: its tasks {matrix['tasks']} differ from {tasks}")
        finals[seed] = _final_row(matrix["scores"])
        for m in METRICS:
            metrics[m].append(found.get(m))
        params.append(found.get("params", {}).get("stored_total"))
    seeds = list(runs)
    return {"seeds": seeds, "tasks": tasks,
            "metrics": {m: mean_std(v) for m, v in metrics.items()},
            "final_row": {task: mean_std([finals[s][i] for s in seeds]) for i, task in enumerate(tasks)},
            "stored_params": mean_std(params)}


def pm(stat: dict, decimals: int = 1) -> str:
    """"mean +- std" of a :func:`mean_std` dict ("–" when missing)."""
    if stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.{decimals}f} ± {stat['std']:.{decimals}f}"


def format_summary(summary: dict, title: str) -> str:
    n = len(summary["seeds"])
    lines = [f"# {title}", "", f"Seeds: {', '.join(map(str, summary['seeds']))} ({n} runs; mean ± sample std).", "",
             "| " + " | ".join(METRICS) + " |", "|" + "---|" * len(METRICS),
             "| " + " | ".join(pm(summary["metrics"][m]) for m in METRICS) + " |", "",
             "Final row (score on each task after the whole stream):", "",
             "| task | mean ± std | per seed |", "|---|---|---|"]
    for task, stat in summary["final_row"].items():
        per = ", ".join("–" if v is None else f"{v:.1f}" for v in stat["values"])
        lines.append(f"| {task} | {pm(stat)} | {per} |")
    lines += ["", "![final row over seeds](final_row_seeds.png)", ""]
    return "\n".join(lines)


def write_seed_summary(out: Path, runs: dict[int, Path], title: str) -> dict:
    summary = summarise_runs(runs)
    write_json_atomic(Path(out) / "summary.json", summary)
    row = {"method": title, "final_row": [s["mean"] for s in summary["final_row"].values()],
           "final_row_std": [s["std"] for s in summary["final_row"].values()]}
    plot_final_rows(summary["tasks"], [row], Path(out) / "final_row_seeds.png")
    (Path(out) / "summary.md").write_text(format_summary(summary, title))
    return summary


def run_seeds(cfg, out: Path, seeds: list[int], *, resume: bool = False, log=print, asked: dict | None = None,
              force: bool = False) -> dict:
    """``cramcl run --seeds``: the run ``cfg`` once per seed in ``OUT/seed_<s>/``, then the summary.

    Without ``resume`` every seed directory must be new (as for a single run); with it, each seed's run
    continues (a finished one is left as it is, one never started begins from another seed's saved config)."""
    out = Path(out)
    if resume:
        saved = [seed_dir(out, s) / "config.yaml" for s in seeds if (seed_dir(out, s) / "config.yaml").exists()]
        if not saved:
            raise BadInputError(f"{out}: no seed_<s>/config.yaml for seeds {seeds}; --resume needs an earlier run")
        cfg = load_saved_config(saved[0].parent)
    check_output_dir(out)
    with hold_run_lock(out, log=log):  # OUT (the summary) for the whole loop; each seed's run locks its own
        return _run_seeds_locked(cfg, out, seeds, resume=resume, log=log, asked=asked, force=force)


def _run_seeds_locked(cfg, out: Path, seeds: list[int], *, resume: bool, log, asked: dict | None,
                      force: bool) -> dict:
    runs = {}
    for seed in seeds:
        run = runs[seed] = seed_dir(out, seed)
        again = resume and (run / "config.yaml").exists()
        log(f"== seed {seed}: {'resuming' if again else 'running'} in {run}")
        run_stream(None if again else dataclasses.replace(cfg, seed=seed), run, resume=again, log=log,
                   asked=asked if again else None, force=force)
    return write_seed_summary(out, runs, f"{cfg.method} ({cfg.profile} profile)")
