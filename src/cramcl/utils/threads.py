"""LAPACK calls on one CPU thread: the last bits of a QR or an SVD depend on how many threads computed it, and
CRAM's and SAME's ranks are thresholds on singular values, so a last-bit difference can become another rank
(docs/run-directory.md, "Reproducibility")."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def lapack_on_one_thread(fn: F) -> F:
    """Run ``fn`` with torch (and MKL / OpenMP under it) on one CPU thread, then restore the thread count, so
    its result is the same whatever ``torch.get_num_threads()`` the process runs with. GPU work is unaffected."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        if before == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper  # type: ignore[return-value]
