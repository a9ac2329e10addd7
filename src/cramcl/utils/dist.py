"""Cross-process reductions through Accelerate (no-ops in a single process)."""
from __future__ import annotations

import torch
from torch import Tensor


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over every process (Accelerate's state; a copy in one process)."""
    from accelerate import PartialState
    from accelerate.utils import reduce

    state = PartialState()
    if state.num_processes == 1:
        return t.clone()
    return reduce(t.to(state.device), reduction="sum").to(t.device)


def broadcast_from_main(t: Tensor) -> Tensor:
    """Make every process hold the main process's ``t`` (e.g. consolidation results)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast

    state = PartialState()
    if state.num_processes == 1:
        return t
    return broadcast(t.to(state.device).contiguous(), from_process=0).to(t.device)
