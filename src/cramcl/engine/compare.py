"""`cramcl compare`: several methods on the same stream, seed and step budget; resumable per method.

Each method runs in ``OUT/<method>/`` (a normal run directory); a finished one is reused, an interrupted one
is resumed. Then ``compare.json``, ``compare.md`` and three plots summarise them side by side.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from cramcl.config import resolve_config
from cramcl.engine.checkpoint import write_json_atomic
from cramcl.engine.multi_seed import seed_dir, write_seed_summary
from cramcl.engine.run_lock import hold_run_lock
from cramcl.engine.runner import check_output_dir, run_stream
from cramcl.errors import BadInputError
from cramcl.eval.matrix_io import read_json_object
from cramcl.methods.registry import is_builtin, method_label
from cramcl.report.compare_plots import plot_final_rows, plot_heatmap_grid, plot_mfn_vs_params

COLUMNS = ("MFT", "MFN", "MAA", "BWT", "forgetting")
OLD_DATA_METHODS = ("replay", "mtl")  # train on earlier tasks' records (mtl: all jointly)


def run_finished(run: Path) -> bool:
    """Whether the run directory holds a finished run (its metrics.json says ``complete``)."""
    metrics = run / "results" / "metrics.json"
    return metrics.exists() and _read_results(metrics).get("complete", False)


def _read_results(path: Path) -> dict:
    """A run's matrix.json or metrics.json; one cut off or damaged is bad input naming it (a resume of the
    run writes its results again)."""
    try:
        return read_json_object(path, path.name)
    except BadInputError as e:
        run = path.parent.parent
        raise BadInputError(f"{e.problems[0]}; rewrite it with: cramcl run --resume --out {run}") from None


def run_or_resume(cfg, run: Path, label: str, log=print) -> None:
    """Reuse a finished run directory, resume an interrupted one, or start ``cfg`` in it."""
    if run_finished(run):
        log(f"== {label}: finished earlier, reusing {run}")
        return
    resume = (run / "config.yaml").exists()
    log(f"== {label}: {'resuming' if resume else 'running'} in {run}")
    run_stream(None if resume else cfg, run, resume=resume, log=log)


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``"cram:routing=oracle:lambda_orth=0"`` -> ("cram", ["method.routing=oracle", "method.lambda_orth=0"]):
    a method with some of its settings changed, compared beside the others under that spec as its name."""
    parts = spec.split(":")
    first_setting = next((i for i, p in enumerate(parts) if "=" in p), len(parts))
    name, pairs = ":".join(parts[:first_setting]), parts[first_setting:]  # a user's file.py:Class keeps its ':'
    if is_builtin(parts[0]) and len(parts) > 1 and first_setting > 1:  # cram:sigma: a setting without a value
        name, pairs = parts[0], parts[1:]
    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0]]
    if name and bad:
        why = "has no value" if "=" not in bad[0] else "has no name"
        raise BadInputError(f"--methods: '{spec}': setting '{bad[0]}' {why} (write {name}:"
                            f"{bad[0].split('=')[0] or 'key'}=VALUE)")
    if not name:
        raise BadInputError(f"--methods: '{spec}' is not NAME or NAME:key=value[:key=value...]")
    return name, [f"method.{p}" for p in pairs]


def variant_dir(spec: str) -> str:
    """The run directory name of a method spec (``cram:routing=oracle`` -> ``cram+routing=oracle``; a user's
    ``path/to/m.py:Class`` -> its class's name)."""
    name, settings = parse_variant(spec)
    label = method_label(name) if ":" in name else name
    return "+".join([label, *(s.removeprefix("method.") for s in settings)]).replace("/", "_")


def run_compare(methods: list[str], out: Path, *, profile=None, config_file=None, benchmark=None, overrides=(),
                seeds: list[int] | None = None, log=print) -> dict:
    """Every method (or variant ``NAME:key=value``) on the same stream and budget, in ``OUT/<method>/``
    (with ``seeds``: ``OUT/<method>/seed_<s>/`` per seed, summarised as mean +- std)."""
    if not methods:
        raise BadInputError("--methods: give at least one method")
    if len(set(methods)) != len(methods):
        raise BadInputError(f"--methods: a method is repeated in {','.join(methods)}")
    # resolve every config first: a typo in any method's settings fails before hours of training
    configs = {}
    for spec in methods:
        name, settings = parse_variant(spec)
        configs[spec] = resolve_config(method=name, profile=profile, config_file=config_file, benchmark=benchmark,
                                       overrides=[*overrides, *settings])
    # OUT and every method's directory are held to the end (engine/run_lock.py): a second compare, or a run in
    # one of them, is refused before anything trains; each run takes its own directory's lock again
    check_output_dir(out)
    with contextlib.ExitStack() as held:
        for where in (out, *(out / variant_dir(spec) for spec in configs)):
            held.enter_context(hold_run_lock(where, log=log))
        for spec, cfg in configs.items():
            run = out / variant_dir(spec)
            if seeds is None:
                run_or_resume(cfg, run, spec, log)
                continue
            for seed in seeds:
                run_or_resume(dataclasses.replace(cfg, seed=seed), seed_dir(run, seed), f"{spec} seed {seed}", log)
        return write_comparison(out, methods, seeds)


def _method_row(method: str, run: Path) -> tuple[dict, list]:
    """One comparison row (``method``: the spec it was run under) from a finished run directory."""
    matrix = _read_results(run / "results" / "matrix.json")
    metrics = _read_results(run / "results" / "metrics.json")
    last = max((t for t, row in enumerate(matrix["scores"]) if any(v is not None for v in row)), default=0)
    row = {"method": method, **{c: metrics.get(c) for c in COLUMNS},
           "stored_params": metrics["params"]["stored_total"],
           "active_params": metrics["params"]["active_per_sample"],
           "train_s": metrics["time_s"]["train_total"], "eval_s": metrics["time_s"]["eval_total"],
           "uses_task_id_at_eval": metrics.get("uses_task_id_at_eval", False),
           "uses_old_data": matrix["method"] in OLD_DATA_METHODS,
           "final_row": matrix["scores"][last]}
    return row, matrix


def write_comparison(out: Path, methods: list[str], seeds: list[int] | None = None) -> dict:
    rows, matrices, tasks = [], {}, None
    for method in methods:
        run = out / variant_dir(method)
        first = run if seeds is None else seed_dir(run, seeds[0])
        row, matrix = _method_row(method, first)
        if seeds is not None:
            runs = {s: seed_dir(run, s) for s in seeds}
            summary = write_seed_summary(run, runs, method)
            per_seed = [_method_row(method, r)[0] for r in runs.values()]
            row.update({c: summary["metrics"][c]["mean"] for c in COLUMNS})
            row["std"] = {c: summary["metrics"][c]["std"] for c in COLUMNS}
            row["final_row"] = [summary["final_row"][t]["mean"] for t in summary["tasks"]]
            row["final_row_std"] = [summary["final_row"][t]["std"] for t in summary["tasks"]]
            row["train_s"] = sum(r["train_s"] for r in per_seed) / len(per_seed)
            row["eval_s"] = sum(r["eval_s"] for r in per_seed) / len(per_seed)
            row["seeds"] = list(seeds)
        if tasks is None:
            tasks = matrix["tasks"]
        elif matrix["tasks"] != tasks:
            raise BadInputError(f"{run}: its tasks {matrix['tasks']} differ from {tasks}")
        rows.append(row)
        matrices[method] = matrix["scores"]
    result = {"tasks": tasks, "methods": rows, "seeds": seeds}
    write_json_atomic(out / "compare.json", result)
    plot_mfn_vs_params(rows, out / "mfn_vs_params.png")
    plot_final_rows(tasks, rows, out / "final_rows.png")
    plot_heatmap_grid(tasks, matrices, out / "heatmaps.png")
    (out / "compare.md").write_text(format_comparison(result))
    return result


def format_comparison(result: dict) -> str:
    def f(v, d=2):
        return "–" if v is None else f"{v:.{d}f}"

    def cell(r, c):
        if r.get("std") is None or r[c] is None:
            return f(r[c])
        return f"{r[c]:.1f} ± {r['std'][c]:.1f}"

    seeds = result.get("seeds")
    head = [f"Tasks: {', '.join(result['tasks'])}", ""]
    if seeds:
        head += [f"Seeds: {', '.join(map(str, seeds))}; each cell is the mean ± sample std over them, the heatmaps "
                 f"show seed {seeds[0]}. A difference smaller than the spread is noise.", ""]
    lines = ["# Comparison", "", *head,
             "| method | MFT | MFN | MAA | BWT | forgetting | stored params | active params | uses old data | "
             "uses task id | train s | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["methods"], key=lambda r: -(r["MFN"] if r["MFN"] is not None else -1e9)):
        lines.append(f"| {r['method']} | " + " | ".join(cell(r, c) for c in COLUMNS)
                     + f" | {r['stored_params']:,} | {r['active_params']:,} | {'yes' if r.get('uses_old_data') else 'no'} | "
                     f"{'**yes**' if r['uses_task_id_at_eval'] else 'no'} | {f(r['train_s'], 1)} | {f(r['eval_s'], 1)} |")
    lines += ["", "![MFN vs parameters](mfn_vs_params.png)", "", "![final rows](final_rows.png)", "",
              "![heatmaps](heatmaps.png)", ""]
    return "\n".join(lines)
