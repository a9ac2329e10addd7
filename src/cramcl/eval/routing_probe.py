"""How often a method's evaluation routing picks each task's own expert (no task id given).

For methods that add one expert per task (``method.expert_created_for``), every adapted linear's routing
weights are recorded during one evaluation forward of each task's test records (the prompt: the first call
per linear after ``prepare_batch``; decoding steps are not counted). A sample routed per sample ((B, K)
weights) counts once per linear, a sample routed per token ((B, T, K)) counts each real prompt token.
A unit (sample or token) is a hit when the task's own expert gets more weight than any other (a tie, as
under uniform weights, is not a hit); units whose weights are all zero (a linear where the method does not
route, e.g. HiDe's merged lower layers) are left out.

This is the measurement behind "the router confuses tasks": a share near 100% means routing is not what
separates a method from its upper bound.
"""
from __future__ import annotations

import torch
from torch import Tensor


def own_expert_hits(weights: Tensor, own: int, valid: Tensor | None = None) -> tuple[int, int]:
    """(hits, units) for one linear's routing weights.

    weights: (B, K) per-sample or (B, T, K) per-token weights; own: the expert index that should win;
    valid: (B, T) bool of real tokens (per-token weights only; None: every token). A unit counts when its
    weights are not all zero; it is a hit when ``own``'s weight is larger than every other expert's."""
    w = weights.detach().float()
    routed = w.abs().amax(-1) > 0  # (B,) or (B, T)
    if w.dim() == 3 and valid is not None and tuple(valid.shape) == tuple(w.shape[:2]):
        routed = routed & valid.to(routed.device).bool()
    others = torch.cat([w[..., :own], w[..., own + 1:]], dim=-1)
    top_other = others.amax(-1) if others.shape[-1] else torch.full_like(w[..., 0], float("-inf"))
    hits = (w[..., own] > top_other) & routed  # a tie (e.g. uniform weights) is not a hit
    return int(hits.sum()), int(routed.sum())


@torch.no_grad()
def own_expert_share(backbone, method, tasks, batch_size: int = 32, device=None) -> dict[str, dict]:
    """Per seen task with an own expert: {"share": % of units routed to it (all linears pooled),
    "min_linear" / "max_linear": the lowest / highest share of one linear, "units": units counted}.

    tasks: the stream's tasks in order (each with ``.name`` and ``.test`` records); a task is measured when
    ``method.expert_created_for(i)`` names its expert. The method's route function is wrapped for the duration
    and restored afterwards."""
    ctx = method.context
    route = ctx.route
    if route is None or method.uses_task_id_at_eval:  # oracle bounds are told the expert
        return {}
    model = backbone.model
    model.eval()
    out = {}
    for i, task in enumerate(tasks):
        own = method.expert_created_for(i)
        records = list(task.test)
        if own is None or not records:
            continue
        per_linear: dict[str, list[int]] = {}
        seen: set[str] = set()
        valid = None

        def probe(layer, x):
            w = route(layer, x)
            if w is not None and layer.key not in seen:  # the prompt's call; decode steps come later
                seen.add(layer.key)
                h, n = own_expert_hits(w, own, valid)
                acc = per_linear.setdefault(layer.key, [0, 0])
                acc[0] += h
                acc[1] += n
            return w

        ctx.route = probe
        try:
            backbone.prepare(records)
            for start in range(0, len(records), batch_size):
                batch = backbone.collate(records[start:start + batch_size], train=False)
                if device is not None:
                    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                mask = batch.get("attention_mask")
                valid = mask.bool() if torch.is_tensor(mask) else None
                seen.clear()
                method.prepare_batch(batch, train=False)
                ctx.route = probe  # prepare_batch may set the route again
                backbone.generate(model, batch)
        finally:
            ctx.route = route
        counted = [(h, n) for h, n in per_linear.values() if n]
        if not counted:
            continue
        hits, units = sum(h for h, _ in counted), sum(n for _, n in counted)
        shares = [100.0 * h / n for h, n in counted]
        out[task.name] = {"share": round(100.0 * hits / units, 2), "min_linear": round(min(shares), 2),
                          "max_linear": round(max(shares), 2), "units": units}
    return out
