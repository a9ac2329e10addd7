"""How much of each later expert's update lies where its group's earlier experts already act: the part CRAM's
capability gap removes (novelty filter + projection off the history's row space, docs/cram.md).

    python studies/capability-gap/capability_gap.py runs/grid/cram+tau_novel=0 [runs/grid/cram ...]

For every variant directory (seeds under it, the layout of `studies/grid/run_grid.py`) and every expert k whose group
held earlier experts, on the final checkpoint, per adapted linear:

    overlap_k = ||B_k A_k Q||_F^2 / ||B_k A_k||_F^2,   Q: orthonormal basis of the row space of the earlier
                                                          experts' A (stacked), within the same group

(1 = the whole update acts on inputs the earlier experts read; 0 = none of it). On a run with
``tau_novel=0`` (no capability gap) this is the share of the trained expert the gap would have taken away;
on a `cram` run it is what stable-phase training put back after consolidation removed it. Printed: the median
over linears, mean +- std over seeds, per task, beside the task's own expert's routing weight on its own test
images (metrics.json), which says how much of the removed part the earlier experts could supply at test time
(their weight is 1 minus it, at most).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from cramcl.engine.multi_seed import mean_std, pm
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grid"))  # studies/grid: the grid's reader
from grid_tables import load_grid  # noqa: E402


def overlaps(run: Path) -> dict[str, tuple[float, float]]:
    """task name -> (median over linears of overlap_k, median of m / d_in: what a random update would show),
    for the final checkpoint's experts with a history."""
    last = max((run / "checkpoints").glob("task_*"), key=lambda p: int(p.name.split("_")[1]))
    meta = json.loads((last / "method.json").read_text())
    tensors = load_file(str(last / "method.safetensors"))
    groups, tasks, names = meta["cram"]["expert_group"], meta["cram"]["expert_task"], meta["task_names"]
    modules = sorted({k.split(".expert.")[0] for k in tensors if ".expert." in k})
    out = {}
    for k, g in enumerate(groups):
        history = [j for j in range(k) if groups[j] == g]
        if not history:
            continue
        shares, chance = [], []
        for m in modules:
            delta = tensors[f"{m}.expert.{k}.B"].double() @ tensors[f"{m}.expert.{k}.A"].double()  # (d_out, d_in)
            rows = torch.cat([tensors[f"{m}.expert.{j}.A"].double() for j in history])  # (sum r_j, d_in)
            Q, _ = torch.linalg.qr(rows.T)  # (d_in, m): the history's row space
            shares.append(float((delta @ Q).pow(2).sum() / delta.pow(2).sum().clamp_min(1e-30)))
            chance.append(Q.shape[1] / Q.shape[0])
        out[names[tasks[k]]] = (statistics.median(shares), statistics.median(chance))
    return out


def own_weight(metrics: dict) -> dict[str, float]:
    return {t: w["mean"] for t, w in metrics.get("method_analysis", {}).get("own_expert_weight", {}).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="+")
    args = ap.parse_args()
    print("| variant | task | update in the earlier experts' row space (median over linears) | a random update's "
          "(m / d_in) | own expert's routing weight on own test images |")
    print("|---|---|---|---|---|")
    for variant in map(Path, args.variants):
        runs = load_grid(variant.parent).get(variant.name, [])  # finished seeds only
        if not runs:
            print(f"{variant}: no finished seed", file=sys.stderr)
            continue
        per_seed = [overlaps(r["path"]) for r in runs]
        weights = [own_weight(r["metrics"]) for r in runs]
        for task in per_seed[0]:
            share = mean_std([o[task][0] for o in per_seed])
            w = mean_std([x[task] for x in weights if task in x])
            chance = statistics.mean(o[task][1] for o in per_seed)
            print(f"| {variant.name} | {task} | {pm(share, 2)} | {chance:.2f} | {pm(w, 3)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
