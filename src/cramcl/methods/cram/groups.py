"""CRAM's level 1: instruction groups ("format isolation"), docs/cram.md "Level 1: instruction groups".

A group g has a prototype mu_g, the running mean of the instruction-text embeddings t of the batches
of every task that joined it. When a task starts, :meth:`InstructionGroups.decide` picks a group (or
creates one) from the task's text embedding; the decision is then fixed for the task, while
:meth:`InstructionGroups.update` keeps folding the task's batches into the prototype. At inference
:meth:`InstructionGroups.assign` takes the argmax cosine, with no thresholds.

Shapes: D = text-embedding size, G = number of groups, B / N = batch sizes.
Prototypes are stored as float32 on the CPU; counts as int64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cramcl.routing.prototypes import cosine_to_prototypes


class InstructionGroups:
    """Prototypes of the instruction groups, the task-start rule, and inference assignment.

    State: ``prototypes`` (G, D) float32, ``counts`` (G,) int64 = number of embeddings averaged into
    each prototype so far (the weight of the running mean).
    """

    def __init__(self, join_single_threshold: float = 0.8, margin_theta: float = 0.1,
                 max_groups: int = 5):
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        self.join_single_threshold = float(join_single_threshold)
        self.margin_theta = float(margin_theta)
        self.max_groups = int(max_groups)
        self.prototypes = torch.zeros(0, 0, dtype=torch.float32)  # (G, D); D unknown until the first group
        self.counts = torch.zeros(0, dtype=torch.int64)  # (G,)

    @property
    def num_groups(self) -> int:
        return int(self.prototypes.shape[0])

    @property
    def dim(self) -> int | None:
        """D, or None before the first group exists."""
        return int(self.prototypes.shape[1]) if self.num_groups else None

    # ----------------------------------------------------------------------------- task start
    def decide(self, t_task: Tensor) -> tuple[int, bool]:
        """Pick the group of a new task from its text embedding; returns ``(group, created)``.

        t_task: (D,) — the task's text embedding (e.g. the mean over its first N samples).

        Rule (docs/cram.md, "Level 1: instruction groups"), with cosines s to the existing prototypes:
          * no group: create;
          * one group: join it if s > join_single_threshold, else create;
          * two or more, s1 >= s2 the two best: join the best if s1 - s2 > margin_theta, else create.
        Whenever the rule says "create" but ``max_groups`` groups exist already, join the best instead
        (the paper states the cap for the >= 2 case; we apply it to the 1-group case too, which only
        matters when max_groups == 1).

        Side effects: none when joining. When creating, a group is appended whose prototype is
        ``t_task`` (as float32) with count 0 — a placeholder: the first :meth:`update` on it replaces
        the prototype by the mean of what it is given, because a count of 0 gives the old value no
        weight. The caller then folds the task's batches in with :meth:`update` (also for joins).
        """
        t = t_task.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        if self.num_groups and t.shape[0] != self.dim:
            raise ValueError(f"t_task has size {t.shape[0]}, prototypes have size {self.dim}")
        if self.num_groups == 0:
            return self._create(t), True
        sims = cosine_to_prototypes(t[None], self.prototypes)[0]  # (G,)
        best = int(torch.argmax(sims))
        if self.num_groups == 1:
            join = bool(sims[0] > self.join_single_threshold)
        else:
            top2 = torch.topk(sims, 2).values
            join = bool(top2[0] - top2[1] > self.margin_theta)
        if join or self.num_groups >= self.max_groups:
            return best, False
        return self._create(t), True

    def _create(self, t: Tensor) -> int:
        """Append a group with prototype t: (D,) and count 0; returns its index."""
        protos = t[None].clone() if self.num_groups == 0 else torch.cat([self.prototypes, t[None]], 0)
        self.prototypes = protos
        self.counts = torch.cat([self.counts, torch.zeros(1, dtype=torch.int64)])
        return self.num_groups - 1

    # ----------------------------------------------------------------------------- running mean
    def update(self, group: int, embeddings: Tensor) -> None:
        """Fold a batch into the group's running mean.

        embeddings: (N, D) (a single (D,) vector is taken as N = 1). Equivalent to
        ``update_from_sums(group, embeddings.sum(0), N)``.
        """
        e = embeddings.detach()
        if e.dim() == 1:
            e = e[None]
        # sum in float64 so that sums from different processes add up to the same value
        self.update_from_sums(group, e.to(torch.float64).sum(0), int(e.shape[0]))

    def update_from_sums(self, group: int, sum_vec: Tensor, count: int) -> None:
        """Fold ``count`` embeddings whose sum is ``sum_vec`` into the group's running mean.

        sum_vec: (D,). For several processes, all-reduce (sum_vec, count) by summation first; the
        result equals :meth:`update` on all their samples at once.
        mu <- (n * mu + sum_vec) / (n + count);  n <- n + count.
        """
        if not 0 <= group < self.num_groups:
            raise IndexError(f"group {group} does not exist ({self.num_groups} groups)")
        count = int(count)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count == 0:
            return
        s = sum_vec.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        if s.shape[0] != self.dim:
            raise ValueError(f"sum_vec has size {s.shape[0]}, prototypes have size {self.dim}")
        n = int(self.counts[group])
        mu = self.prototypes[group].to(torch.float64)
        new = (n * mu + s) / (n + count)
        self.prototypes[group] = new.to(torch.float32)
        self.counts[group] = n + count

    # ----------------------------------------------------------------------------- inference
    def assign(self, t: Tensor) -> Tensor:
        """Group of every input: argmax cosine to the prototypes, no thresholds.

        t: (B, D) (or (D,) -> (1,)) -> LongTensor (B,) on t's device.
        """
        if self.num_groups == 0:
            raise RuntimeError("assign() called before any instruction group exists")
        if t.dim() == 1:
            t = t[None]
        sims = cosine_to_prototypes(t.detach(), self.prototypes)  # (B, G)
        return torch.argmax(sims, dim=-1)

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Tensors and numbers; :meth:`load_state_dict` restores them exactly."""
        return {
            "prototypes": self.prototypes.clone(),
            "counts": self.counts.clone(),
            "join_single_threshold": self.join_single_threshold,
            "margin_theta": self.margin_theta,
            "max_groups": self.max_groups,
        }

    def load_state_dict(self, state: dict) -> None:
        protos = torch.as_tensor(state["prototypes"]).to(device="cpu", dtype=torch.float32).clone()
        counts = torch.as_tensor(state["counts"]).to(device="cpu", dtype=torch.int64).clone()
        if protos.dim() != 2 or counts.shape != (protos.shape[0],):
            raise ValueError(f"bad group state: prototypes {tuple(protos.shape)}, "
                             f"counts {tuple(counts.shape)}")
        self.prototypes, self.counts = protos, counts
        self.join_single_threshold = float(state.get("join_single_threshold", self.join_single_threshold))
        self.margin_theta = float(state.get("margin_theta", self.margin_theta))
        self.max_groups = int(state.get("max_groups", self.max_groups))

    def __repr__(self) -> str:
        return (f"InstructionGroups(groups={self.num_groups}, dim={self.dim}, "
                f"counts={self.counts.tolist()}, max_groups={self.max_groups})")
