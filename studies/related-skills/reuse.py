"""Does a task lean on its group's earlier experts? From finished CRAM runs: per task with earlier experts in its
group, the routing weight they get on its test images, its final score, and its score re-evaluated with its own
expert removed (each layer's weights renormalised over the earlier experts alone), beside one-task LoRA
(oracle-lora's score of the task right after training it).

    python studies/related-skills/reuse.py --cram runs/related/cram --lora runs/related/oracle-lora [--seeds 0,1,2]

An earlier expert is reused when the task still scores well without its own expert; the score with the own
expert removed is what the earlier experts alone know of the task (forward transfer an ideal method could use).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from cramcl.engine.session import open_finished_run
from cramcl.eval.evaluate import predict, score_records


def _without_own_expert(method, own: int, earlier: list[int]):
    """method.routing_weights with expert ``own``'s weight moved onto ``earlier`` (in proportion to what they
    already had; evenly where they had none); later experts keep theirs."""
    original = method.routing_weights

    def routed(records, groups, task_index=None):
        w = original(records, groups, task_index).clone()  # (L, B, K)
        own_w, keep = w[:, :, own:own + 1], w[:, :, earlier]
        mass = keep.sum(-1, keepdim=True)
        w[:, :, earlier] = torch.where(mass > 0, keep / mass.clamp_min(1e-30) * (mass + own_w), own_w / len(earlier))
        w[:, :, own] = 0
        return w
    return routed


def _no_expert(method):
    """method.routing_weights with every weight 0: the frozen base alone."""
    original = method.routing_weights
    return lambda records, groups, task_index=None: torch.zeros_like(original(records, groups, task_index))


def _score(session, method, task, t: int, routing) -> float:
    records = list(task.test)
    session.backbone.prepare(records)
    method.routing_weights = routing
    try:
        preds = predict(session.accelerator, session.backbone, method, records, session.cfg.train.eval_batch_size,
                        task_ids=[t] * len(records))
    finally:
        del method.routing_weights
    return score_records(task.scorer, records, preds)[0]


def run_rows(run: Path) -> list[dict]:
    session, _, _ = open_finished_run(run, log=lambda *a: None)
    method, matrix = session.method, json.loads((run / "results" / "matrix.json").read_text())
    analysis = json.loads((run / "results" / "metrics.json").read_text())["method_analysis"]
    rows = []
    for t, task in enumerate(session.bench.tasks):
        own = method.expert_for_task(t)
        earlier = [k for k in method._group_experts(method.expert_group[own]) if k < own]
        if not earlier:
            continue
        removed = _score(session, method, task, t, _without_own_expert(method, own, earlier))
        base = _score(session, method, task, t, _no_expert(method))
        rows.append({"task": task.name, "earlier_weight": analysis["own_expert_weight"][task.name]["earlier_experts"],
                     "learned": matrix["scores"][t][t], "final": matrix["scores"][-1][t], "own_removed": removed,
                     "base": base})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cram", type=Path, required=True, help="a variant directory holding seed_<s>/ runs")
    ap.add_argument("--lora", type=Path, required=True, help="oracle-lora's variant directory (one-task LoRA)")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_task: dict[str, list[dict]] = {}
    for seed in seeds:
        lora = json.loads((args.lora / f"seed_{seed}" / "results" / "matrix.json").read_text())
        for row in run_rows(args.cram / f"seed_{seed}"):
            t = lora["tasks"].index(row["task"])
            per_task.setdefault(row["task"], []).append({**row, "lora": lora["scores"][t][t]})

    def ms(rows, key):
        values = [r[key] for r in rows]
        return f"{statistics.mean(values):.1f} +- {statistics.stdev(values) if len(values) > 1 else 0:.1f}"

    print(f"seeds {seeds}\n")
    print("| task | earlier experts' weight | the base alone (no expert) | one-task LoRA | CRAM after learning it | "
          "CRAM final | CRAM final, own expert removed |")
    print("|---|---|---|---|---|---|---|")
    for task, rows in per_task.items():
        weight = statistics.mean(r["earlier_weight"] for r in rows)
        print(f"| {task} | {weight:.3f} | {ms(rows, 'base')} | {ms(rows, 'lora')} | {ms(rows, 'learned')} | "
              f"{ms(rows, 'final')} | "
              f"{ms(rows, 'own_removed')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
