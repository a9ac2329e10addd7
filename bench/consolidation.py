"""CRAM's consolidation (the SVD step at the end of warm-up) for every adapted module of a model, against the
training time of the task it ends (target: <= 1% of the task's training time).

    python -m bench consolidation [--dim 4096] [--modules 128] [--history 3] [--repeats 3] [--device cpu]
                                  [--task-seconds 3600] [--json F]

Runs ``consolidate_buffer`` (the library's function) on ``--modules`` random rank-48 buffers of width ``--dim``
with ``--history`` earlier experts in the group, as the end of a warm-up does for LLaVA-1.5-7B's 128 q/k/v/o
projections, and reports the median total time and its share of ``--task-seconds`` (a task's training time:
about an hour per UCIT task on one H100, docs/real-models.md; pass your own).
"""
from __future__ import annotations

import argparse
import sys

import torch

from _timing import emit, side_by_side, synchronizer

from cramcl.methods.cram.consolidation import consolidate_buffer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--modules", type=int, default=128)
    ap.add_argument("--history", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--task-seconds", type=float, default=3600.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    d, R = args.dim, 48
    buffers = [(torch.randn(d, R, generator=g) * 0.02, torch.randn(R, d, generator=g) / d ** 0.5)
               for _ in range(args.modules)]
    history = [torch.linalg.qr(torch.randn(d, 8, generator=g)).Q.t().contiguous() for _ in range(args.history)]
    buffers = [(B.to(args.device), A.to(args.device)) for B, A in buffers]
    history = [h.to(args.device) for h in history]

    def consolidate_all():
        for B, A in buffers:
            consolidate_buffer(B, A, 2.0, history, tau_alloc=0.0, tau_novel=0.9, r_min=4, r_max=9)

    seconds = side_by_side({"all": consolidate_all}, args.repeats, warmup=1, sync=synchronizer(args.device))["all"]
    share = seconds / args.task_seconds
    print(f"consolidation of {args.modules} modules (d={d}, buffer rank {R}, {args.history} earlier experts) on "
          f"{args.device}: {seconds:.2f} s = {100 * share:.3f}% of a {args.task_seconds:.0f} s task "
          f"({torch.get_num_threads()} threads)")
    emit("consolidation", {"dim": d, "modules": args.modules, "history": args.history, "device": args.device,
                           "seconds": round(seconds, 3), "task_seconds": args.task_seconds,
                           "share_of_task": round(share, 5), "target_met": share <= 0.01}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
