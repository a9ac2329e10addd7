"""Markdown tables for docs/results.md from a finished `studies/grid/run_grid.py` (or `cramcl compare --seeds`) tree.

    python studies/grid/grid_tables.py runs/grid [--baseline cram]

Prints: the methods' table (mean +- sample std over the seeds each variant finished), the ablation table
against the baseline (whether each difference exceeds the seed spread: |difference of means| > the sum of
the two standard deviations; each seed's paired difference beside it), and, for every group of the baseline
holding several tasks, each task's final score under learned against oracle routing with its own expert's
mean routing weight on its own test images. Variants with fewer finished seeds than the others are marked.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cramcl.engine.multi_seed import mean_std, pm

METRICS = ("MFT", "MFN", "MAA", "BWT", "forgetting")


def load_grid(root: Path) -> dict[str, list[dict]]:
    """variant directory name -> finished seeds' {"seed", "matrix", "metrics", "path"}."""
    out = {}
    for variant in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = []
        for seed_dir in sorted(variant.glob("seed_*")):
            try:
                metrics = json.loads((seed_dir / "results" / "metrics.json").read_text())
                matrix = json.loads((seed_dir / "results" / "matrix.json").read_text())
            except (OSError, ValueError):
                continue
            if metrics.get("complete"):
                runs.append({"seed": int(seed_dir.name.split("_")[1]), "matrix": matrix, "metrics": metrics,
                             "path": seed_dir})
        if runs:
            out[variant.name] = runs
    return out


def _stat(runs, key):
    return mean_std([r["metrics"][key] for r in runs])


def _stored_params(runs) -> str:
    """The first finished seed's stored parameters (adaptive ranks make them vary by seed)."""
    return f'{runs[0]["metrics"]["params"]["stored_total"]:,}'


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--baseline", default="cram")
    args = ap.parse_args()
    grid = load_grid(Path(args.root))
    n_max = max(len(r) for r in grid.values())
    tasks = next(iter(grid.values()))[0]["matrix"]["tasks"]

    print("| variant | seeds | " + " | ".join(METRICS) + " | stored params |")
    print("|---|---|" + "---|" * len(METRICS) + "---|")
    for name, runs in grid.items():
        seeds = ",".join(str(r["seed"]) for r in runs) + ("" if len(runs) == n_max else " (incomplete)")
        cells = [pm(_stat(runs, m)) for m in METRICS] + [_stored_params(runs)]
        print(f"| {name} | {seeds} | " + " | ".join(cells) + " |")

    print("\nFinal row (mean ± std over seeds):\n")
    print("| variant | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for name, runs in grid.items():
        cells = [pm(mean_std([r["matrix"]["scores"][-1][i] for r in runs])) for i in range(len(tasks))]
        print(f"| {name} | " + " | ".join(cells) + " |")

    base = grid.get(args.baseline)
    if base:
        b = _stat(base, "MFN")
        print(f"\nAgainst `{args.baseline}` (MFN {pm(b)}): an effect counts when |difference| > std + std. "
              "The seeds are paired (same data and order per seed), so each seed's difference is given too.\n")
        print("| variant | MFN | difference | per seed | BWT | stored params | exceeds the seed spread? |")
        print("|---|---|---|---|---|---|---|")
        base_mfn = {r["seed"]: r["metrics"]["MFN"] for r in base}
        for name, runs in grid.items():
            if name == args.baseline or not name.startswith(args.baseline + "+"):
                continue
            v = _stat(runs, "MFN")
            diff = v["mean"] - b["mean"]
            per_seed = ", ".join(f"{r['metrics']['MFN'] - base_mfn[r['seed']]:+.1f}" for r in runs
                                 if r["seed"] in base_mfn)
            verdict = "yes" if abs(diff) > v["std"] + b["std"] else "no (noise)"
            print(f"| {name} | {pm(v)} | {diff:+.1f} | {per_seed} | {pm(_stat(runs, 'BWT'))} | "
                  f"{_stored_params(runs)} | {verdict} |")
        oracle = grid.get(f"{args.baseline}+routing=oracle")
        task_group = base[0]["metrics"]["method_analysis"]["task_group"]
        groups = {}
        for task, g in task_group.items():
            groups.setdefault(g, []).append(task)
        print("\nShared groups: final score under learned vs oracle routing, and each task's own expert's mean "
              "routing weight on its own test images (learned routing).\n")
        print("| group | task | learned | oracle routing | own expert's weight |")
        print("|---|---|---|---|---|")
        for g, members in groups.items():
            if len(members) < 2:
                continue
            for task in members:
                i = tasks.index(task)
                learned = mean_std([r["matrix"]["scores"][-1][i] for r in base])
                orc = mean_std([r["matrix"]["scores"][-1][i] for r in oracle]) if oracle else {"mean": None}
                weight = mean_std([r["metrics"]["method_analysis"]["own_expert_weight"][task]["mean"] for r in base])
                print(f"| {g} | {task} | {pm(learned)} | {pm(orc)} | {pm(weight, 3)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
