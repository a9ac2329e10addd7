"""Side-by-side timing for the bench scripts: variants run round-robin in one process (each repeat times every
variant once, in turn), so a noisy neighbour slows all of them alike and the ratios hold; medians, not means.
On a GPU every timed call is bracketed by a device synchronisation."""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def side_by_side(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                 sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each variant, measured round-robin."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def count_ops(fn: Callable[[], object]) -> int:
    """Operators fn() dispatches that compute (views and other metadata-only ops left out): on a GPU each is a
    kernel launch, so where a step is bound by host work (decoding) this count is its cost, exact and noise-free."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket not in _METADATA_OPS:
                count[0] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return count[0]


# no data moves (views already say so through is_view; _unsafe_view is matmul's reshape of its result)
_METADATA_OPS = {torch.ops.aten.detach, torch.ops.aten._unsafe_view}


def machine() -> dict:
    import platform

    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def emit(bench: str, payload: dict, json_path: str | None = None) -> None:
    """One JSON line on stdout (the machine-readable result), also written to ``json_path`` if given."""
    line = json.dumps({"bench": bench, **payload, "machine": machine()})
    print(line)
    if json_path:
        Path(json_path).write_text(line + "\n")
