"""Sharded training: the frozen base split across the processes with torch's FSDP2 (``fully_shard``).

Launched with ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (``distributed_type: FSDP``,
``fsdp_version: 2``). cramcl takes the FSDP request over instead of passing it to Accelerate's FSDP plugin:

* Accelerate 1.15 ignores its FSDP plugin without a GPU (its state selects FSDP only for MULTI_GPU/NPU/XPU/...;
  on CPU the run silently becomes DDP, or one process when ``cpu=False``), so the plugin could never run here;
* the plugin shards the *whole* model once, at the first ``prepare``; cramcl's adapters change at every phase
  (a buffer per task, a new expert after warm-up, the buffer dropped), and FSDP2 keeps references to the
  parameters it saw then.

So: every module that owns frozen floating parameters (the base linears inside the adapted modules, embeddings,
norms, the untargeted linears, the vision tower) becomes its own FSDP2 unit at session start; the adapters,
CRAM's centroids and everything a method adds later stay ordinary tensors, replicated, their gradients averaged
over the processes by the trainer (Accelerate's ``reduce``). The frozen base (>99% of a LoRA model's
parameters) is what sharding saves; LoRA optimizer state is megabytes, which ZeRO-2 would shard.

Outside training the base is gathered (``unshard``, no reshard after forward): evaluation gives each process
its own slice of records and greedy decoding stops at different steps on different processes, so a forward
must not be a collective there. Training steps are the same on every process (global batches split evenly),
so inside ``train_task`` the base is sharded and each unit all-gathers around its forward and backward.
Checkpoints hold the method's state only (adapters, centroids, prototypes), which is never sharded: nothing of
the base is written. A parameter shared by two modules (tied embeddings) stays replicated.
"""
from __future__ import annotations

import os

from torch import nn


def fsdp_requested() -> bool:
    """``accelerate launch`` with a ``distributed_type: FSDP`` config sets ACCELERATE_USE_FSDP=true."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def take_over_fsdp_request() -> bool:
    """Read and clear the launcher's FSDP request before the Accelerator is built, so Accelerate forms a plain
    data-parallel group (it would otherwise wrap the whole model, adapters included, on a GPU)."""
    wanted = fsdp_requested()
    if wanted:
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            from cramcl.errors import BadInputError
            raise BadInputError(f"accelerate config: fsdp_version {version}; cramcl shards with FSDP2 "
                                "(fsdp_version: 2, as configs/accelerate/fsdp.yaml)")
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    return wanted


class BaseShards:
    """The FSDP2 units of a model's frozen base; :meth:`sharded` for training, :meth:`gathered` otherwise."""

    def __init__(self, units: list[nn.Module], world: int):
        self.units, self.world = units, world
        self.mode = "sharded"

    def gathered(self) -> None:
        """Every process holds the whole base; forwards are local (no collective)."""
        if self.mode == "gathered":
            return
        for unit in self.units:
            unit.set_reshard_after_forward(False)
            unit.unshard()
        self.mode = "gathered"

    def sharded(self) -> None:
        """Each process keeps 1/world of the base; each unit all-gathers around its forward and backward."""
        if self.mode == "sharded":
            return
        for unit in self.units:
            unit.reshard()
            unit.set_reshard_after_forward(True)
        self.mode = "sharded"

    def describe(self) -> dict:
        return {"backend": "fsdp2-frozen-base", "units": len(self.units), "world_size": self.world}


def shard_frozen_base(model: nn.Module, accelerator) -> BaseShards:
    """Make every module owning frozen floating parameters (not an adapted module's own adapters, not a
    parameter shared with another module) an FSDP2 unit over all processes; returns them gathered."""
    from torch.distributed.fsdp import fully_shard

    from cramcl.adapters.multi_lora import MultiLoRALinear

    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    units = []
    for module in model.modules():
        if isinstance(module, MultiLoRALinear):
            continue
        own = list(module.parameters(recurse=False))
        if own and all(not p.requires_grad and p.is_floating_point() and owners[id(p)] == 1 for p in own):
            units.append(module)
    for module in units:
        fully_shard(module, reshard_after_forward=True)
    shards = BaseShards(units, accelerator.num_processes)
    shards.gathered()
    return shards
