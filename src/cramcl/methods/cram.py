"""CRAM: Centroid-Routing and Adaptive MoE (arXiv 2606.02502), as specified in shared/spec/CRAM.md.

Per task: level-1 decides the task's instruction group from the mean text embedding of its first samples;
a buffer LoRA trains alone during warm-up while c_buf averages the task's image embeddings; at the end of
warm-up every adapted module consolidates the buffer into a new expert sized by its SVD and the capability
gap against the group's earlier experts; in the stable phase only the new expert and its centroids train,
with the orthogonality penalty against the group's history. At evaluation: group = argmax cosine of the
text embedding to the prototypes, then per-layer RBF weights over that group's experts, per sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cramcl.encoders import RoutingEncoderConfig, RoutingEncoders
from cramcl.methods.base import Method, Phase, Services, freeze_all_experts
from cramcl.methods.cram_math import consolidate_buffer, gated_orthogonality_penalty, orth_history_basis
from cramcl.methods.cram_routing import SIGMA_UNITS, CentroidBank, group_layer_weights, scatter_group_weights
from cramcl.routing.centroid import CentroidAccumulator
from cramcl.routing.groups import InstructionGroups
from cramcl.errors import BadInputError
from cramcl.methods.cram_state import describe_routing, load_cram_state, rank_summary, report_sections, save_cram_state
from cramcl.utils.dist import all_reduce_sum, broadcast_from_main

ROUTING_MODES = ("per_sample", "batch_mean", "uniform", "oracle")


@dataclass
class CramConfig(RoutingEncoderConfig):
    buffer_rank: int = 48
    buffer_alpha: float = 96.0  # scale alpha / R = 2
    dropout: float = 0.05
    r_min: int = 4
    r_max: int = 9  # 9 on UCIT, 10 on TriGap
    tau_alloc: float = 0.08
    tau_novel: float = 0.99
    fixed_rank: int | None = None  # ablation: every expert gets exactly this rank (no tau_alloc / tau_novel)
    warmup_fraction: float = 0.05
    no_warmup: bool = False  # ablation: the buffer joins the pool as the task's expert (no consolidation)
    sigma: float = 2.0
    sigma_units: str = "absolute"  # absolute (the paper's) | gap: sigma relative to the group's closest centroid pair
    routing: str = "per_sample"  # per_sample | batch_mean (the authors') | uniform | oracle (analysis only)
    grouping: bool = True  # False: one pool (no level 1)
    join_threshold: float = 0.8
    theta: float = 0.1
    max_groups: int = 5  # 5 on UCIT, 10 on TriGap
    group_init_samples: int = 32  # the task's first N samples decide its group
    lambda_orth: float = 1.0


class Cram(Method):
    name = "cram"

    def __init__(self, config: CramConfig):
        super().__init__(config)
        if config.routing not in ROUTING_MODES:
            raise BadInputError(f"method.routing: '{config.routing}' is not one of {', '.join(ROUTING_MODES)}")
        if config.sigma_units not in SIGMA_UNITS:
            raise BadInputError(f"method.sigma_units: '{config.sigma_units}' is not one of {', '.join(SIGMA_UNITS)}")
        self.uses_task_id_at_eval = config.routing == "oracle"
        self.groups = InstructionGroups(config.join_threshold, config.theta, config.max_groups if config.grouping else 1)
        self.centroids = CentroidBank()
        self.expert_group: list[int] = []  # expert k -> group
        self.expert_task: list[int] = []  # expert k -> task index (for oracle routing and reports)
        self.task_group: list[int] = []
        self.consolidation_log: list[dict] = []  # per task: its group, rank per module, history size
        self._c_buf = CentroidAccumulator()
        self._phase = "eval"
        self._q_hist: dict[str, Tensor] = {}
        self._pooled: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, services: Services) -> None:
        super().setup(services)
        self.encoders = RoutingEncoders.from_config(services.backbone, self.cfg)
        self.num_layers = services.backbone.num_layers
        self.context.route = lambda layer, x: self._weights[layer.layer_index] if self._weights is not None else None
        self._weights: Tensor | None = None

    @property
    def device(self):
        return next(iter(self.layers.values())).base.weight.device

    # ------------------------------------------------------------------ task lifecycle
    def before_task(self, task_index: int, task) -> None:
        super().before_task(task_index, task)
        first = list(task.train[: self.cfg.group_init_samples])
        # every process reads the same first samples: the decision is identical without communication
        t_mean = self.encoders.text_embeddings(first).mean(0)
        group, created = self.groups.decide(t_mean) if self.cfg.grouping else self._single_pool(t_mean)
        self.task_group.append(group)
        self.services.log(f"    CRAM: task '{task.name}' -> group {group} ({'new' if created else 'joined'})")
        self._c_buf.reset()
        if self.cfg.no_warmup:
            # the buffer joins the pool directly as the task's expert (rank R, scale alpha/R)
            q0 = self.encoders.image_embeddings(first).mean(0)
            for layer in self.layers.values():
                layer.add_expert(self.cfg.buffer_rank, alpha=self.cfg.buffer_alpha)
            self._register_expert(group, task_index, q0)
        else:
            for layer in self.layers.values():
                layer.init_buffer(self.cfg.buffer_rank, self.cfg.buffer_alpha)

    def _single_pool(self, t_mean: Tensor) -> tuple[int, bool]:
        if self.groups.num_groups == 0:
            return self.groups.decide(t_mean)
        return 0, False

    def _register_expert(self, group: int, task_index: int, centroid_init: Tensor) -> None:
        self.centroids.add(centroid_init.to(self.device), self.num_layers)
        self.expert_group.append(group)
        self.expert_task.append(task_index)

    def phases(self, task_index: int, total_steps: int) -> list[Phase]:
        if self.cfg.no_warmup:
            return [Phase("stable", total_steps)]
        warm = min(total_steps - 1, max(1, math.ceil(self.cfg.warmup_fraction * total_steps)))
        return [Phase("warmup", warm), Phase("stable", total_steps - warm)]

    def begin_phase(self, phase: Phase) -> None:
        self._phase = phase.name
        freeze_all_experts(self.layers)
        for p in self.centroids.parameters():
            p.requires_grad_(False)
        if phase.name == "warmup":
            self.context.buffer_weight = 1.0
            return
        self.context.buffer_weight = None
        new = len(self.expert_group) - 1
        for layer in self.layers.values():
            layer.set_expert_trainable(new, True)
        self.centroids.centroids[new].requires_grad_(True)
        self._q_hist = self._history_bases(new)
        self.context.capture = self._capture if self._q_hist and self.cfg.lambda_orth > 0 else None

    def end_phase(self, phase: Phase) -> None:
        if phase.name == "warmup":
            self._consolidate()
        self.context.capture = None
        self._pooled = {}

    def after_task(self, task_index: int) -> None:
        freeze_all_experts(self.layers)
        for p in self.centroids.parameters():
            p.requires_grad_(False)
        for layer in self.layers.values():
            layer.drop_buffer()
        self._phase = "eval"
        self.current_task = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return super().trainable_parameters() + [p for p in self.centroids.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ consolidation
    def _group_experts(self, group: int, exclude: int | None = None) -> list[int]:
        return [k for k, g in enumerate(self.expert_group) if g == group and k != exclude]

    @torch.no_grad()
    def _consolidate(self) -> None:
        sums, count = self._c_buf.sums()
        count_t = all_reduce_sum(torch.tensor([float(count)]))
        c_buf = (all_reduce_sum(sums.to(self.device)) / count_t.to(self.device).clamp(min=1)).float()
        group, task = self.task_group[-1], len(self.task_group) - 1
        history = self._group_experts(group)
        ranks = {}
        for key, layer in self.layers.items():
            result = consolidate_buffer(
                layer.buffer_B.detach().float(), layer.buffer_A.detach().float(), layer.buffer_scale,
                [layer.experts_A[k].detach().float() for k in history], tau_alloc=self.cfg.tau_alloc,
                tau_novel=self.cfg.tau_novel, r_min=self.cfg.r_min, r_max=self.cfg.r_max, fixed_rank=self.cfg.fixed_rank)
            # the SVD runs on every process; rank 0's result is the one all keep (bit-identical experts)
            layer.add_expert(A=broadcast_from_main(result.A.to(self.device)),
                             B=broadcast_from_main(result.B.to(self.device)), scale=1.0)
            layer.drop_buffer()  # reset: the next task's before_task makes a fresh one (A random, B = 0)
            ranks[key] = result.rank
        self._register_expert(group, task, c_buf)
        self.consolidation_log.append({"task": task, "group": group, "ranks": ranks,
                                       "history_experts": len(history)})

    def _history_bases(self, new: int) -> dict[str, Tensor]:
        history = self._group_experts(self.expert_group[new], exclude=new)
        if not history:
            return {}
        return {key: orth_history_basis([layer.experts_A[k].detach().float() for k in history],
                                        [layer.experts_B[k].detach().float() for k in history],
                                        layer.in_features, layer.out_features).to(self.device)
                for key, layer in self.layers.items()}

    # ------------------------------------------------------------------ routing
    def prepare_batch(self, batch: dict, train: bool) -> None:
        records = batch["records"]
        if train and self._phase == "warmup":
            q = self.encoders.image_embeddings(records).to(self.device)
            self._c_buf.add(q.cpu())
            self._update_prototype(records)
            self._weights = torch.zeros(self.num_layers, len(records), len(self.expert_group), device=self.device)
            return
        if train:
            self._update_prototype(records)
            groups = torch.full((len(records),), self.task_group[-1], dtype=torch.long)
        else:
            groups = self.assign_groups(records)
        self._image_mask = batch.get("image_mask")
        oracle_task = batch.get("task_index") if self.uses_task_id_at_eval or train else None
        self._weights = self.routing_weights(records, groups, self.current_task if train else oracle_task)

    def assign_groups(self, records) -> Tensor:
        """(B,) group of each record from its instruction text alone (argmax cosine; no task id)."""
        if self.groups.num_groups == 0:
            return torch.zeros(len(records), dtype=torch.long)
        return self.groups.assign(self.encoders.text_embeddings(records))

    def routing_weights(self, records, groups: Tensor, task_index: int | None = None) -> Tensor:
        """(L, B, K) expert weights of a batch given each sample's group."""
        q = self.encoders.image_embeddings(records).to(self.device)
        per_group = {}
        for g in groups.unique().tolist():
            experts = self._group_experts(g)
            if not experts:
                continue
            rows = (groups == g).nonzero(as_tuple=True)[0]
            oracle = None
            if self.cfg.routing == "oracle":
                own = [experts.index(self.expert_task.index(task_index))] if task_index in self.expert_task else [0]
                oracle = torch.tensor(own * rows.numel(), device=self.device)
            weights = group_layer_weights(q[rows], self.centroids.stacked(experts), self.cfg.sigma,
                                          self.cfg.routing, oracle, self.cfg.sigma_units)
            per_group[g] = (rows, weights, experts)
        return scatter_group_weights(per_group, len(records), len(self.expert_group), self.num_layers)

    def _update_prototype(self, records) -> None:
        t = self.encoders.text_embeddings(records)
        total = all_reduce_sum(t.sum(0))
        count = int(all_reduce_sum(torch.tensor([float(len(records))])).item())
        self.groups.update_from_sums(self.task_group[-1], total, count)

    # ------------------------------------------------------------------ loss
    def _capture(self, layer, x: Tensor) -> None:
        mask = self._image_mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        # pooled input over image tokens; detached: the penalty shapes the new expert, not the hidden states
        self._pooled[layer.key] = ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).detach()

    def compute_loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        self._pooled = {}
        loss, aux = super().compute_loss(model, batch)
        if self._phase != "stable" or not self._q_hist or self.cfg.lambda_orth == 0:
            return loss, aux
        new = len(self.expert_group) - 1
        history = self._group_experts(self.expert_group[new], exclude=new)
        penalties = []
        for key, layer in self.layers.items():
            h = self._pooled[key].to(layer.experts_A[new].dtype)  # (B, d_in)
            z = layer.expert_scales[new] * (h @ layer.experts_A[new].t()) @ layer.experts_B[new].t()  # (B, d_out)
            gate = self._weights[layer.layer_index][:, history].sum(-1)  # (B,) routing mass on earlier experts
            penalties.append(gated_orthogonality_penalty(z, self._q_hist[key], gate))
        orth = self.cfg.lambda_orth * torch.stack(penalties).mean()
        aux["orth"] = orth.detach()
        return loss + orth, aux

    # ------------------------------------------------------------------ state, accounting, reports
    def state(self):
        return save_cram_state(self, *super().state())

    def load_state(self, tensors, meta) -> None:
        super().load_state(tensors, meta)
        load_cram_state(self, tensors, meta)

    def param_counts(self) -> dict[str, int]:
        stored = sum(l.experts_A[k].numel() + l.experts_B[k].numel() for l in self.layers.values()
                     for k in range(l.num_experts)) + sum(p.numel() for p in self.centroids.parameters())
        stored += sum(p.numel() for p in self.groups.state_dict().values() if torch.is_tensor(p))
        # a sample runs the experts of its own group: the largest group bounds it
        per_group = {}
        for k, g in enumerate(self.expert_group):
            per_group[g] = per_group.get(g, 0) + sum(l.experts_A[k].numel() + l.experts_B[k].numel()
                                                     for l in self.layers.values())
        return {"trainable": 0, "stored": stored, "active_per_sample": max(per_group.values(), default=0)}

    @torch.no_grad()
    def stream_analysis(self, tasks) -> dict:
        """Level-1 accuracy: share of each seen task's test records routed to the task's own group."""
        self.group_accuracy = {}
        for i, task in enumerate(tasks):
            if i < len(self.task_group):
                assigned = self.assign_groups(list(task.test))
                self.group_accuracy[task.name] = 100.0 * (assigned == self.task_group[i]).float().mean().item()
        return {"groups": self.groups.num_groups, "task_group": dict(zip([t.name for t in tasks], self.task_group)),
                "group_accuracy": self.group_accuracy,
                "experts": [dict(r, params=int(r["params"])) for r in rank_summary(self)]}

    def report_sections(self):
        return report_sections(self)

    def describe_routing(self, batch: dict) -> str:
        return describe_routing(self, batch)
