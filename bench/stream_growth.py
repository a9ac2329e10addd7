"""Per-sample adapter cost as the stream grows: CRAM's layer with only the routed group's experts running,
against every expert running (cramcl 0.1's forward) and against one plain LoRA of the same active rank.

    python bench/stream_growth.py [--dim 1024] [--tokens 64] [--batch 8] [--groups 10] [--repeats 7]

A stream of E tasks in G groups (E in 1, 4, 10, 30; tasks assigned to groups round-robin, rank 8 each) on
one adapted linear. The batch's samples all belong to one group (the group of the last task), so the routed
forward runs that group's experts (at most ceil(E / G)); "all experts" runs every one with zero weight
outside the group, as the 0.1 forward did. Forward + backward, the newest expert trainable (CRAM's stable
phase), everything else frozen. Prints the median time per configuration, the ratios measured side by side
in this process, and one JSON line. Wall-clock numbers on a shared machine are noisy: read the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cramcl.adapters.multi_lora import MultiLoRALinear, RoutingContext  # noqa: E402

RANK = 8


def _layer(dim: int, experts: int, groups: int) -> tuple[MultiLoRALinear, RoutingContext, list[int]]:
    ctx = RoutingContext()
    layer = MultiLoRALinear(torch.nn.Linear(dim, dim), "layers.0.q_proj", 0, ctx)
    group_of = [k % groups for k in range(experts)]
    for k in range(experts):
        layer.add_expert(A=torch.randn(RANK, dim) / dim ** 0.5, B=torch.randn(dim, RANK) / RANK, scale=1.0)
        layer.set_expert_trainable(k, k == experts - 1)
    return layer, ctx, group_of


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (and the frozen-factor cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.dim)
    rows = []
    for experts in (1, 4, 10, 30):
        layer, ctx, group_of = _layer(args.dim, experts, args.groups)
        group = group_of[-1]
        members = tuple(k for k, g in enumerate(group_of) if g == group)
        weights = torch.zeros(args.batch, experts)
        weights[:, list(members)] = 1.0 / len(members)
        ctx.route = lambda _l, _x: weights

        def step(active):
            ctx.active = active
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()

        routed = _time(lambda: step(members), args.repeats)
        every = _time(lambda: step(None), args.repeats)
        lora, lctx, _ = _layer(args.dim, 1, 1)
        lora.experts_A[0].data = torch.randn(RANK * len(members), args.dim) / args.dim ** 0.5
        lora.experts_B[0].data = torch.randn(args.dim, RANK * len(members)) / RANK
        lora.set_expert_trainable(0, True)

        def lora_step():
            lora.zero_grad(set_to_none=True)
            lora(x).sum().backward()

        plain = _time(lora_step, args.repeats)
        rows.append({"experts": experts, "group_experts": len(members), "routed_ms": round(1e3 * routed, 3),
                     "all_experts_ms": round(1e3 * every, 3), "one_lora_same_rank_ms": round(1e3 * plain, 3),
                     "all_over_routed": round(every / routed, 3), "routed_over_lora": round(routed / plain, 3)})
    print(f"adapter forward+backward, d={args.dim}, batch {args.batch} x {args.tokens} tokens, {args.groups} groups, "
          f"rank {RANK} per expert ({torch.get_num_threads()} threads)")
    print(f"{'experts':>7} {'in group':>8} {'routed ms':>10} {'all ms':>8} {'LoRA ms':>8} {'all/routed':>10} "
          f"{'routed/LoRA':>11}")
    for r in rows:
        print(f"{r['experts']:>7} {r['group_experts']:>8} {r['routed_ms']:>10.2f} {r['all_experts_ms']:>8.2f} "
              f"{r['one_lora_same_rank_ms']:>8.2f} {r['all_over_routed']:>10.2f} {r['routed_over_lora']:>11.2f}")
    print(json.dumps({"bench": "stream_growth", "dim": args.dim, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
