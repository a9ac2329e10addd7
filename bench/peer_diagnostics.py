"""Why each method of a finished grid falls short of a reference (``mtl`` by default): the measurements.

    PYTHONPATH=src python bench/peer_diagnostics.py runs/grid [--reference mtl] [--no-probe]

For every variant directory with finished seeds (the layout of `bench/run_grid.py` / `cramcl compare
--seeds`), mean +- std over its seeds of:
* the gap to the reference's final row split exactly into **plasticity** (reference minus the score right
  after learning the task) and **forgetting** (that score minus the final one) (eval/metrics.py
  ``gap_to_reference``), averaged over tasks;
* **own-expert share**: for methods that add one expert per task, the % of evaluation routing units
  (samples or prompt tokens, every adapted linear) whose largest weight is on the task's own expert, on the
  final checkpoint, without task id (eval/routing_probe.py; cached in OUT/diagnostics/);
* **penalty share** (runs with an ``orth`` aux loss: O-LoRA, CRAM): the penalty over the LM loss at the first
  logged step (step 10) of each task after the first, and the mean over the task's logged steps;
* **replay share** (``replay``): the buffered records' share of each later task's training records.
Prints one markdown table.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path

from cramcl.engine.seeds import mean_std, pm
from cramcl.eval.metrics import gap_to_reference


def _finished(root: Path) -> dict[str, list[Path]]:
    out = {}
    for variant in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "diagnostics"):
        seeds = []
        for run in sorted(variant.glob("seed_*")):
            try:
                if json.loads((run / "results" / "metrics.json").read_text()).get("complete"):
                    seeds.append(run)
            except (OSError, ValueError):
                pass
        if seeds:
            out[variant.name] = seeds
    return out


def _scores(run: Path) -> list[list]:
    return json.loads((run / "results" / "matrix.json").read_text())["scores"]


def _probe(run: Path, cache: Path) -> dict:
    """{task: {"share", ...}} of the run's final checkpoint (computed once, then read from ``cache``)."""
    if cache.exists():
        return json.loads(cache.read_text())
    import torch

    from cramcl.engine.session import open_finished_run
    from cramcl.eval.routing_probe import own_expert_share

    torch.set_num_threads(1)
    session, _, _ = open_finished_run(run, None, log=lambda *a: None)
    result = own_expert_share(session.backbone, session.method, session.bench.tasks,
                              session.cfg.train.eval_batch_size, device=session.accelerator.device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    return result


def _penalty_shares(run: Path) -> tuple[float, float] | None:
    """(median over tasks of orth/LM at the task's first logged step, median of the task means)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(str(run / "logs" / "cramcl" / "events.out.tfevents.*")))
    first, means = [], []
    for f in files:
        ea = EventAccumulator(f, size_guidance={"scalars": 0})
        ea.Reload()
        tags = ea.Tags().get("scalars", [])
        for tag in tags:
            if not tag.endswith("/orth"):
                continue
            loss = {e.step: e.value for e in ea.Scalars(tag.replace("/orth", "/loss"))}
            ratios = [e.value / max(loss[e.step] - e.value, 1e-9) for e in ea.Scalars(tag) if e.step in loss]
            if ratios:
                first.append(ratios[0])
                means.append(sum(ratios) / len(ratios))
    return (statistics.median(first), statistics.median(means)) if first else None


def _replay_share(run: Path) -> float | None:
    """Mean over tasks 1.. of buffered records / (task's records + buffered records)."""
    ckpts = sorted((run / "checkpoints").glob("task_*"), key=lambda p: int(p.name.split("_")[1]))
    metas = [json.loads((c / "method.json").read_text()).get("replay") for c in ckpts]
    if len(ckpts) < 2 or any(m is None for m in metas):
        return None
    from cramcl.data.stream import load_stream
    from cramcl.engine.runner import load_saved_config

    tasks = load_stream(load_saved_config(run).data).tasks
    shares = []
    for meta, task in zip(metas, tasks[1:]):  # the buffer after task t is mixed into task t + 1
        buffered = sum(len(ids) for _, ids in meta["buffer"])
        shares.append(buffered / (buffered + len(task.train)))
    return sum(shares) / len(shares)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--reference", default="mtl")
    ap.add_argument("--no-probe", action="store_true")
    args = ap.parse_args()
    grid = _finished(args.root)
    if args.reference not in grid:
        print(f"{args.root}: no finished '{args.reference}' run to compare with", file=sys.stderr)
        return 2
    ref_rows = [_scores(r)[-1] for r in grid[args.reference]]
    reference = [statistics.mean(col) for col in zip(*ref_rows)]
    print("| variant | seeds | gap to " + args.reference + " | plasticity | forgetting | own-expert share % "
          "(lowest task) | penalty / LM loss (step 10; task mean) | replayed share of training |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in grid.items():
        if name == args.reference:
            continue
        gaps = [gap_to_reference(_scores(r), reference) for r in runs]
        cells = [pm(mean_std([g[k] for g in gaps])) for k in ("gap", "plasticity", "forgetting")]
        share = "–"
        if not args.no_probe:
            probes = [_probe(r, args.root / "diagnostics" / name / f"{r.name}.json") for r in runs]
            if probes and all(probes):
                means = [statistics.mean(v["share"] for v in p.values()) for p in probes]
                lowest = min(((t, statistics.mean(p[t]["share"] for p in probes)) for t in probes[0]),
                             key=lambda kv: kv[1])
                share = f"{pm(mean_std(means))} ({lowest[0]} {lowest[1]:.1f})"
        pen = [p for p in (_penalty_shares(r) for r in runs) if p]
        pen_cell = (f"{statistics.mean(p[0] for p in pen):.3g}; {statistics.mean(p[1] for p in pen):.3g}"
                    if pen else "–")
        rep = [s for s in (_replay_share(r) for r in runs) if s is not None]
        rep_cell = f"{100 * statistics.mean(rep):.1f}%" if rep else "–"
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {share} | {pen_cell} | {rep_cell} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
