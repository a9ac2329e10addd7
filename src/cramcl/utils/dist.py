"""Cross-process reductions through Accelerate (no-ops in a single process)."""
from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import broadcast, gather, reduce
from torch import Tensor


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over every process (Accelerate's state; a copy in one process)."""
    state = PartialState()
    if state.num_processes == 1:
        return t.clone()
    return reduce(t.to(state.device), reduction="sum").to(t.device)


def broadcast_from_main(t: Tensor) -> Tensor:
    """Make every process hold the main process's ``t`` (e.g. consolidation results)."""
    state = PartialState()
    if state.num_processes == 1:
        return t
    return broadcast(t.to(state.device).contiguous(), from_process=0).to(t.device)


def check_identical_across_processes(tensors: dict[str, Tensor], what: str, atol: float = 1e-6) -> int:
    """Raise if any process holds different values in ``tensors`` (e.g. experts, centroids, prototypes
    after a task); returns the number of processes compared. A cheap fingerprint per tensor is gathered."""
    state = PartialState()
    if state.num_processes == 1:
        return 1
    keys = sorted(tensors)
    finger = torch.stack([torch.stack([tensors[k].double().sum(), tensors[k].double().abs().sum()]) for k in keys])
    every = gather(finger.to(state.device).unsqueeze(0)).cpu()  # (world, n, 2)
    spread = (every - every[0:1]).abs().amax(dim=(0, 2))
    bad = [keys[i] for i in (spread > atol * (1 + finger.abs()[:, 1])).nonzero().flatten().tolist()]
    if bad:
        raise RuntimeError(f"{what}: processes disagree on {len(bad)} tensors, e.g. {bad[:3]}")
    return state.num_processes
