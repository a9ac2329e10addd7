"""Host time of one adapted module's forward on tiny shapes (8 x 8, batch 8, one token), where arithmetic is
negligible and what is left is the Python and dispatch work per module that a GPU decoding step pays 128
times (LLaVA-7B) per token: a plain linear, our LoRA (one trainable expert), and CRAM's routed module with 8
frozen experts and per-sample weights that come back unchanged (a decoding step).

    python -m bench module_host_time [--repeats 3000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _timing import emit

from cramcl.adapters.multi_lora import MultiLoRALinear, RoutingContext  # noqa: E402


def module(experts: int, frozen: bool):
    ctx = RoutingContext()
    layer = MultiLoRALinear(torch.nn.Linear(8, 8), "layers.0.q_proj", 0, ctx)
    for k in range(experts):
        layer.add_expert(A=torch.randn(4, 8), B=torch.randn(8, 4))
        layer.set_expert_trainable(k, not frozen)
    return layer, ctx


@torch.no_grad()
def median_us(fn, x, repeats: int) -> float:
    for _ in range(200):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(8, 1, 8)
    lora, _ = module(1, frozen=False)
    cram, ctx = module(8, frozen=True)
    weights = torch.rand(8, 8)
    ctx.route = lambda layer, inp: weights
    ctx.active = tuple(range(8))
    us = {"linear": median_us(torch.nn.Linear(8, 8), x, args.repeats), "lora": median_us(lora, x, args.repeats),
          "cram_8_frozen": median_us(cram, x, args.repeats)}
    print(", ".join(f"{k} {v:.1f} us" for k, v in us.items()) + f"; cram / lora {us['cram_8_frozen'] / us['lora']:.2f}")
    emit("module_host_time", {"us": {k: round(v, 1) for k, v in us.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
