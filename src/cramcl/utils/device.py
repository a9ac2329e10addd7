"""Moving small per-batch host tensors (routing embeddings, index lists) to the GPU without stopping the host."""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device) -> Tensor:
    """``t`` on ``device``. A CPU tensor bound for a GPU is pinned and copied asynchronously: a plain ``.to()``
    from pageable memory synchronises the stream, so the host would wait for the GPU to finish its queue
    (every step) before it could queue the forward. Elsewhere a plain ``.to()`` (a no-op on the same device)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
