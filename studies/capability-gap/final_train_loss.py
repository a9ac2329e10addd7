"""Each task's training loss at the end of its training, from a finished grid's logs: how well a variant's
adapters fit the task they were trained on (before any later task, so no forgetting in it).

    python studies/capability-gap/final_train_loss.py runs/abl/cram runs/abl/cram+tau_novel=0 [--last 3]

For every variant directory (seeds under it, the layout of `studies/grid/run_grid.py`) and every task: the mean of the
last ``--last`` logged values of ``train/<task index>/loss`` (the loss the optimizer minimised, the
orthogonality penalty included, which is <0.4% of it for CRAM on the built-in stream), mean +- std over seeds.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path


def final_losses(run: Path, last: int) -> dict[int, float]:
    """task index -> mean of its last ``last`` logged training losses (one seed's run directory)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in sorted(glob.glob(str(run / "logs" / "cramcl" / "events.out.tfevents.*"))):
        events = EventAccumulator(f, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags().get("scalars", []):
            parts = tag.split("/")
            if len(parts) == 3 and parts[0] == "train" and parts[1].isdigit() and parts[2] == "loss":
                values = [e.value for e in events.Scalars(tag)]
                out[int(parts[1])] = statistics.mean(values[-last:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", type=Path)
    parser.add_argument("--last", type=int, default=3)
    args = parser.parse_args()
    tasks = None
    rows = []
    for variant in args.variants:
        seeds = sorted(s for s in variant.glob("seed_*") if s.is_dir())
        per_seed = [final_losses(s, args.last) for s in seeds]
        if tasks is None:
            tasks = json.loads((seeds[0] / "results" / "matrix.json").read_text())["tasks"]
        cells = []
        for index in range(len(tasks)):
            values = [p[index] for p in per_seed if index in p]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}" if values else "-")
        rows.append(f"| {variant.parent.name}/{variant.name} | {len(per_seed)} | " + " | ".join(cells) + " |")
    print("| variant | seeds | " + " | ".join(tasks) + " |")
    print("|---|---|" + "---|" * len(tasks))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
