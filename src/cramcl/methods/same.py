"""SAME: Stabilized Mixture-of-Experts (Xie et al., arXiv 2602.01990).

LoRA experts on the FFN (gate/up/down), one rank-8 expert per task, and a bias-free linear router per
adapted linear whose rows grow by one per task. Training: every sample of a batch gets the same weights
``g = normalize(m * mean_n softmax(W_r x_n))`` (the mean over the batch's tokens, masked by the activation
mask m). Two drift controls act on gradients through tensor hooks: the router gradient is rescaled inside
the top principal directions of the current layer input (refreshed every 20 steps from step 10), and every
training expert's A-gradient is preconditioned by the spectrum of earlier tasks' inputs. Adaptive
activation gives weight 0 (and no gradient) to old experts whose utilisation/importance score is low.
Inference (no task id): per sample, the router's token mean times a prior from per-task image/text
prototypes, top-2, renormalised. The math is in :mod:`cramcl.methods.same_math`.

Source: LAMDA-CL/Prism's SAME (the same code ships in LAMDA-CL/EMNLP2026-CRAM: ``PEFT/tuners/custom/same.py``,
settings in ``config/methods/same.py``), with the paper; read, not copied (docs/peers.md, "SAME"). Where we differ:
* the task prior's image / text prototypes come from our routing encoders (MiniLM and pooled backbone
  features by default; the authors: CLIP), as CRAM's routing does;
* where the paper is silent we chose: earlier tasks' input spectra are merged with equal weight into one
  (U, s) per adapted linear (``spectra_tasks``), and the statistics use the batch's unpadded tokens only;
* the settings follow the paper (refresh every 20 steps from step 10, energy 0.9, clip [0.8, 1.2], mu 0.9,
  EMA 0.95, freeze threshold 0.1, prior 0.2 / 0.8 with scale 28, top-2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from cramcl.adapters.inject import inject_adapters
from cramcl.encoders import RoutingEncoderConfig, RoutingEncoders
from cramcl.methods.base import Method, Phase, Services, freeze_all_experts
from cramcl.methods import same_math as sm
from cramcl.utils.dist import all_reduce_sum, broadcast_from_main


@dataclass
class SameConfig(RoutingEncoderConfig):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    train_old_experts: bool = True  # old experts not frozen by the activation mask keep training (shared)
    train_old_router_rows: bool = True  # the whole router trains; drift is controlled by the gradient rewrite
    spectral_router: bool = True
    spectral_start: int = 10
    spectral_every: int = 20
    max_directions: int = 64
    energy: float = 0.9
    smooth_window: int = 3
    clip_min: float = 0.8
    clip_max: float = 1.2
    curvature: bool = True
    mu: float = 0.9
    adaptive_activation: bool = True
    ema_decay: float = 0.95
    freeze_threshold: float = 0.1
    prior_image_weight: float = 0.2  # the text cosine gets 1 - this
    prior_scale: float = 28.0
    top_k: int = 2


class Same(Method):
    name = "same"

    def __init__(self, config: SameConfig):
        super().__init__(config)
        self.routers: dict[str, nn.ParameterList] = {}  # canonical key -> rows (1, d_in), one per expert
        self.usage: dict[str, Tensor] = {}  # key -> (K,) EMA of utilisation (reset every task)
        self.importance: dict[str, Tensor] = {}  # key -> (K,) EMA of usage x ||x||^2 (carried across tasks)
        self.active: dict[str, Tensor] = {}  # key -> bool (K,) activation mask of the last training step
        self.spectra: dict[str, tuple[Tensor, Tensor]] = {}  # key -> (U (d, <=64), s) of earlier tasks' inputs
        self.spectra_tasks = 0  # tasks merged (with equal weight) into ``spectra``
        self.proto_img: Tensor | None = None  # (K, D_q)
        self.proto_txt: Tensor | None = None  # (K, D_t)
        self.task_log: list[dict] = []  # per task: frozen share, directions kept
        self._train, self._hooks, self._cache = False, [], {}  # _cache: key -> (B, K) eval weights of a batch
        self._router_basis: dict[str, tuple[Tensor, Tensor]] = {}  # key -> (V (d, k), c (k,)) this refresh
        self._curv: dict[str, tuple[Tensor, Tensor]] = {}  # key -> (U_k, s_k) for the A-gradients
        self._task_spectra: dict[str, tuple[Tensor, Tensor, int]] = {}  # key -> (V, s, tokens) of this task
        self._valid: Tensor | None = None  # (B, T) attention mask of the batch
        self._prior: Tensor | None = None  # (B, K) task prior of an eval batch
        self._seen: set[str] = set()
        self._frozen = [0.0, 0]  # summed share of frozen old experts, observations (this task)
        self._proto_sums: list = [None, None, 0]  # image sum, text sum, count (this task)
        self._micro, self._step, self._total_steps, self._refresh = 0, 0, 0, False

    # ------------------------------------------------------------------ setup
    def setup(self, services: Services) -> None:
        self.services = services
        bb, targets = services.backbone, list(self.cfg.targets)
        self.layers = inject_adapters(bb.language_model, targets, bb.num_layers * len(targets), self.context,
                                      dropout=self.cfg.dropout)
        for key, layer in self.layers.items():
            layer.same_router = nn.ParameterList()  # a submodule: moves with the model, seen by DDP
            self.routers[key] = layer.same_router
        self.encoders = RoutingEncoders.from_config(bb, self.cfg)
        self.grad_accum = max(1, int(services.run_config.train.grad_accum))
        self.context.route = self._route

    # ------------------------------------------------------------------ task lifecycle
    def before_task(self, task_index: int, task) -> None:
        super().before_task(task_index, task)
        for key, layer in self.layers.items():
            dev = layer.base.weight.device
            layer.add_expert(self.cfg.rank, alpha=self.cfg.alpha)
            row = torch.empty(1, layer.in_features, device=dev)
            nn.init.kaiming_uniform_(row, a=math.sqrt(5))  # nn.Linear's default init (bias-free)
            self.routers[key].append(nn.Parameter(row))
            K, old = layer.num_experts, self.importance.get(key, torch.zeros(0, device=dev))
            self.importance[key] = torch.cat([old, torch.zeros(1, device=dev)])
            self.usage[key], self.active[key] = torch.zeros(K, device=dev), torch.ones(K, dtype=torch.bool, device=dev)
        self._seen, self._frozen, self._proto_sums, self._micro = set(), [0.0, 0], [None, None, 0], 0
        self._task_spectra, self._router_basis = {}, {}

    def phases(self, task_index: int, total_steps: int) -> list[Phase]:
        self._total_steps = total_steps
        return [Phase("train", total_steps)]

    def begin_phase(self, phase: Phase) -> None:
        self._train = True
        for key, layer in self.layers.items():
            cur = layer.num_experts - 1
            for k in range(layer.num_experts):
                layer.set_expert_trainable(k, k == cur or self.cfg.train_old_experts)
            for k, row in enumerate(self.routers[key]):
                row.requires_grad_(k == cur or self.cfg.train_old_router_rows)
        spectra = self.spectra if self.cfg.curvature else {}
        ks = {key: sm.energy_rank(s, self.cfg.energy) for key, (_, s) in spectra.items()}
        self._curv = {key: (self.spectra[key][0][:, :k], self.spectra[key][1][:k]) for key, k in ks.items()}
        self._register_hooks()

    def _register_hooks(self) -> None:
        for key, layer in self.layers.items():
            cur = layer.num_experts - 1
            if self.cfg.spectral_router:
                self._hooks += [row.register_hook(partial(self._router_hook, key))
                                for row in self.routers[key] if row.requires_grad]
            for k in range(layer.num_experts):
                A, B = layer.experts_A[k], layer.experts_B[k]
                if not A.requires_grad:
                    continue
                if key in self._curv:
                    self._hooks.append(A.register_hook(partial(self._curvature_hook, key)))
                if self.cfg.adaptive_activation and k != cur:
                    self._hooks += [p.register_post_accumulate_grad_hook(partial(self._drop_if_frozen, key, k))
                                    for p in (A, B)]

    def _router_hook(self, key: str, grad: Tensor) -> Tensor:
        basis = self._router_basis.get(key)
        return grad if basis is None else sm.spectral_router_grad(grad, *basis)

    def _curvature_hook(self, key: str, grad: Tensor) -> Tensor:
        U, s = self._curv[key]
        return sm.curvature_precondition(grad, U, s, self.cfg.mu)

    def _drop_if_frozen(self, key: str, k: int, param: Tensor) -> None:
        if not bool(self.active[key][k]):
            param.grad = None  # no gradient: the optimizer skips it (no momentum drift either)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self.context.capture, self._train = [], None, False

    def end_phase(self, phase: Phase) -> None:
        self._remove_hooks()

    @torch.no_grad()
    def after_task(self, task_index: int) -> None:
        self._remove_hooks()
        freeze_all_experts(self.layers)
        for row in (row for rows in self.routers.values() for row in rows):
            row.requires_grad_(False)
        world = float(all_reduce_sum(torch.ones(1)).item())
        for key in self.layers:  # per-process statistics -> their mean, so every process saves the same state
            self.usage[key] = all_reduce_sum(self.usage[key]) / world
            self.importance[key] = all_reduce_sum(self.importance[key]) / world
        self._store_prototypes()
        ks = []
        if self.cfg.curvature:
            for key, (V, s, _) in self._task_spectra.items():
                if key in self.spectra and self.spectra_tasks > 0:
                    V, s = sm.merge_spectra(*self.spectra[key], self.spectra_tasks, V, s, 1.0, self.cfg.max_directions)
                self.spectra[key] = (broadcast_from_main(V.contiguous()), broadcast_from_main(s.contiguous()))
                ks.append(sm.energy_rank(self.spectra[key][1], self.cfg.energy))
            if self._task_spectra:
                self.spectra_tasks += 1
        frozen, n = self._frozen
        self.task_log.append({"task": task_index, "frozen_share": round(frozen / max(n, 1), 4),
                              "curvature_k": round(sum(ks) / len(ks), 2) if ks else 0.0})
        self.current_task = None

    def _store_prototypes(self) -> None:
        sum_q, sum_t, count = self._proto_sums
        if sum_q is None:
            return
        n = all_reduce_sum(torch.tensor([float(count)])).clamp(min=1)
        q, t = (all_reduce_sum(sum_q) / n).float()[None], (all_reduce_sum(sum_t) / n).float()[None]
        self.proto_img = q if self.proto_img is None else torch.cat([self.proto_img, q])
        self.proto_txt = t if self.proto_txt is None else torch.cat([self.proto_txt, t])

    # ------------------------------------------------------------------ batches and routing
    def prepare_batch(self, batch: dict, train: bool) -> None:
        records = batch["records"]
        mask = batch.get("attention_mask")
        self._valid = mask.bool() if torch.is_tensor(mask) else None
        self._train, self._cache = train, {}
        if not train:
            self.context.capture = None
            self._prior = self._task_prior(records)
            return
        enc = self.encoders
        q, t = (e(records).double().cpu().sum(0) for e in (enc.image_embeddings, enc.text_embeddings))
        sq, st, n = self._proto_sums
        self._proto_sums = [q if sq is None else sq + q, t if st is None else st + t, n + len(records)]
        step, micro = divmod(self._micro, self.grad_accum)  # optimizer step of the task, micro-batch in it
        self._micro += 1
        c = self.cfg
        scheduled = step >= c.spectral_start and (step - c.spectral_start) % c.spectral_every == 0
        self._refresh, self._step = c.spectral_router and scheduled, step
        # the task's input spectrum (curvature memory) pools the scheduled batches and the last one
        pool = c.curvature and (scheduled or step == self._total_steps - 1)
        self.context.capture = self._capture if micro == 0 and (self._refresh or pool) else None

    def _task_prior(self, records) -> Tensor | None:
        if self.proto_txt is None:
            return None
        return sm.prototype_prior(self.encoders.image_embeddings(records), self.encoders.text_embeddings(records),
                                  self.proto_img, self.proto_txt, self.cfg.prior_image_weight, self.cfg.prior_scale)

    def _valid_for(self, x: Tensor) -> Tensor:
        """(B, T) 0/1 mask of real tokens (all ones when the batch's mask does not fit x, e.g. decode steps)."""
        if self._valid is not None and tuple(self._valid.shape) == tuple(x.shape[:2]):
            return self._valid.to(x.device)
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    @torch.no_grad()
    def _capture(self, layer, x: Tensor) -> None:
        """At refresh steps (and the task's last step): the spectrum of this layer's input tokens."""
        X = x.reshape(-1, x.shape[-1])[self._valid_for(x).reshape(-1)].float()
        gen = torch.Generator(device=X.device).manual_seed(1_000_003 * self._step + layer.layer_index)
        V, s = sm.principal_directions(X, self.cfg.max_directions, generator=gen)
        if self._refresh:
            k = sm.energy_rank(s, self.cfg.energy)
            c = sm.spectral_factors(s[:k], self.cfg.smooth_window, self.cfg.clip_min, self.cfg.clip_max)
            self._router_basis[layer.key] = (V[:, :k], c)
        if self.cfg.curvature:
            n = X.shape[0]
            if layer.key in self._task_spectra:
                V0, s0, n0 = self._task_spectra[layer.key]
                V, s = sm.merge_spectra(V0, s0, n0, V, s, n, self.cfg.max_directions)
                n += n0
            self._task_spectra[layer.key] = (V, s, n)

    def _route(self, layer, x: Tensor) -> Tensor:
        key = layer.key
        if not self._train and key in self._cache:
            return self._cache[key]  # decode steps reuse the prompt's weights
        W = torch.cat(list(self.routers[key]), dim=0)  # (K, d_in)
        probs = torch.softmax(x.float() @ W.t(), dim=-1)  # (B, T, K)
        valid = self._valid_for(x)
        if self._train:
            mask = self._update_activation(layer, probs.detach(), x.detach(), valid)
            g = sm.masked_batch_weights(probs, valid, mask)  # (K,)
            return g.unsqueeze(0).expand(x.shape[0], -1)
        p = sm.token_mean(probs, valid)  # (B, K)
        prior = self._prior
        if prior is None or prior.shape != p.shape:
            prior = torch.ones_like(p)  # no prototypes yet (e.g. inspecting mid-task): the router alone
        w = sm.topk_renormalize(p * prior.to(p.device), self.cfg.top_k)
        self._cache[key] = w
        return w

    @torch.no_grad()
    def _update_activation(self, layer, probs: Tensor, x: Tensor, valid: Tensor) -> Tensor:
        key, K = layer.key, probs.shape[-1]
        if not self.cfg.adaptive_activation:
            return torch.ones(K, dtype=torch.bool, device=probs.device)
        v = valid.to(probs.dtype).unsqueeze(-1)
        n = v.sum().clamp_min(1.0)
        usage = (probs * v).sum((0, 1)) / n  # (K,)
        importance = (probs * x.float().pow(2).sum(-1, keepdim=True) * v).sum((0, 1)) / n  # (K,)
        first, fresh = key not in self._seen, torch.zeros(K, dtype=torch.bool, device=probs.device)
        self._seen.add(key)
        fresh[-1] = first  # the new expert's importance starts from its first observation
        self.usage[key] = sm.ema_update(self.usage[key], usage, self.cfg.ema_decay, fresh | first)
        self.importance[key] = sm.ema_update(self.importance[key], importance, self.cfg.ema_decay, fresh)
        mask = sm.activation_mask(self.usage[key], self.importance[key], K - 1, self.cfg.freeze_threshold)
        self.active[key] = mask
        if K > 1:
            self._frozen = [self._frozen[0] + float((~mask).sum()) / (K - 1), self._frozen[1] + 1]
        return mask

    # ------------------------------------------------------------------ state, accounting, reports
    def state(self):
        tensors, meta = super().state()
        for key in self.layers:
            for k, row in enumerate(self.routers[key]):
                tensors[f"same.router.{key}.{k}"] = row.detach().cpu().contiguous()
            for name, d in (("usage", self.usage), ("importance", self.importance), ("active", self.active)):
                if key in d:
                    tensors[f"same.{name}.{key}"] = d[key].detach().cpu().contiguous()
            if key in self.spectra:
                tensors[f"same.spectrum.{key}.U"] = self.spectra[key][0].detach().cpu().contiguous()
                tensors[f"same.spectrum.{key}.s"] = self.spectra[key][1].detach().cpu().contiguous()
        if self.proto_txt is not None:
            tensors["same.proto_img"] = self.proto_img.contiguous()
            tensors["same.proto_txt"] = self.proto_txt.contiguous()
        meta["same"] = {"routers": {key: len(rows) for key, rows in self.routers.items()},
                        "spectra_tasks": self.spectra_tasks, "task_log": self.task_log}
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        info = meta["same"]
        for key, layer in self.layers.items():
            dev = layer.base.weight.device
            rows = layer.same_router = self.routers[key] = nn.ParameterList()  # no item deletion in ParameterList
            for k in range(info["routers"][key]):
                rows.append(nn.Parameter(tensors[f"same.router.{key}.{k}"].clone().to(dev), requires_grad=False))
            for name, d in (("usage", self.usage), ("importance", self.importance), ("active", self.active)):
                if f"same.{name}.{key}" in tensors:
                    d[key] = tensors[f"same.{name}.{key}"].clone().to(dev)
            if f"same.spectrum.{key}.U" in tensors:
                self.spectra[key] = (tensors[f"same.spectrum.{key}.U"].clone().to(dev),
                                     tensors[f"same.spectrum.{key}.s"].clone().to(dev))
        self.proto_img = tensors["same.proto_img"].clone() if "same.proto_img" in tensors else None
        self.proto_txt = tensors["same.proto_txt"].clone() if "same.proto_txt" in tensors else None
        self.spectra_tasks = int(info["spectra_tasks"])
        self.task_log = list(info["task_log"])

    def param_counts(self) -> dict[str, int]:
        layers = list(self.layers.values())
        K = max((l.num_experts for l in layers), default=0)
        per_expert = [sum(l.experts_A[k].numel() + l.experts_B[k].numel() for l in layers) for k in range(K)]
        routers = sum(row.numel() for rows in self.routers.values() for row in rows)
        active = sum(sorted(per_expert, reverse=True)[: self.cfg.top_k])
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {"trainable": trainable, "stored": sum(per_expert) + routers, "active_per_sample": active + routers}

    def expert_created_for(self, task_index: int) -> int | None:
        """Expert k is added for task k (it is not exported alone: inference mixes the top-2, and old
        experts keep training unless adaptive activation freezes them)."""
        K = max((layer.num_experts for layer in self.layers.values()), default=0)
        return task_index if task_index < K else None

    def report_sections(self) -> list[tuple[str, str]]:
        if not self.task_log:
            return []
        lines = ["| task | old experts frozen (mean share over steps, layers) | curvature directions (mean k) |",
                 "|---|---|---|"]
        for r in self.task_log:
            name = self.task_names[r["task"]] if r["task"] < len(self.task_names) else r["task"]
            lines.append(f"| {name} | {r['frozen_share']:.2f} | {r['curvature_k']} |")
        intro = (f"{len(self.task_log)} expert(s) of rank {self.cfg.rank} per adapted module "
                 f"({', '.join(self.cfg.targets)}); inference keeps the top-{self.cfg.top_k} experts.")
        return [("SAME: adaptive activation and curvature memory", intro + "\n\n" + "\n".join(lines))]
