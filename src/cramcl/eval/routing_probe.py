"""How often a method's evaluation routing picks each task's own expert (no task id given).

For methods that add one expert per task (``method.expert_created_for``), every adapted linear's routing
weights are recorded during one evaluation pass over the tasks' test records, in seeded batches that mix tasks
as the default evaluation does (the prompt: the first call per linear after ``prepare_batch``; decoding steps
are not counted). A sample routed per sample ((B, K)
weights) counts once per linear, a sample routed per token ((B, T, K)) counts each real prompt token.
A unit (sample or token) is a hit when the task's own expert gets more weight than any other (a tie, as
under uniform weights, is not a hit); units whose weights are all zero (a linear where the method does not
route, e.g. HiDe's merged lower layers) are left out.

This is the measurement behind "the router confuses tasks": a share near 100% means routing is not what
separates a method from its upper bound.
"""
from __future__ import annotations

import random

import torch
from torch import Tensor


def own_expert_hits(weights: Tensor, own: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per sample (hits, units) of one linear's routing weights.

    weights: (B, K) per-sample or (B, T, K) per-token weights; own: (B,) long, the expert that should win for
    each sample; valid: (B, T) bool of real tokens (per-token weights only; None: every token). A unit counts
    when its weights are not all zero; it is a hit when its own expert's weight is larger than every other
    expert's. Returns two (B,) long tensors."""
    w = weights.detach().float()
    own = own.to(w.device).long()
    if w.dim() == 2:
        w = w.unsqueeze(1)  # (B, 1, K): one unit per sample
    routed = w.abs().amax(-1) > 0  # (B, T)
    if weights.dim() == 3 and valid is not None and tuple(valid.shape) == tuple(w.shape[:2]):
        routed = routed & valid.to(routed.device).bool()
    index = own.view(-1, 1, 1).expand(-1, w.shape[1], 1)
    mine = w.gather(-1, index).squeeze(-1)  # (B, T)
    others = w.scatter(-1, index, float("-inf")).amax(-1) if w.shape[-1] > 1 else torch.full_like(mine, float("-inf"))
    hits = (mine > others) & routed  # a tie (e.g. uniform weights) is not a hit
    return hits.sum(1), routed.sum(1)


@torch.no_grad()
def own_expert_share(backbone, method, tasks, batch_size: int = 32, device=None, seed: int = 0) -> dict[str, dict]:
    """Per seen task with an own expert: {"share": % of units routed to it (all linears pooled),
    "min_linear" / "max_linear": the lowest / highest share of one linear, "units": units counted}.

    tasks: the stream's tasks in order (each with ``.name`` and ``.test`` records); a task is measured when
    ``method.expert_created_for(i)`` names its expert. The records of all measured tasks go through in one
    seeded shuffle, batches mixing tasks, as the default evaluation (``train.eval_batches: mixed``) feeds
    them (a method that routes a batch by its mean is measured as it is evaluated). The method's route
    function is wrapped for the duration and restored afterwards."""
    ctx = method.context
    route = ctx.route
    if route is None or method.uses_task_id_at_eval:  # oracle bounds are told the expert
        return {}
    items = [(i, r) for i, task in enumerate(tasks) if method.expert_created_for(i) is not None
             for r in task.test]
    random.Random(seed).shuffle(items)
    own_of = {i: method.expert_created_for(i) for i in {i for i, _ in items}}
    model = backbone.model
    model.eval()
    counts: dict[tuple[int, str], list[int]] = {}  # (task, linear) -> [hits, units]
    seen: set[str] = set()
    state = {}

    def probe(layer, x):
        w = route(layer, x)
        if w is not None and layer.key not in seen:  # the prompt's call; decode steps come later
            seen.add(layer.key)
            hits, units = own_expert_hits(w, state["own"], state["valid"])
            for t, h, n in zip(state["tasks"], hits.tolist(), units.tolist()):
                acc = counts.setdefault((t, layer.key), [0, 0])
                acc[0] += h
                acc[1] += n
        return w

    try:
        backbone.prepare([r for _, r in items])
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = backbone.collate([r for _, r in chunk], train=False)
            if device is not None:
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            mask = batch.get("attention_mask")
            state.update(tasks=[t for t, _ in chunk], own=torch.tensor([own_of[t] for t, _ in chunk]),
                         valid=mask.bool() if torch.is_tensor(mask) else None)
            seen.clear()
            method.prepare_batch(batch, train=False)
            ctx.route = probe  # set after prepare_batch, which may set the route itself
            backbone.generate(model, batch)
    finally:
        ctx.route = route
    out = {}
    for i, task in enumerate(tasks):
        counted = [(h, n) for (t, _), (h, n) in counts.items() if t == i and n]
        if not counted:
            continue
        hits, units = sum(h for h, _ in counted), sum(n for _, n in counted)
        shares = [100.0 * h / n for h, n in counted]
        out[task.name] = {"share": round(100.0 * hits / units, 2), "min_linear": round(min(shares), 2),
                          "max_linear": round(max(shares), 2), "units": units}
    return out
