"""The concatenated ragged-rank expert forward against a Python loop over experts (same math), side by side.

    python -m bench ragged_forward [--experts 8] [--dim 1024] [--batch 8] [--tokens 256]

Prints the median time of each over repeated runs and their ratio (loop / concatenated): the reason the
adapter layer runs every expert of every rank as one matmul weighted per sample.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cramcl.adapters.multi_lora import MultiLoRALinear, RoutingContext  # noqa: E402


def naive(layer: MultiLoRALinear, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = layer.base(x)
    for k in range(layer.num_experts):
        delta = (x @ layer.experts_A[k].t()) @ layer.experts_B[k].t() * layer.expert_scales[k]
        y = y + w[:, k].view(-1, 1, 1) * delta
    return y


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    ctx = RoutingContext()
    layer = MultiLoRALinear(torch.nn.Linear(args.dim, args.dim), "layers.0.q_proj", 0, ctx).eval()
    for k in range(args.experts):
        r = 4 + k % 6  # ragged ranks 4..9
        layer.add_expert(A=torch.randn(r, args.dim) * 0.02, B=torch.randn(args.dim, r) * 0.02)
    x = torch.randn(args.batch, args.tokens, args.dim)
    w = torch.softmax(torch.randn(args.batch, args.experts), -1)
    ctx.route = lambda _layer, _x: w
    with torch.no_grad():
        assert torch.allclose(layer(x), naive(layer, x, w), atol=1e-4)
        for _ in range(3):
            layer(x), naive(layer, x, w)
        t_cat = timed(lambda: layer(x), args.repeats)
        t_loop = timed(lambda: naive(layer, x, w), args.repeats)
    print(f"experts={args.experts} dim={args.dim} batch={args.batch} tokens={args.tokens} "
          f"threads={torch.get_num_threads()}")
    print(f"concatenated: {t_cat * 1e3:.2f} ms   loop: {t_loop * 1e3:.2f} ms   loop/concatenated: {t_loop / t_cat:.2f}x")


if __name__ == "__main__":
    main()
