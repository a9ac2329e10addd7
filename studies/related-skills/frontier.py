"""The parameter-quality frontier of a grid: per variant, stored adapter parameters against MFN (mean +- sample
std over its finished seeds), as a markdown table and a plot in which one method's size variants (oracle-lora at
ranks 1-16) are joined into a line.

    python studies/related-skills/frontier.py runs/related --plot docs/img/frontier-related.png \\
        --title "related-skills stream"

``--point NAME=MFN,STD,PARAMS`` adds a variant measured elsewhere (e.g. a docs/results.md row), marked as such.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from cramcl.report.compare_plots import plot_mfn_vs_params


def grid_rows(root: Path) -> list[dict]:
    rows = []
    for variant in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = []
        for seed_dir in sorted(variant.glob("seed_*")):
            try:
                metrics = json.loads((seed_dir / "results" / "metrics.json").read_text())
            except (OSError, ValueError):
                continue
            if metrics.get("complete"):
                runs.append(metrics)
        if not runs:
            continue
        mfn = [m["MFN"] for m in runs]
        params = [m["params"]["stored_total"] for m in runs]
        rows.append({"method": variant.name.replace("+", ":"), "MFN": statistics.mean(mfn),
                     "std": {"MFN": statistics.stdev(mfn) if len(mfn) > 1 else 0.0},
                     "BWT": statistics.mean(m["BWT"] for m in runs), "stored_params": round(statistics.mean(params)),
                     "params_range": (min(params), max(params)), "seeds": len(runs)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--title", default="")
    ap.add_argument("--reference", default="oracle-lora", help="the row parameters are given relative to")
    ap.add_argument("--point", action="append", default=[], help="NAME=MFN,STD,PARAMS measured elsewhere")
    args = ap.parse_args()
    rows = grid_rows(args.root)
    for point in args.point:
        name, values = point.split("=", 1)
        mfn, std, params = (float(v) for v in values.split(","))
        rows.append({"method": name, "MFN": mfn, "std": {"MFN": std}, "BWT": None, "stored_params": int(params),
                     "params_range": (int(params), int(params)), "seeds": "elsewhere"})
    reference = next((r["stored_params"] for r in rows if r["method"] == args.reference), None)
    rows.sort(key=lambda r: r["stored_params"])
    print(f"| variant | seeds | MFN | BWT | stored parameters | x {args.reference} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["params_range"]
        params = f"{r['stored_params']:,}" + ("" if lo == hi else f" ({lo:,}-{hi:,})")
        ratio = f"{r['stored_params'] / reference:.2f}" if reference else "–"
        bwt = "–" if r["BWT"] is None else f"{r['BWT']:.1f}"
        print(f"| {r['method']} | {r['seeds']} | {r['MFN']:.1f} +- {r['std']['MFN']:.1f} | {bwt} | {params} | {ratio} |")
    if args.plot:
        plot_mfn_vs_params(rows, args.plot, title=f"Parameter-quality frontier: {args.title}" if args.title
                           else "Parameter-quality frontier")
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
