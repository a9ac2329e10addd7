"""Why each method of a finished grid falls short of a reference (``mtl`` by default): the measurements.

    python studies/peer-diagnostics/peer_diagnostics.py runs/grid [--reference mtl] [--probe V1,V2]
        [--isolate V1,V2] [--prefix V1,V2]

For every variant directory with finished seeds (the layout of `studies/grid/run_grid.py` / `cramcl compare
--seeds`), mean +- std over its seeds of:
* the gap to the reference's final row split exactly into **plasticity** (reference minus the score right
  after learning the task) and **forgetting** (that score minus the final one) (eval/metrics.py
  ``gap_to_reference``), averaged over tasks;
* **own-expert share** (``--probe V1,V2``): for methods that add one expert per task, the % of evaluation
  routing units (samples or prompt tokens, every adapted linear) that give the task's own expert more weight
  than any other, on the final checkpoint, without task id, batches mixing tasks as evaluation does
  (eval/routing_probe.py);
* **own expert alone** (``--isolate V1,V2``: methods that add one expert per task and mix several at test
  time, e.g. SAME): the final row's mean when every task's test records are answered with the task's own
  expert alone (weight 1, every other expert 0; the true task id, so a diagnosis, not a method); and
  **without later experts** (``--prefix V1,V2``, for O-LoRA, whose task t trains with experts 0..t-1 in its
  forward at weight 1): experts 0..t at weight 1, every later one 0, i.e. the forward task t was trained in.
  The difference to the final row is what the other (or later) experts cost (cached under ROOT/diagnostics/);
* **penalty share** (runs with an ``orth`` aux loss: O-LoRA, CRAM): the penalty over the LM loss at the first
  logged step (step 10) of each task after the first, and the mean over the task's logged steps;
* **replay share** (``replay``): the buffered records' share of each later task's training records;
* **fusion cross terms** (``hide``): in the merged lower linears, ||merged update - sum_k B_k A_k||_F over
  ||sum_k B_k A_k||_F (0 for ``products``; the cross terms B_i A_j of ``factors``), after the second task and
  after the last, mean over the merged linears; and one task's own term against the sum, ||B_k A_k|| over
  ||sum_k B_k A_k|| after the last task (mean over k).
Prints one markdown table.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path

from cramcl.engine.multi_seed import mean_std, pm
from cramcl.eval.metrics import gap_to_reference
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grid"))  # studies/grid: the grid's reader
from grid_tables import load_grid  # noqa: E402


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


def _isolated_mfn(run: Path, cache: Path, prefix: bool = False) -> float:
    """Final-row mean with each task answered by its own expert alone, or (``prefix``) by its own and every
    earlier expert at weight 1 (cached in ``cache``)."""
    if cache.exists():
        return json.loads(cache.read_text())["isolated_mfn"]
    import torch

    from cramcl.engine.session import open_finished_run
    from cramcl.eval.evaluate import predict, score_records

    torch.set_num_threads(1)
    session, _, _ = open_finished_run(run, None, log=lambda *a: None)
    method, ctx, scores = session.method, session.method.context, {}
    prepare = method.prepare_batch
    for i, task in enumerate(session.bench.tasks):
        own = method.expert_created_for(i)

        def alone(layer, x, own=own):
            w = torch.zeros(x.shape[0], layer.num_experts, device=x.device)
            w[:, slice(0, own + 1) if prefix else own] = 1.0
            return w

        def prepare_alone(batch, train, alone=alone):
            prepare(batch, train)
            ctx.route, ctx.active = alone, None

        method.prepare_batch = prepare_alone
        records = list(task.test)
        session.backbone.prepare(records)
        preds = predict(session.accelerator, session.backbone, method, records, session.cfg.train.eval_batch_size)
        scores[task.name] = score_records(task.scorer, records, preds, dict(task.scorer_params))[0]
    result = {"isolated_mfn": sum(scores.values()) / len(scores), "per_task": scores}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    return result["isolated_mfn"]


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
    from cramcl.engine.saved_config import load_saved_config

    tasks = load_stream(load_saved_config(run).data).tasks
    shares = []
    for meta, task in zip(metas, tasks[1:]):  # the buffer after task t is mixed into task t + 1
        buffered = sum(len(ids) for _, ids in meta["buffer"])
        shares.append(buffered / (buffered + len(task.train)))
    return sum(shares) / len(shares)


def _fusion_cross_share(run: Path) -> tuple[float, float, float] | None:
    """Mean over merged linears of ||B A - sum_k B_k A_k|| / ||sum_k B_k A_k|| after task 1 and after the last
    task, and after the last the mean over k of ||B_k A_k|| / ||sum_k B_k A_k|| (one task's own share)."""
    from safetensors.torch import load_file

    ckpts = sorted((run / "checkpoints").glob("task_*"), key=lambda p: int(p.name.split("_")[1]))
    if len(ckpts) < 2:
        return None
    out = []
    for ckpt in (ckpts[1], ckpts[-1]):
        meta = json.loads((ckpt / "method.json").read_text())
        if "hide" not in meta:
            return None
        tensors, ratios = load_file(str(ckpt / "method.safetensors")), []
        for key, info in meta["adapters"].items():
            if not info.get("buffer"):
                continue
            terms = [tensors[f"{key}.expert.{k}.B"].double() @ tensors[f"{key}.expert.{k}.A"].double()
                     * info["scales"][k] for k in range(len(info["ranks"]))]
            products = sum(terms)
            merged = tensors[f"{key}.buffer.B"].double() @ tensors[f"{key}.buffer.A"].double() * info["buffer_scale"]
            scale = products.norm().clamp_min(1e-12)
            ratios.append((float((merged - products).norm() / scale),
                           sum(float(t.norm() / scale) for t in terms) / len(terms)))
        out.append(tuple(sum(r[i] for r in ratios) / len(ratios) for i in range(2)))
    return out[0][0], out[1][0], out[1][1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--reference", default="mtl")
    ap.add_argument("--probe", default="", help="variants whose own-expert share to measure")
    ap.add_argument("--isolate", default="", help="variants to evaluate with each task's own expert alone")
    ap.add_argument("--prefix", default="", help="variants to evaluate without each task's later experts")
    args = ap.parse_args()
    loaded = load_grid(args.root)
    if args.reference not in loaded:
        print(f"{args.root}: no finished '{args.reference}' run to compare with", file=sys.stderr)
        return 2
    grid = {name: [r["path"] for r in runs] for name, runs in loaded.items()}
    scores = {r["path"]: r["matrix"]["scores"] for runs in loaded.values() for r in runs}
    ref_rows = [scores[r][-1] for r in grid[args.reference]]
    reference = [statistics.mean(col) for col in zip(*ref_rows)]
    print("| variant | seeds | gap to " + args.reference + " | plasticity | forgetting | own-expert share % "
          "(lowest task) | MFN, own expert alone (or 0..t) | penalty / LM loss (step 10; task mean) "
          "| replayed share of training | fusion cross terms (after task 1; last); own term / sum |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in grid.items():
        if name == args.reference:
            continue
        gaps = [gap_to_reference(scores[r], reference) for r in runs]
        cells = [pm(mean_std([g[k] for g in gaps])) for k in ("gap", "plasticity", "forgetting")]
        share = "–"
        if name in args.probe.split(","):
            probes = [_probe(r, args.root / "diagnostics" / name / f"{r.name}.json") for r in runs]
            if probes and all(probes):
                means = [statistics.mean(v["share"] for v in p.values()) for p in probes]
                lowest = min(((t, statistics.mean(p[t]["share"] for p in probes)) for t in probes[0]),
                             key=lambda kv: kv[1])
                share = f"{pm(mean_std(means))} ({lowest[0]} {lowest[1]:.1f})"
        iso = "–"
        for flag, suffix, prefix in ((args.isolate, "isolated", False), (args.prefix, "prefix", True)):
            if name in flag.split(","):
                iso = pm(mean_std([_isolated_mfn(r, args.root / "diagnostics" / name / f"{r.name}.{suffix}.json",
                                                 prefix) for r in runs])) + ("" if not prefix else " (0..t)")
        pen = [p for p in (_penalty_shares(r) for r in runs) if p]
        pen_cell = (f"{statistics.mean(p[0] for p in pen):.3g}; {statistics.mean(p[1] for p in pen):.3g}"
                    if pen else "–")
        rep = [s for s in (_replay_share(r) for r in runs) if s is not None]
        rep_cell = f"{100 * statistics.mean(rep):.1f}%" if rep else "–"
        fus = [f for f in (_fusion_cross_share(r) for r in runs) if f]
        fus_cell = ("; ".join(f"{statistics.mean(f[i] for f in fus):.2f}" for i in range(3)) if fus else "–")
        print(f"| {name} | {len(runs)} | " + " | ".join(cells)
              + f" | {share} | {iso} | {pen_cell} | {rep_cell} | {fus_cell} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
