"""CRAM's saved state (groups, prototypes, centroids, expert bookkeeping) and its parameter accounting.
Checkpoint keys: ``cram.groups.*``, ``cram.centroids.<k>``, ``cram.expert_variance.<k>`` (tensors) and the
``cram`` entry of the method's JSON (docs/run-directory.md)."""
from __future__ import annotations

import torch
from torch import Tensor


def save_cram_state(method, tensors: dict[str, Tensor], meta: dict) -> tuple[dict[str, Tensor], dict]:
    groups = method.groups.state_dict()
    for k, v in groups.items():
        if torch.is_tensor(v):
            tensors[f"cram.groups.{k}"] = v.detach().cpu().contiguous()
    for k, c in enumerate(method.centroids.centroids):
        tensors[f"cram.centroids.{k}"] = c.detach().cpu().contiguous()
    for k, v in enumerate(method.expert_variance):
        tensors[f"cram.expert_variance.{k}"] = v.detach().cpu().contiguous()
    meta["cram"] = {"groups": {k: v for k, v in groups.items() if not torch.is_tensor(v)},
                    "expert_group": method.expert_group, "expert_task": method.expert_task,
                    "task_group": method.task_group, "consolidation": method.consolidation_log,
                    "routing_checks": method.routing_checks, "oracle_overruled": method.oracle_overruled}
    return tensors, meta


def load_cram_state(method, tensors: dict[str, Tensor], meta: dict) -> None:
    info = meta["cram"]
    groups = dict(info["groups"])
    groups.update({k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith("cram.groups.")})
    method.groups.load_state_dict(groups)
    method.centroids.centroids = torch.nn.ParameterList()
    for k in range(len(info["expert_group"])):
        c = tensors[f"cram.centroids.{k}"]
        method.centroids.centroids.append(torch.nn.Parameter(c.clone().to(method.device), requires_grad=False))
    method.expert_variance = [tensors[f"cram.expert_variance.{k}"].to(method.device)
                              for k in range(len(info["expert_group"])) if f"cram.expert_variance.{k}" in tensors]
    method.expert_group = list(info["expert_group"])
    method.expert_task = list(info["expert_task"])
    method.task_group = list(info["task_group"])
    method.consolidation_log = list(info["consolidation"])
    method.routing_checks = list(info.get("routing_checks", []))  # absent in checkpoints of cramcl <= 0.1
    method.oracle_overruled = int(info.get("oracle_overruled", 0))  # absent in checkpoints of cramcl <= 0.2


def param_counts(method) -> dict[str, int]:
    """Stored: every expert, centroid and group prototype; active per sample: the largest group's experts
    (a sample runs the experts of its own group only)."""
    layers = method.layers.values()
    stored = sum(l.experts_A[k].numel() + l.experts_B[k].numel() for l in layers for k in range(l.num_experts))
    stored += sum(p.numel() for p in method.centroids.parameters())
    stored += sum(v.numel() for v in method.expert_variance)  # the standardized metric's per-expert variances
    stored += sum(p.numel() for p in method.groups.state_dict().values() if torch.is_tensor(p))
    per_group = {}
    for k, g in enumerate(method.expert_group):
        per_group[g] = per_group.get(g, 0) + sum(l.experts_A[k].numel() + l.experts_B[k].numel() for l in layers)
    return {"trainable": 0, "stored": stored, "active_per_sample": max(per_group.values(), default=0)}
