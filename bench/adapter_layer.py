"""One adapted linear, forward + backward, as the stream grows: routing's cost per sample against
plain LoRA, against a loop over experts, and against the same group in a stream of only its tasks.

    python -m bench adapter_layer [--dims 256,4096] [--experts 1,4,10,30] [--groups 10] [--batch 8]
                                  [--tokens 128] [--repeats 15] [--device cuda --dtype bfloat16] [--json F]

A stream of E tasks in G groups (tasks assigned round-robin, rank 8 each), the newest expert trainable (CRAM's
stable phase), the others frozen. The batch's samples all belong to the newest task's group, so CRAM's layer
runs that group's experts only (``routed``, at most ceil(E / G) of them). Against, side by side in one process:
  all     every expert runs with zero weight outside the group (cramcl 0.1's forward);
  naive   a Python loop over every expert, one matmul pair each, weighted per sample;
  lora    one plain LoRA whose rank is the group's total (same active rank), trainable;
  alone   CRAM's layer holding only the group's experts (the same group, in a stream of only those tasks).
Ratios: routed/lora (the price of routing at equal active rank), naive/routed and all/routed (what routing and
concatenation save), routed/alone (per-sample cost must not grow with other groups' experts; target
<= 1.10 at 30 tasks). Read the ratios, not the milliseconds: this machine is shared.
"""
from __future__ import annotations

import argparse
import sys

import torch

from _timing import emit, side_by_side, synchronizer

from cramcl.adapters.multi_lora import MultiLoRALinear, RoutingContext  # noqa: E402

RANK = 8


def build_layer(dim: int, experts: int, groups: int, device, dtype, keep: set[int] | None = None):
    """CRAM's layer with ``experts`` experts in ``groups`` groups (only those in ``keep``, if given)."""
    ctx = RoutingContext()
    base = torch.nn.Linear(dim, dim, bias=False).to(device=device, dtype=dtype)
    layer = MultiLoRALinear(base, "layers.0.q_proj", 0, ctx)
    group_of, kept = [], []
    g = torch.Generator().manual_seed(0)
    for k in range(experts):
        if keep is not None and k not in keep:
            continue
        A, B = torch.randn(RANK, dim, generator=g) / dim ** 0.5, torch.randn(dim, RANK, generator=g) / RANK
        layer.add_expert(A=A.to(device), B=B.to(device), scale=1.0)
        group_of.append(k % groups)
        kept.append(k)
    for i, k in enumerate(kept):
        layer.set_expert_trainable(i, k == experts - 1)
    return layer, ctx, group_of


def naive_forward(layer: MultiLoRALinear, x, weights):
    y = layer.base(x)
    for k in range(layer.num_experts):
        A, B = layer.experts_A[k].to(x.dtype), layer.experts_B[k].to(x.dtype)
        y = y + weights[:, k].view(-1, 1, 1).to(x.dtype) * layer.expert_scales[k] * ((x @ A.t()) @ B.t())
    return y


def measure(dim: int, experts: int, groups: int, args, device, dtype) -> dict:
    x = torch.randn(args.batch, args.tokens, dim, device=device, dtype=dtype)
    layer, ctx, group_of = build_layer(dim, experts, groups, device, dtype)
    members = tuple(k for k, g in enumerate(group_of) if g == group_of[-1])
    weights = torch.zeros(args.batch, experts, device=device)
    weights[:, list(members)] = 1.0 / len(members)
    ctx.route = lambda _l, _x: weights
    alone, actx, _ = build_layer(dim, experts, groups, device, dtype, keep={k for k in range(experts)
                                                                            if k % groups == (experts - 1) % groups})
    w_alone = torch.full((args.batch, alone.num_experts), 1.0 / alone.num_experts, device=device)
    actx.route = lambda _l, _x: w_alone
    lora, lctx, _ = build_layer(dim, 1, 1, device, dtype)
    with torch.no_grad():
        lora.experts_A[0].data = torch.randn(RANK * len(members), dim, device=device) / dim ** 0.5
        lora.experts_B[0].data = torch.randn(dim, RANK * len(members), device=device) / RANK
    lora.set_expert_trainable(0, True)

    def step(module, active=None, ctx_=ctx, fn=None):
        def run():
            ctx_.active = active
            module.zero_grad(set_to_none=True)
            out = fn(module, x, weights) if fn else module(x)
            out.float().sum().backward()
        return run

    times = side_by_side({"routed": step(layer, members), "all": step(layer, None), "naive": step(layer, fn=naive_forward),
                          "lora": step(lora, ctx_=lctx), "alone": step(alone, ctx_=actx)},
                         args.repeats, warmup=2, sync=synchronizer(device))
    ms = {k: round(1e3 * v, 3) for k, v in times.items()}
    return {"dim": dim, "experts": experts, "group_experts": len(members), **{f"{k}_ms": v for k, v in ms.items()},
            "routed_over_lora": round(times["routed"] / times["lora"], 3),
            "naive_over_routed": round(times["naive"] / times["routed"], 3),
            "all_over_routed": round(times["all"] / times["routed"], 3),
            "routed_over_alone": round(times["routed"] / times["alone"], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", default="256,4096")
    ap.add_argument("--experts", default="1,4,10,30")
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    rows = [measure(int(d), int(e), args.groups, args, args.device, dtype)
            for d in args.dims.split(",") for e in args.experts.split(",")]
    print(f"adapter forward+backward, batch {args.batch} x {args.tokens} tokens, {args.groups} groups, rank {RANK} "
          f"per expert, {args.device} {args.dtype}, {torch.get_num_threads()} threads; median of {args.repeats}")
    head = ["dim", "experts", "group_experts", "routed_ms", "lora_ms", "routed_over_lora", "naive_over_routed",
            "all_over_routed", "routed_over_alone"]
    print(" ".join(f"{h:>17}" for h in head))
    for r in rows:
        print(" ".join(f"{r[h]:>17}" for h in head))
    at30 = [r["routed_over_alone"] for r in rows if r["experts"] == max(int(e) for e in args.experts.split(","))]
    emit("adapter_layer", {"device": args.device, "dtype": args.dtype, "batch": args.batch, "tokens": args.tokens,
                           "groups": args.groups, "rows": rows, "routed_over_alone_target_met": all(v <= 1.10 for v in at30)},
         args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
