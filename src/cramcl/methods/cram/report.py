"""CRAM's human-readable views: per-expert ranks, level-1 accuracy and level-2 weights on test records, the
report.md sections and `cramcl inspect` / `predict --explain` routing explanations."""
from __future__ import annotations

from collections import Counter

import torch

from cramcl.routing.prototypes import cosine_to_prototypes


def rank_summary(method) -> list[dict]:
    """Per expert: task, group, total rank and min/median/max rank over modules."""
    rows = []
    for k, (g, t) in enumerate(zip(method.expert_group, method.expert_task)):
        ranks = sorted(layer.ranks[k] for layer in method.layers.values())
        rows.append({"expert": k, "task": method.task_names[t] if t < len(method.task_names) else t, "group": g,
                     "rank_min": ranks[0], "rank_median": ranks[len(ranks) // 2], "rank_max": ranks[-1],
                     "params": sum(l.experts_A[k].numel() + l.experts_B[k].numel() for l in method.layers.values())})
    return rows


@torch.no_grad()
def own_expert_weights(method, tasks) -> dict[str, dict]:
    """Per seen task: the mean routing weight its own expert gets on its own test images, routed exactly as
    at evaluation (level-1 group from the text, no task id; records sent to another group give 0).

    Returns {task: {"mean": over layers and records, "per_layer": [L floats], "experts_in_group": n,
    "earlier_experts": the mean weight of the group's experts made before the task's own (reuse)}}."""
    out = {}
    for i, task in enumerate(tasks):
        if i not in method.expert_task or not len(task.test):
            continue
        k = method.expert_task.index(i)
        records = list(task.test)
        oracle = torch.full((len(records),), i) if method.cfg.routing == "oracle" else None
        weights = method.routing_weights(records, method.assign_groups(records), oracle)  # (L, B, K)
        per_layer = weights[:, :, k].float().mean(1)
        earlier = [j for j in method._group_experts(method.expert_group[k]) if j < k]
        out[task.name] = {"mean": round(float(per_layer.mean()), 4),
                          "per_layer": [round(float(v), 4) for v in per_layer],
                          "experts_in_group": len(method._group_experts(method.expert_group[k])),
                          "earlier_experts": round(float(weights[:, :, earlier].float().sum(-1).mean()), 4)}
    return out


@torch.no_grad()
def stream_analysis(method, tasks) -> dict:
    """Level-1 accuracy (share of each seen task's test records routed to the task's own group) and
    level 2's result (the weight each task's own expert gets on its own test images; logged)."""
    method.group_accuracy = {}
    for i, task in enumerate(tasks):
        if i < len(method.task_group):
            assigned = method.assign_groups(list(task.test))
            method.group_accuracy[task.name] = 100.0 * (assigned == method.task_group[i]).float().mean().item()
    method.own_weights = own_expert_weights(method, tasks)
    shared = {t: w["mean"] for t, w in method.own_weights.items() if w["experts_in_group"] > 1}
    if shared:
        method.services.log("    CRAM: own expert's weight on own test images: "
                            + ", ".join(f"{t} {w:.2f}" for t, w in shared.items()))
    if method.oracle_overruled:
        method.services.log(f"    CRAM WARNING: routing=oracle overruled the instruction's group for "
                            f"{method.oracle_overruled} evaluated record(s): level 1 sent them to a group without "
                            "their task's expert")
    return {"groups": method.groups.num_groups, "task_group": dict(zip([t.name for t in tasks], method.task_group)),
            "group_accuracy": method.group_accuracy, "own_expert_weight": method.own_weights,
            "routing_checks": method.routing_checks, "oracle_overruled_records": method.oracle_overruled,
            "experts": [dict(r, params=int(r["params"])) for r in rank_summary(method)]}


def report_sections(method) -> list[tuple[str, str]]:
    if not method.expert_group:
        return []
    lines = ["| expert | task | group | rank min / median / max over modules | parameters |", "|---|---|---|---|---|"]
    for r in rank_summary(method):
        lines.append(f"| {r['expert']} | {r['task']} | {r['group']} | {r['rank_min']} / {r['rank_median']} / "
                     f"{r['rank_max']} | {r['params']:,} |")
    groups = Counter(method.expert_group)
    intro = (f"{method.groups.num_groups} instruction group(s); experts per group: "
             + ", ".join(f"group {g}: {n}" for g, n in sorted(groups.items()))
             + f". Routing: {method.cfg.routing}, sigma {method.cfg.sigma}.")
    sections = [("CRAM: groups, experts and ranks", intro + "\n\n" + "\n".join(lines))]
    if getattr(method, "group_accuracy", None):
        acc = ["| task | group accuracy (%) |", "|---|---|"]
        acc += [f"| {t} | {a:.1f} |" for t, a in method.group_accuracy.items()]
        sections.append(("CRAM: level-1 routing accuracy on test records (no task id)", "\n".join(acc)))
    own = getattr(method, "own_weights", None)
    if own:
        rows = ["| task | experts in its group | own expert's mean weight | earlier experts' weight | per layer |",
                "|---|---|---|---|---|"]
        rows += [f"| {t} | {w['experts_in_group']} | {w['mean']:.3f} | {w['earlier_experts']:.3f} | "
                 + " ".join(f"{v:.2f}" for v in w["per_layer"]) + " |" for t, w in own.items()]
        sections.append(("CRAM: routing weight of each task's own expert on its own test images",
                         "Routed as at evaluation (group from the instruction, weights from the image; no task "
                         "id). In a group of n experts, 1/n is uniform mixing and 1 is perfect routing.\n\n"
                         + "\n".join(rows)))
    if method.routing_checks:
        rows = ["| task | group | experts | own weight | uniform | nearest own centroid | sigma | sigma for >= 0.9 "
                "| warning |", "|---|---|---|---|---|---|---|---|---|"]
        for c in method.routing_checks:
            task = method.task_names[c["task"]] if c["task"] < len(method.task_names) else c["task"]
            rows.append(f"| {task} | {c['group']} | {c['experts']} | {c['own_weight']:.3f} | {c['uniform']:.3f} | "
                        f"{100 * c['separable']:.0f}% | {_short(c['sigma'])} | {_short(c['sigma_for_0_9'])} | "
                        f"{'**near uniform: sigma too large**' if c['near_uniform'] else ''} |")
        sections.append(("CRAM: routing check at the start of each stable phase in a shared group",
                         "The new expert's centroids (at c_buf) on the task's own training images, before the "
                         "stable phase trains them.\n\n" + "\n".join(rows)))
    return sections


def _short(value):
    """A measured float as 4 significant digits (a sigma of 0.08045388658525746 reads as 0.08045)."""
    return f"{value:.4g}" if isinstance(value, float) else value


@torch.no_grad()
def describe_routing(method, batch: dict) -> str:
    records = batch["records"]
    groups = method.assign_groups(records)
    t = method.encoders.text_embeddings(records)
    cos = cosine_to_prototypes(t, method.groups.prototypes)[0]
    weights = method.routing_weights(records, groups)[:, 0]  # (L, K)
    lines = [f"record {records[0].id}: question '{records[0].question}'",
             "cosine to group prototypes: " + ", ".join(f"g{g} {c:.3f}" for g, c in enumerate(cos.tolist())),
             f"-> group {int(groups[0])}; experts of the group and their weight per layer:"]
    experts = method._group_experts(int(groups[0]))
    for k in experts:
        task = method.task_names[method.expert_task[k]]
        lines.append(f"  expert {k} ({task}): " + " ".join(f"L{l}={weights[l, k]:.3f}" for l in range(weights.shape[0])))
    return "\n".join(lines)
