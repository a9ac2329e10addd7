"""CRAM: Centroid-Routing and Adaptive MoE (arXiv 2606.02502): the method's lifecycle, docs/cram.md (its code
map names the file of each mechanism).

Per task: level-1 decides the task's instruction group from the mean text embedding of its first samples;
a buffer LoRA trains alone during warm-up while c_buf averages the task's image embeddings; at the end of
warm-up every adapted module consolidates the buffer into a new expert sized by its SVD and the capability
gap against the group's earlier experts; in the stable phase only the new expert and its centroids train,
with the orthogonality penalty against the group's history. At evaluation: group = argmax cosine of the
text embedding to the prototypes, then per-layer RBF weights over that group's experts, per sample.

Source: the authors' code, LAMDA-CL/EMNLP2026-CRAM (a fork of LAMDA-CL/Prism): the adapted linear in
``PEFT/tuners/custom/cram_lora.py``, the paper's settings in ``config/methods/cram.py``; read, not copied
(docs/cram.md reconstructs the method from the paper and that code). Where we differ (the reasons: docs/cram.md,
"Where cramcl differs from the authors' code, and why"):
* routing per sample (``routing: per_sample``); the authors route a whole batch by its mean embeddings
  (``routing: batch_mean`` reproduces it);
* one scale convention: the consolidated expert's factors absorb the buffer's scale (the authors' code
  applies it a second time);
* the orthogonality penalty on every adapted module, averaged (the authors': once per layer, one module);
* sigma 0.25 in units of the gap between a group's two closest centroids (``sigma_units: gap``; the paper's
  2.0 in ``absolute`` units is for unnormalised CLIP embeddings); theta and tau_novel keep the paper's 0.1
  and 0.99 in configs/methods/cram.yaml and are restated for our encoders and layer width in the profiles;
* the routing encoders are any frozen text / image encoders (MiniLM and pooled backbone features by default;
  the paper: CLIP), outside the MLLM.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cramcl.encoders import RoutingEncoders
from cramcl.errors import BadInputError
from cramcl.methods.base import Method, Phase, Services, freeze_all_experts
from cramcl.methods.cram.centroids import (CentroidAccumulator, CentroidBank, best_two_expert_weight, centroid_gap,
                                          group_layer_weights, oracle_routing_weights, routing_check,
                                          scatter_group_weights, standardizing_scale)
from cramcl.methods.cram.config import ROUTING_MODES, SIGMA_UNITS, CramConfig
from cramcl.methods.cram.consolidation import consolidate_buffer
from cramcl.methods.cram.groups import InstructionGroups
from cramcl.methods.cram.oracle import oracle_groups, oracle_positions
from cramcl.methods.cram.penalty import OrthogonalityPenalty
from cramcl.methods.cram.report import describe_routing, report_sections, stream_analysis
from cramcl.methods.cram.state import load_cram_state, param_counts, save_cram_state
from cramcl.utils.device import to_device
from cramcl.utils.dist import all_reduce_sum, broadcast_from_main

ROUTING_CHECK_SAMPLES = 256  # a task's first N training records measure its routing at the stable phase's start


class Cram(Method):
    name = "cram"
    mid_task_resume = True  # phase_state() holds c_buf's running sums; the rest is in state()

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
        self.expert_variance: list[Tensor] = []  # expert k -> (D,) variance of its task's images (standardized only)
        self.task_group: list[int] = []
        self.consolidation_log: list[dict] = []  # per task: its group, rank per module, history size
        self.routing_checks: list[dict] = []  # per task in a shared group: its centroids on its own images
        self.oracle_overruled = 0  # routing=oracle: evaluated records whose instruction picked another group
        self._c_buf = CentroidAccumulator()
        self._phase = "eval"
        self.penalty = OrthogonalityPenalty()

    # ------------------------------------------------------------------ setup
    def setup(self, services: Services) -> None:
        super().setup(services)
        self.encoders = RoutingEncoders.from_config(services.backbone, self.cfg)
        self.num_layers = services.backbone.num_layers
        if (self.cfg.sigma_units == "absolute" and self.cfg.normalize_embeddings
                and best_two_expert_weight(self.cfg.sigma) < 0.9):
            services.log(f"    CRAM WARNING: method.sigma={self.cfg.sigma} on unit-norm routing embeddings cannot route: "
                         f"two experts' weights are never further apart than "
                         f"{best_two_expert_weight(self.cfg.sigma):.2f}/{1 - best_two_expert_weight(self.cfg.sigma):.2f} "
                         "(the paper's sigma 2 is for unnormalised CLIP features; see docs/routing-scale.md)")
        self.context.route = self._route
        self._weights: Tensor | None = None
        self._cast: dict = {}  # this batch's weights and image mask in a module's compute dtype, cast once
        self._layer_views: dict = {}  # dtype -> (this batch's weights, their per-layer views in that dtype)

    def _route(self, layer, x: Tensor) -> Tensor | None:
        if self._weights is None:
            return None
        if x is None:
            return self._weights[layer.layer_index]
        return self._per_layer(x.dtype)[layer.layer_index]

    def _per_layer(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """This batch's (B, K) weights of each layer in ``dtype``, cast and split once per batch: the same tensor
        objects in every forward of the batch, so an adapter recognises them at a glance and reuses its
        per-column multiplier over all decoding steps."""
        hit = self._layer_views.get(dtype)
        if hit is None or hit[0] is not self._weights:
            hit = self._layer_views[dtype] = (self._weights, self._in_dtype("weights", self._weights, dtype).unbind(0))
        return hit[1]

    def _in_dtype(self, name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``t`` in ``dtype``, cast once per batch rather than in each of the model's adapted modules
        (a bf16 model: 128 casts per forward). Keyed by the tensor's identity, so a new batch recasts."""
        if t.dtype == dtype:
            return t
        hit = self._cast.get((name, dtype))
        if hit is None or hit[0] is not t:
            hit = self._cast[(name, dtype)] = (t, t.to(dtype))
        return hit[1]

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
        self._task_records = list(task.train[:ROUTING_CHECK_SAMPLES])
        self.services.log(f"    CRAM: task '{task.name}' -> group {group} ({'new' if created else 'joined'})")
        self._c_buf.reset()
        if self.cfg.no_warmup:
            # a fresh expert joins the pool at once (rank fixed_rank, else R; the buffer's scale alpha/R)
            q_first = self.encoders.image_embeddings(first)
            rank = self.cfg.fixed_rank or self.cfg.buffer_rank
            for layer in self.layers.values():
                layer.add_expert(rank, alpha=self.cfg.buffer_alpha * rank / self.cfg.buffer_rank)
            self._register_expert(group, task_index, q_first.mean(0), q_first.float().var(0, unbiased=False))
        else:
            for layer in self.layers.values():
                layer.init_buffer(self.cfg.buffer_rank, self.cfg.buffer_alpha)

    def _single_pool(self, t_mean: Tensor) -> tuple[int, bool]:
        if self.groups.num_groups == 0:
            return self.groups.decide(t_mean)
        return 0, False

    def _register_expert(self, group: int, task_index: int, centroid_init: Tensor, variance: Tensor | None) -> None:
        self.centroids.add(centroid_init.to(self.device), self.num_layers)
        if self.cfg.routing_metric == "standardized":
            self.expert_variance.append(variance.float().to(self.device))
        self.expert_group.append(group)
        self.expert_task.append(task_index)

    def phases(self, task_index: int, total_steps: int) -> list[Phase]:
        if self.cfg.no_warmup:
            return [Phase("stable", total_steps)]
        if total_steps < self.cfg.min_steps_per_task:  # an epoch budget on a tiny task (fixed budgets are checked up front)
            raise BadInputError(f"task {task_index}: {total_steps} optimizer step is too few for cram, whose warm-up "
                                "and stable phases need at least one step each: raise train.epochs_per_task or set "
                                "method.no_warmup=true")
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
        self.penalty.start(self.layers, new, self._group_experts(self.expert_group[new], exclude=new), self.device)
        self.context.capture = self._capture if self.penalty.active and self.cfg.lambda_orth > 0 else None
        self._check_routing(new)

    @torch.no_grad()
    def _check_routing(self, new: int) -> None:
        """At the start of a stable phase in a shared group: do the new centroids send the task's own images
        to its new expert? Near-uniform weights although the images separate the experts (sigma too large
        for the embedding's scale) are logged as a warning and shown in the report."""
        experts = self._group_experts(self.expert_group[new])
        if len(experts) < 2 or self.cfg.routing != "per_sample":
            return
        if any(c["task"] == self.current_task for c in self.routing_checks):
            return  # a mid-task resume re-enters the stable phase: the check made at its start is in the state
        scale = self._metric_scale(experts)
        q = self.encoders.image_embeddings(self._task_records).to(self.device) * (1 if scale is None else scale)
        centroids = self.centroids.stacked(experts)[0] * (1 if scale is None else scale)  # (K, D), all start at c_buf
        sigma = self.cfg.sigma * (float(centroid_gap(centroids)) ** 0.5 if self.cfg.sigma_units == "gap" else 1.0)
        check = routing_check(q, centroids, experts.index(new), sigma)
        check.update(task=self.current_task, group=self.expert_group[new])
        self.routing_checks.append(check)
        if check["near_uniform"]:
            self.services.log(
                f"    CRAM WARNING: routing in group {check['group']} is near uniform: the new expert gets "
                f"{check['own_weight']:.2f} of the weight on its own task's images (uniform {check['uniform']:.2f}) "
                f"although {100 * check['separable']:.0f}% of them lie nearest its centroid; method.sigma="
                f"{self.cfg.sigma} ({self.cfg.sigma_units} units: {check['sigma']:.3f} in the embedding's) is too "
                f"large for these images (median squared-distance gap {check['gap']:.3f}; an embedding-unit sigma "
                f"<= {check['sigma_for_0_9']} gives >= 0.9)")

    def end_phase(self, phase: Phase) -> None:
        if phase.name == "warmup":
            self._consolidate()
        self.context.capture = None
        self.penalty.stop()

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

    def optimizer_groups(self, lr: float) -> list[dict]:
        """The new expert's centroids at ``method.centroid_lr`` when it is set (one group otherwise)."""
        if self.cfg.centroid_lr is None:
            return super().optimizer_groups(lr)
        return [{"params": super().trainable_parameters(), "lr": lr},
                {"params": [p for p in self.centroids.parameters() if p.requires_grad], "lr": self.cfg.centroid_lr}]

    # ------------------------------------------------------------------ consolidation
    def expert_for_task(self, task_index: int) -> int | None:
        return self.expert_task.index(task_index) if task_index in self.expert_task else None

    def _group_experts(self, group: int, exclude: int | None = None) -> list[int]:
        return [k for k, g in enumerate(self.expert_group) if g == group and k != exclude]

    @torch.no_grad()
    def _consolidate(self) -> None:
        # every process's warm-up sums, all-reduced, then read back through the accumulator's mean / variance
        sums, count = self._c_buf.sums()
        count = int(all_reduce_sum(torch.tensor([float(count)])).item())
        square_sums = all_reduce_sum(self._c_buf.square_sums().to(self.device)).cpu()
        self._c_buf.load_sums(all_reduce_sum(sums.to(self.device)).cpu(), count, square_sums)
        c_buf = self._c_buf.mean().to(self.device)
        variance = None if self.cfg.routing_metric == "euclidean" else self._c_buf.variance()
        group, task = self.task_group[-1], self.current_task
        history = self._group_experts(group)
        ranks, spectra, novelty = {}, {}, {}
        for key, layer in self.layers.items():
            result = consolidate_buffer(
                layer.buffer_B.detach().float(), layer.buffer_A.detach().float(), layer.buffer_scale,
                [layer.experts_A[k].detach().float() for k in history], tau_alloc=self.cfg.tau_alloc,
                tau_novel=self.cfg.tau_novel, r_min=self.cfg.r_min, r_max=self.cfg.r_max, fixed_rank=self.cfg.fixed_rank,
                alloc_units=self.cfg.alloc_units, capability_gap=self.cfg.capability_gap)
            # the SVD runs on every process; rank 0's result is the one all keep (bit-identical experts)
            layer.add_expert(A=broadcast_from_main(result.A.to(self.device)),
                             B=broadcast_from_main(result.B.to(self.device)), scale=1.0)
            layer.drop_buffer()  # reset: the next task's before_task makes a fresh one (A random, B = 0)
            ranks[key] = result.rank
            spectra[key] = [float(f"{v:.4g}") for v in result.spectrum.tolist()]
            if result.novelty is not None:
                novelty[key] = [round(v, 4) for v in result.novelty.tolist()]
        self._register_expert(group, task, c_buf, variance)
        # the buffer's whole spectrum and each direction's novelty: what the allocation rule saw (docs/cram.md,
        # "Reading a run")
        self.consolidation_log.append({"task": task, "group": group, "ranks": ranks, "history_experts": len(history),
                                       "spectra": spectra, "novelty": novelty})

    # ------------------------------------------------------------------ routing
    def prepare_batch(self, batch: dict, train: bool) -> None:
        records = batch["records"]
        if train and self._phase == "warmup":
            self._c_buf.add(self.encoders.image_embeddings(records))  # on the host: no device round trip
            self._update_prototype(records)
            self._weights = torch.zeros(self.num_layers, len(records), len(self.expert_group), device=self.device)
            self.context.active = ()  # warm-up: only the buffer acts, no expert runs
            return
        if train:
            self._update_prototype(records)
            groups = torch.full((len(records),), self.task_group[-1], dtype=torch.long)
        else:
            groups = self.assign_groups(records)
            if self.cfg.routing == "oracle":
                groups, overruled = oracle_groups(groups, batch.get("task_index"), self.expert_task, self.expert_group)
                self.oracle_overruled += overruled
        # a sample runs only its own group's experts: the batch computes over the groups it holds, not all
        present = set(groups.tolist())
        self.context.active = tuple(k for k, g in enumerate(self.expert_group) if g in present)
        self._image_mask = batch.get("image_mask")
        oracle_task = batch.get("task_index") if self.uses_task_id_at_eval or train else None
        self._weights = self.routing_weights(records, groups, self.current_task if train else oracle_task)

    def assign_groups(self, records) -> Tensor:
        """(B,) group of each record from its instruction text alone (argmax cosine; no task id).

        Under ``routing=batch_mean`` (the authors' code) the batch's mean text embedding picks one group
        for every record of the batch."""
        if self.groups.num_groups == 0:
            return torch.zeros(len(records), dtype=torch.long)
        t = self.encoders.text_embeddings(records)
        if self.cfg.routing == "batch_mean":
            return self.groups.assign(t.mean(0, keepdim=True)).expand(len(records)).clone()
        return self.groups.assign(t)

    def routing_weights(self, records, groups: Tensor, task_index=None) -> Tensor:
        """(L, B, K) expert weights of a batch given each sample's group (``task_index``: oracle routing
        only, one task or a (B,) per-record task index)."""
        q = self.encoders.image_embeddings(records)  # (B, D) on the host; each group's rows go over once, async
        per_group = {}
        for g in groups.unique().tolist():
            experts = self._group_experts(g)
            if not experts:
                continue
            rows = (groups == g).nonzero(as_tuple=True)[0]
            q_g, centroids, scale = to_device(q[rows], self.device), self.centroids.stacked(experts), \
                self._metric_scale(experts)
            mode = "per_sample" if self.cfg.routing == "oracle" else self.cfg.routing
            weights = group_layer_weights(q_g, centroids, self.cfg.sigma, mode, self.cfg.sigma_units, scale)
            if self.cfg.routing == "oracle":
                # the own task's expert alone; a record with none here (no task id, a task not trained yet)
                # keeps the image's routing
                own = to_device(oracle_positions(self.expert_task, experts, task_index, rows), self.device)
                known = own >= 0
                one_hot = oracle_routing_weights(own.clamp_min(0), len(experts), dtype=weights.dtype)
                weights = torch.where(known[None, :, None], one_hot[None], weights)
            per_group[g] = (rows, weights, experts)
        return scatter_group_weights(per_group, len(records), len(self.expert_group), self.num_layers)

    def _metric_scale(self, experts: list[int]) -> Tensor | None:
        """(D,) per-coordinate scale of the group's routing metric; None: Euclidean (or a lone expert)."""
        if self.cfg.routing_metric == "euclidean" or len(experts) < 2:
            return None
        return standardizing_scale(torch.stack([self.expert_variance[k] for k in experts]), self.cfg.metric_shrinkage)

    def _update_prototype(self, records) -> None:
        t = self.encoders.text_embeddings(records)
        total = all_reduce_sum(t.sum(0))
        count = int(all_reduce_sum(torch.tensor([float(len(records))])).item())
        self.groups.update_from_sums(self.task_group[-1], total, count)

    # ------------------------------------------------------------------ loss
    def _capture(self, layer, x: Tensor) -> None:
        self.penalty.capture(layer, x, self._in_dtype("mask", self._image_mask, x.dtype).unsqueeze(-1))

    def compute_loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        self.penalty.pooled = {}
        loss, aux = super().compute_loss(model, batch)
        if self._phase != "stable" or not self.penalty.active or self.cfg.lambda_orth == 0:
            return loss, aux
        new = len(self.expert_group) - 1
        history = self._group_experts(self.expert_group[new], exclude=new)
        gates = self._weights[:, :, history].sum(-1)  # (L, B) routing mass on the group's earlier experts
        orth = self.cfg.lambda_orth * self.penalty(self.layers, gates).mean()
        aux["orth"] = orth.detach()
        return loss + orth, aux

    # ------------------------------------------------------------------ state, accounting, reports
    def state(self):
        return save_cram_state(self, *super().state())

    def load_state(self, tensors, meta) -> None:
        super().load_state(tensors, meta)
        load_cram_state(self, tensors, meta)

    def phase_state(self):
        """Mid-task: the warm-up's running c_buf sums (consolidation takes their mean at the warm-up's end).
        The buffer, a new expert, its centroids and the prototypes' running means are in state()."""
        if self._c_buf.count == 0:
            return {}, {"c_buf_count": 0}
        sums, count = self._c_buf.sums()
        return {"c_buf_sum": sums, "c_buf_square_sum": self._c_buf.square_sums()}, {"c_buf_count": count}

    def load_phase_state(self, tensors, meta) -> None:
        self._c_buf.reset()
        if meta.get("c_buf_count", 0):
            self._c_buf.load_sums(tensors["c_buf_sum"], meta["c_buf_count"], tensors.get("c_buf_square_sum"))

    def param_counts(self) -> dict[str, int]:
        return param_counts(self)

    def stream_analysis(self, tasks) -> dict:
        return stream_analysis(self, tasks)

    def report_sections(self):
        return report_sections(self)

    def describe_routing(self, batch: dict) -> str:
        return describe_routing(self, batch)
