"""What CRAM's allocation rule sees: per task, the buffer's singular-value spectrum at consolidation, read from
finished runs' consolidation logs (checkpoints/task_<t>/method.json), summarised over the adapted modules.

    python studies/related-skills/spectra.py runs/related/cram/seed_0 [runs/grid/cram/seed_0 ...]

Per task (median over modules): the largest singular value, how many directions pass the paper's absolute
tau_alloc (0.08), the share of the update's energy in the top r_max (9) directions, how many directions hold 50,
80 and 90% of the energy, and, for a task with earlier experts in its group, the median novelty of its 9
strongest directions (the share of each direction's norm outside the earlier experts' row space) and, summed over
the modules, how many of them the capability gap's filter drops (novelty <= tau_novel, the default profile's 0.9).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from cramcl.methods.cram.consolidation import allocation_count

SHARES = (0.5, 0.8, 0.9)


def task_rows(run: Path, tau_alloc: float, r_max: int, tau_novel: float) -> list[dict]:
    checkpoints = sorted((run / "checkpoints").glob("task_*"), key=lambda p: int(p.name.split("_")[1]))
    meta = json.loads((checkpoints[-1] / "method.json").read_text())
    names = meta["task_names"]
    rows = []
    for entry in meta["cram"]["consolidation"]:
        per_module = []
        for key, spectrum in entry["spectra"].items():
            S = torch.tensor(spectrum, dtype=torch.float64)
            energy = S.pow(2)
            nov = entry.get("novelty", {}).get(key)
            per_module.append({
                "s_max": float(S[0]), "absolute": allocation_count(S, tau_alloc, "absolute"),
                "top_share": float(energy[:r_max].sum() / energy.sum()),
                **{f"e{round(100 * q)}": allocation_count(S, q, "energy") for q in SHARES},
                "novelty": statistics.median(nov[:r_max]) if nov else None, "rank": entry["ranks"][key],
                "dropped": sum(v <= tau_novel for v in nov[:r_max]) if nov else None})
        med = {k: statistics.median(m[k] for m in per_module) for k in per_module[0] if per_module[0][k] is not None}
        if per_module[0]["dropped"] is not None:
            med["dropped"] = sum(m["dropped"] for m in per_module)
        rows.append({"task": names[entry["task"]], "group": entry["group"], "history": entry["history_experts"],
                     "modules": len(per_module), **med})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--tau-alloc", type=float, default=0.08)
    ap.add_argument("--r-max", type=int, default=9)
    ap.add_argument("--tau-novel", type=float, default=0.9)
    args = ap.parse_args()
    for run in args.runs:
        print(f"\n{run}\n")
        print("| task | group | earlier experts | S_max | S > tau_alloc | energy in top r_max | directions for 50 / 80 / "
              "90% energy | novelty of top r_max | of them dropped by the filter | rank given |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in task_rows(run, args.tau_alloc, args.r_max, args.tau_novel):
            nov = f"{r['novelty']:.3f}" if "novelty" in r else "–"
            dropped = f"{r['dropped']} of {r['modules'] * args.r_max}" if "dropped" in r else "–"
            print(f"| {r['task']} | {r['group']} | {r['history']} | {r['s_max']:.2f} | {r['absolute']:g} | "
                  f"{100 * r['top_share']:.0f}% | {r['e50']:g} / {r['e80']:g} / {r['e90']:g} | {nov} | {dropped} | "
                  f"{r['rank']:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
