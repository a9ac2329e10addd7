"""Host time of one adapted module's forward on tiny shapes (8 x 8, batch 8, one token), where arithmetic is
negligible and what is left is the Python and dispatch work per module that a GPU decoding step pays 128
times (LLaVA-7B) per token: a plain linear, our LoRA (one trainable expert), and CRAM's routed module with 8
frozen experts and per-sample weights that come back unchanged (a decoding step).

    python -m bench module_host_time [--repeats 3000]     # calls per variant, timed in round-robin blocks of 20
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
def median_us(variants: dict, x, rounds: int, block: int = 20) -> dict[str, float]:
    """Median microseconds per call of each variant, timed in blocks of ``block`` calls, the variants in turn
    (round-robin: a noisy neighbour slows all of them alike)."""
    for fn in variants.values():
        for _ in range(200):
            fn(x)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn(x)
            times[name].append((time.perf_counter() - t0) / block)
    return {name: 1e6 * statistics.median(ts) for name, ts in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(8, 1, 8)
    lora, _ = module(1, frozen=False)
    cram, ctx = module(8, frozen=True)
    weights = torch.rand(8, 8)
    ctx.route = lambda layer, inp: weights  # the same tensor every call, as CramMethod's per-layer views
    ctx.active = tuple(range(8))
    us = median_us({"linear": torch.nn.Linear(8, 8), "lora": lora, "cram_8_frozen": cram}, x, args.repeats // 20)
    print(", ".join(f"{k} {v:.1f} us" for k, v in us.items()) + f"; cram / lora {us['cram_8_frozen'] / us['lora']:.2f}")
    emit("module_host_time", {"us": {k: round(v, 1) for k, v in us.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
