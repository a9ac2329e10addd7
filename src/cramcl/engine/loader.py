"""The data path of training and evaluation: batches built in DataLoader worker processes when building them is
heavy (a real MLLM's image decoding and processor), pinned and prefetched so that the device never waits on
the host; built in the main process when it is cheap (the embedded backbone reads precomputed features).

``train.loader_workers``: ``auto`` (0 for a backbone whose batches are cheap; else one worker per spare CPU of
this process's share, at most 8) or a number (0 = build batches in the main process).
"""
from __future__ import annotations

import functools
import os

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cramcl.engine.run_lock import drop_inherited_locks

MAX_AUTO_WORKERS = 8


class RecordList(Dataset):
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


class FixedBatches(Sampler):
    """Precomputed batches of indices; ``batch_size`` lets Accelerate split each global batch across processes."""

    def __init__(self, batches: list[list[int]], batch_size: int):
        self.batches = batches
        self.batch_size = batch_size

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(setting: str | int, backbone, local_processes: int = 1, cpus: int | None = None) -> int:
    """Worker processes per DataLoader for ``train.loader_workers`` (``auto`` or a count)."""
    if setting != "auto":
        return int(setting)
    if getattr(backbone, "collator", None) is None:  # batches come from precomputed features: no work to move
        return 0
    share = (cpus or available_cpus()) // max(1, local_processes)
    return max(0, min(MAX_AUTO_WORKERS, share - 1))  # one CPU of the share stays with the training process


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode and resize images; threads per worker would oversubscribe the CPUs
    drop_inherited_locks()  # a worker outliving a killed run must not keep its run directory locked


def make_loader(records, batches: list[list[int]], batch_size: int, backbone, *, train: bool, workers: int,
                pin: bool) -> DataLoader:
    """A DataLoader yielding ``backbone``'s collated batches of ``records`` in the order of ``batches``.

    With ``workers`` > 0 the backbone's picklable ``collator`` runs in the workers (the model never travels);
    ``pin`` pins the batch tensors so that their copy to the GPU can overlap compute."""
    collator = getattr(backbone, "collator", None)
    if workers > 0 and collator is not None:
        collate = functools.partial(collator, train=train)
        extra = {"num_workers": workers, "prefetch_factor": 2, "worker_init_fn": _worker_init}
    else:
        collate = functools.partial(backbone.collate, train=train)
        extra = {}
    return DataLoader(RecordList(records), batch_sampler=FixedBatches(batches, batch_size), collate_fn=collate,
                      pin_memory=pin, **extra)
