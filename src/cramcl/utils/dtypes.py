"""The dtype routing and consolidation math runs in."""
from __future__ import annotations

import torch
from torch import Tensor


def at_least_float32(*ts: Tensor) -> torch.dtype:
    """float32, or a wider dtype when an input has one (float64 stays float64): bf16 distances of wide
    vectors and bf16 SVDs lose too much precision for a softmax or a rank threshold over them."""
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
