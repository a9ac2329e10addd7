"""``routing=oracle`` (analysis only): the true task id picks each record's expert, at both levels. Pure
functions over CRAM's bookkeeping lists (``expert_task[k]``: expert k's task, ``expert_group[k]``: its group);
docs/cram.md, "Ablations"."""
from __future__ import annotations

import torch
from torch import Tensor


def per_record_tasks(task_index, n: int) -> list[int]:
    """``task_index`` (one task for the batch, or a (B,) tensor / list of per-record tasks) as n ints."""
    ids = torch.as_tensor(task_index).reshape(-1).cpu()
    return (ids.expand(n) if ids.numel() == 1 else ids).tolist()


def oracle_positions(expert_task: list[int], experts: list[int], task_index, rows: Tensor) -> Tensor:
    """(B_g,) position within ``experts`` (one group's expert ids) of each row's own task's expert; -1 where
    the group holds none, or no task id was given (the row is then routed by its image)."""
    if task_index is None:
        return torch.full((rows.numel(),), -1, dtype=torch.long)
    ids = per_record_tasks(task_index, int(rows.max()) + 1)
    own_task = [expert_task[k] for k in experts]
    return torch.tensor([own_task.index(ids[r]) if ids[r] in own_task else -1 for r in rows.tolist()],
                        dtype=torch.long)


def oracle_groups(groups: Tensor, task_index, expert_task: list[int], expert_group: list[int]) -> tuple[Tensor, int]:
    """(B,) groups with each record moved to the group of its own task's expert, and how many records the
    instruction had sent elsewhere (an oracle run reports them: they hide a level-1 error). A record whose task
    has no expert keeps its instruction's group."""
    if task_index is None:
        return groups, 0
    out, overruled = groups.clone(), 0
    for i, t in enumerate(per_record_tasks(task_index, len(groups))):
        if t in expert_task and int(out[i]) != expert_group[expert_task.index(t)]:
            out[i] = expert_group[expert_task.index(t)]
            overruled += 1
    return out, overruled
