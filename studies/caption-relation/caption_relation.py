"""Does a run's `caption` task get the spatial relation right? The caption score averages n-gram overlaps, so
a caption with the relation wrong ("a red circle left of a blue square" for "... above ...") still scores ~55:
this reads the relation word itself.

    python studies/caption-relation/caption_relation.py runs/grid/mtl runs/grid/cram [--bench DIR] [--task caption]

For each run directory (one run, or seeds under it as `studies/grid/run_grid.py` lays them out): on the test records
whose reference relates two shapes, the share of final predictions with the reference's relation ("left of" or
"above"); a prediction with neither counts as wrong. Chance is about 50. With ``--bench`` (the built-in
stream's folder), it also splits the records by whether the image fits both relations (the second shape both
right of and below the first, from the two shapes' pixel centroids): such an image cannot tell the relation.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RELATIONS = ("left of", "above")


def relation(caption: str) -> str | None:
    """The relation a caption states, or None (one shape, or a caption that names none)."""
    found = [r for r in RELATIONS if f" {r} " in f" {caption} "]
    return found[0] if len(found) == 1 else None


def fits_both(image_path: Path, caption: str) -> bool:
    """Whether the image's second-named shape lies both right of and below its first (pixel centroids of the
    two shapes' palette colours): then "left of" and "above" both describe it."""
    import numpy as np
    from PIL import Image

    from cramcl.data.builtin._common import PALETTE

    words = caption.split()
    colours = [words[1], words[words.index("a", 2) + 1]]
    pixels = np.asarray(Image.open(image_path).convert("RGB")).astype(int)
    centres = []
    for name in colours:
        ys, xs = np.nonzero(np.abs(pixels - np.array(PALETTE[name])).sum(-1) < 30)
        centres.append((xs.mean(), ys.mean()))
    return centres[1][0] > centres[0][0] and centres[1][1] > centres[0][1]


def final_predictions(run: Path, task: str) -> Path:
    last = len(json.loads((run / "results" / "matrix.json").read_text())["tasks"]) - 1
    return run / "results" / "predictions" / f"after_{last}" / f"{task}.jsonl"


def seed_scores(run: Path, task: str, ambiguous: set[str] | None) -> dict[str, float]:
    """{"all": %, and with ``ambiguous`` ids: "fits one": %, "fits both": %} over two-shape test records."""
    hits: dict[str, list[bool]] = {"all": [], "fits one": [], "fits both": []}
    for line in final_predictions(run, task).read_text().splitlines():
        rec = json.loads(line)
        want = relation(rec["reference"])
        if want is None:
            continue
        ok = relation(rec["prediction"]) == want
        hits["all"].append(ok)
        if ambiguous is not None:
            hits["fits both" if rec["id"] in ambiguous else "fits one"].append(ok)
    return {k: 100 * sum(v) / len(v) for k, v in hits.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--bench", type=Path, help="the built-in stream's folder, to split by what the image fits")
    parser.add_argument("--task", default="caption")
    args = parser.parse_args()
    ambiguous = None
    if args.bench:
        records = [json.loads(x) for x in (args.bench / args.task / "test.jsonl").read_text().splitlines()]
        two = [r for r in records if relation(r["answer"])]
        ambiguous = {r["id"] for r in two if fits_both(args.bench / "images" / r["image"], r["answer"])}
        print(f"{len(two)} two-shape test records, {len(ambiguous)} of them fit both relations")
    from cramcl.engine.compare import run_finished

    for run in args.runs:
        seeds = [s for s in sorted(p for p in run.glob("seed_*") if p.is_dir()) or [run] if run_finished(s)]
        if not seeds:
            print(f"{run}: no finished run")
            continue
        per_seed = [seed_scores(s, args.task, ambiguous) for s in seeds]
        cells = []
        for key in per_seed[0]:
            values = [s[key] for s in per_seed]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{key} {statistics.mean(values):.1f}{spread}")
        print(f"{run}: relation right, {len(seeds)} seed(s): " + "; ".join(cells))


if __name__ == "__main__":
    main()
