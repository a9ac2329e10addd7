"""Level-2 routing of a finished CRAM run, measured: where each expert's centroids sit relative to each
task's image embeddings, and the weight every expert gets on each task's own test images, per layer.

    python studies/routing-embedding/routing_diag.py runs/pair-cram [--after-task T]

Prints, for the first group's tasks: the squared distance between the tasks' training-image means (mu)
and the mean squared distance of a test sample to its own mu (the scale sigma must be read against);
per expert and layer ||c - mu_own|| (how far training moved the centroid from where c_buf put it, up to the
warm-up's sampling) and ||c - mu_task||^2 for every task; per task and layer the mean weight of every
expert on that task's test images and the share of images whose own expert gets > 0.5.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cramcl.engine.session import open_finished_run


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--after-task", type=int, default=None)
    a = ap.parse_args()
    session, _, _ = open_finished_run(a.run, a.after_task, log=lambda *x: None)
    m, tasks = session.method, session.bench.tasks
    names = [t.name for t in tasks][:len(m.task_group)]
    q_tr, q_te = {}, {}
    for task in tasks[:len(names)]:
        session.backbone.prepare(list(task.train) + list(task.test))
        q_tr[task.name] = m.encoders.image_embeddings(list(task.train)).cpu()
        q_te[task.name] = m.encoders.image_embeddings(list(task.test)).cpu()
    mu = {n: q_tr[n].mean(0) for n in names}
    print(f"sigma {m.cfg.sigma} ({m.cfg.sigma_units}), embedding dim {mu[names[0]].numel()}, "
          f"expert -> group {m.expert_group}")
    for i, a_ in enumerate(names):
        for b_ in names[i + 1:]:
            print(f"||mu_{a_} - mu_{b_}||^2 = {float((mu[a_] - mu[b_]).pow(2).sum()):.3f}")
    print("mean ||q - mu_own||^2 on test: " + ", ".join(
        f"{n} {float((q_te[n] - mu[n]).pow(2).sum(1).mean()):.3f}" for n in names))
    C = m.centroids.stacked(list(range(len(m.expert_group)))).cpu()  # (L, K, D)
    L, K, _ = C.shape
    for k in range(K):
        own = names[m.expert_task[k]]
        print(f"expert {k} ({own}, group {m.expert_group[k]}): ||c - mu_own|| per layer "
              + " ".join(f"{(C[l, k] - mu[own]).norm().item():.3f}" for l in range(L)))
        for n in names:
            print(f"    ||c - mu_{n}||^2: " + " ".join(f"{(C[l, k] - mu[n]).pow(2).sum().item():.3f}" for l in range(L)))
    for i, n in enumerate(names):
        recs = list(tasks[i].test)
        groups = m.assign_groups(recs)
        w = m.routing_weights(recs, groups, i).cpu()  # (L, B, K)
        own = m.expert_task.index(i)
        print(f"test '{n}' (group accuracy {float((groups == m.task_group[i]).float().mean()):.2f}): "
              "mean weight per expert, per layer")
        for l in range(L):
            print(f"   L{l}: " + " ".join(f"e{k} {w[l, :, k].mean():.3f}" for k in range(K))
                  + f"   share own > 0.5: {float((w[l, :, own] > 0.5).float().mean()):.2f}")


if __name__ == "__main__":
    main()
