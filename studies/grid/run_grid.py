"""Run a grid of (method variant, seed) runs with a few workers, in the layout `cramcl compare --seeds` uses,
then write the comparison of every variant whose seeds all finished.

    python studies/grid/run_grid.py --out runs/grid --seeds 0,1,2 --workers 2 \\
        --methods cram,mtl,oracle-lora,replay,lora-ft,cram:routing=oracle

Each run is `cramcl run --method NAME --profile P --out OUT/<variant>/seed_<s> seed=<s> method.k=v ...` in its
own process with `OMP_NUM_THREADS=1` (on a 2-core machine two single-threaded runs finish more work per
hour than one run on both cores). Finished runs are skipped, interrupted ones resumed, so the script can be
stopped and started again. Jobs are ordered seed-major within each variant, variants in the order given.
`cramcl compare` with the same --methods/--seeds/--out then reuses every run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _job(spec: str, seed: int, out: Path, profile: str, extra: list[str]) -> tuple[str, int, float, int]:
    from cramcl.engine.compare import parse_variant, run_finished, variant_dir

    name, settings = parse_variant(spec)
    run = out / variant_dir(spec) / f"seed_{seed}"
    if run_finished(run):
        return spec, seed, 0.0, 0
    resume = (run / "config.yaml").exists()
    cmd = [sys.executable, "-m", "cramcl", "run", "--out", str(run)]
    cmd += ["--resume"] if resume else ["--method", name, "--profile", profile, f"seed={seed}", *settings, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run.parent / f"seed_{seed}.log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return spec, seed, time.perf_counter() - t0, rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="KEY=VALUE settings for every run")
    args = ap.parse_args()
    out = Path(args.out)
    specs = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(spec, seed) for spec in specs for seed in seeds]
    with ThreadPoolExecutor(args.workers) as pool:
        for spec, seed, seconds, rc in pool.map(lambda j: _job(*j, out, args.profile, args.extra), jobs):
            print(f"{spec} seed {seed}: {'skipped (finished)' if seconds == 0 else f'{seconds:.0f} s'}"
                  + ("" if rc == 0 else f"  FAILED rc={rc}"), flush=True)
    from cramcl.engine.compare import run_finished, variant_dir, write_comparison

    done = [s for s in specs if all(run_finished(out / variant_dir(s) / f"seed_{k}") for k in seeds)]
    if done:
        write_comparison(out, done, seeds)
        print(f"comparison of {len(done)} variants: {out}/compare.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
