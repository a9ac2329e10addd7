"""`hide`: HiDe-LLaVA (Guo et al., ACL 2025: hierarchical decoupling, task-general fusion below and task-specific
expansion on top).

Source: the authors' code, Ghy0501/HiDe-LLaVA: the lower-layer fusion in ``HiDe/peft/tuners/clitmoelora.py``
and the top layer's anchor mixing in ``llava/model/llava_arch.py`` (MCITlib carries a copy); the variant
``fusion: products`` is LAMDA-CL/Prism's port. Read, not copied (docs/peers.md, "HiDe-LLaVA").

Training, per task t (expert index == task index): a fresh LoRA expert (rank 8, alpha 16) on every adapted
linear trains alone on the task (routing weights one-hot on t; the earlier experts are frozen). The task's
anchors are stored: the mean image embedding and the mean text embedding of its training records
(RoutingEncoders: the same frozen encoders CRAM routes with).

Evaluation (no task id):
* lower layers (every adapted layer but the top ``top_layers``, default 1): one merged expert. ``fusion``:
  ``factors`` (default, the authors'): ``y = W0 x + s (sum_i B_i)(sum_i A_i) x``, cross terms B_i A_j
  included; ``products`` (Prism's port): ``y = W0 x + s sum_i B_i A_i x``. The two differ a lot (the
  cross terms grow with the number of tasks), so the variant is named (docs/peers.md, "HiDe-LLaVA").
* top layer: the experts mixed per sample by similarity to the anchors,
  ``w = softmax_k(scale * (image_weight cos(q, a^img_k) + text_weight cos(t, a^txt_k)))``. ``anchor_mixing``:
  ``authors`` (default): the mean of the two cosines with softmax(sim / 0.1), i.e. weights 0.5 / 0.5, scale
  10; ``same``: SAME's task prior (0.2 image + 0.8 text, scale 28), not HiDe's, kept
  as a variant. ``image_weight``, ``text_weight``, ``anchor_scale`` (null: the preset's) override one part.

Where we differ from the authors' code:
* experts sit on the attention projections of every decoder layer (``backbone.targets``: q, k, v, o), the
  adapted set every method here shares; rank 8 / alpha 16 per task as the other per-task baselines;
* the anchors come from our routing encoders (MiniLM text and pooled backbone image features by default;
  the authors use CLIP; ``text_encoder`` / ``image_encoder`` take a local CLIP path), averaged over every
  training record of the task (``anchor_max_records`` caps it);
* Prism's port also takes the argmax of the top layer's similarities instead of a softmax; ``fusion:
  products`` changes only the fusion (the top layer keeps ``anchor_mixing``).

Representation: after each task the merged factors (``factors``: sum A (r, d_in), sum B (d_out, r);
``products``: the A's stacked (K r, d_in), the B's side by side (d_out, K r); scale s) are written into the
lower linears' LoRA buffer slot of ``MultiLoRALinear``; evaluation turns the buffer on with weight 1 and gives
the lower layers' experts weight 0, so a lower linear computes exactly the merged expert. Training turns the
buffer off. The merged factors are saved with the adapters (they are what inference stores).

Accounting: ``stored`` = every expert + the merged factors + the anchors; ``active_per_sample`` = the merged
factors of the lower linears + every expert of the top linears (the softmax is dense); the anchors live in the
routing encoders' space and, as CRAM's centroids, are not counted as active LLM parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import PartialState
from torch import Tensor, nn

from cramcl.encoders import RoutingEncoderConfig, RoutingEncoders
from cramcl.errors import BadInputError
from cramcl.methods.base import Services
from cramcl.methods.hide_fusion import FUSIONS, anchor_routing_weights, merged_factors
from cramcl.methods.lora_ft import LoraFTConfig
from cramcl.methods.per_task import PerTaskLora
from cramcl.utils.dist import all_reduce_sum


# anchor_mixing -> (image_weight, text_weight, scale) of the top layer's softmax over the anchor similarities
ANCHOR_MIXING = {"authors": (0.5, 0.5, 10.0),  # HiDe-LLaVA's llava_arch.py: (cos_img + cos_txt) / 2, sim / 0.1
                 "same": (0.2, 0.8, 28.0)}  # SAME's task prior (not HiDe's)


@dataclass
class HiDeConfig(LoraFTConfig, RoutingEncoderConfig):
    top_layers: int = 1  # top transformer layers that mix experts by the anchors; all lower ones merge
    fusion: str = "factors"  # factors: (sum B)(sum A), the authors' | products: sum B_k A_k, Prism's port
    anchor_mixing: str = "authors"  # authors | same: see ANCHOR_MIXING
    image_weight: float | None = None  # None: the anchor_mixing preset's
    text_weight: float | None = None
    anchor_scale: float | None = None
    anchor_max_records: int | None = None  # None: every training record of the task makes its anchors

    def mixing(self) -> tuple[float, float, float]:
        """(image_weight, text_weight, scale) in effect: the preset's, each overridden where set."""
        w_img, w_txt, scale = ANCHOR_MIXING.get(self.anchor_mixing, ANCHOR_MIXING["authors"])
        return (w_img if self.image_weight is None else self.image_weight,
                w_txt if self.text_weight is None else self.text_weight,
                scale if self.anchor_scale is None else self.anchor_scale)

    def problems(self) -> list[str]:
        """Settings out of range, one line each (checked when the config is resolved)."""
        checks = [("top_layers", self.top_layers >= 0, ">= 0"),
                  ("fusion", self.fusion in FUSIONS, f"one of {', '.join(FUSIONS)}"),
                  ("anchor_mixing", self.anchor_mixing in ANCHOR_MIXING, f"one of {', '.join(ANCHOR_MIXING)}"),
                  ("image_weight", self.image_weight is None or self.image_weight >= 0, "null or >= 0"),
                  ("text_weight", self.text_weight is None or self.text_weight >= 0, "null or >= 0"),
                  ("anchor_scale", self.anchor_scale is None or self.anchor_scale > 0, "null or > 0"),
                  ("anchor_max_records", self.anchor_max_records is None or self.anchor_max_records >= 1,
                   "null or >= 1"), ("dropout", 0 <= self.dropout < 1, "in [0, 1)")]
        return [f"{name}: {getattr(self, name)!r} must be {want}" for name, ok, want in checks if not ok]


class HiDe(PerTaskLora):
    name = "hide"

    def __init__(self, config: HiDeConfig):
        super().__init__(config)
        problems = config.problems()
        if problems:
            raise BadInputError([f"method.{p}" for p in problems])
        self.image_anchors: list[Tensor] = []  # per task (D_q,)
        self.text_anchors: list[Tensor] = []  # per task (D_t,)
        self.top_indices: set[int] = set()
        self._train = False
        self._weights: Tensor | None = None  # (B, K) top-layer weights of the current evaluation batch

    # ------------------------------------------------------------------ setup
    def setup(self, services: Services) -> None:
        super().setup(services)
        indices = sorted({layer.layer_index for layer in self.layers.values()})
        n = min(self.cfg.top_layers, len(indices))
        self.top_indices = set(indices[len(indices) - n:])
        self.context.route = self._route

    @property
    def encoders(self):
        """The run's RoutingEncoders, built on first use (tests may hand in their own via Services)."""
        if self.services.encoders is None:
            self.services.encoders = RoutingEncoders.from_config(self.services.backbone, self.cfg)
        return self.services.encoders

    def is_top(self, layer) -> bool:
        return layer.layer_index in self.top_indices

    def lower_layers(self) -> list:
        return [layer for layer in self.layers.values() if not self.is_top(layer)]

    # ------------------------------------------------------------------ lifecycle
    def before_task(self, task_index: int, task) -> None:
        if len(self.image_anchors) != task_index:
            raise RuntimeError(f"hide: {len(self.image_anchors)} anchors before task {task_index}")
        super().before_task(task_index, task)  # a fresh trainable expert at index task_index
        q, t = self.task_anchors(list(task.train))
        self.image_anchors.append(q)
        self.text_anchors.append(t)
        self._train = True

    @torch.no_grad()
    def task_anchors(self, records: list) -> tuple[Tensor, Tensor]:
        """(D_q,), (D_t,): mean image and text embeddings of ``records`` (sharded over processes, summed)."""
        if self.cfg.anchor_max_records is not None:
            records = records[: self.cfg.anchor_max_records]
        if not records:
            raise RuntimeError("hide: a task without training records has no anchors")
        state = PartialState()
        mine = records[state.process_index::state.num_processes]
        empty = not mine
        mine = mine or records[:1]  # an empty shard still needs the embedding sizes; its sums count 0
        q_sum = t_sum = None
        for start in range(0, len(mine), 256):
            chunk = mine[start:start + 256]
            q = self.encoders.image_embeddings(chunk).double().sum(0).cpu()
            t = self.encoders.text_embeddings(chunk).double().sum(0).cpu()
            q_sum = q if q_sum is None else q_sum + q
            t_sum = t if t_sum is None else t_sum + t
        count = torch.tensor([0.0 if empty else float(len(mine))], dtype=torch.float64)
        if empty:
            q_sum, t_sum = q_sum * 0, t_sum * 0
        total = all_reduce_sum(count).clamp(min=1)
        return (all_reduce_sum(q_sum) / total).float(), (all_reduce_sum(t_sum) / total).float()

    def begin_phase(self, phase) -> None:
        self._train = True
        self.context.buffer_weight = None  # the merged expert is an inference-time construct

    def after_task(self, task_index: int) -> None:
        super().after_task(task_index)  # freezes every expert, current_task = None
        self.merge_lower_layers()
        self._train = False

    @torch.no_grad()
    def merge_lower_layers(self) -> None:
        """Write every lower linear's merged expert (``fusion``: see the module docstring) into its buffer slot
        (frozen)."""
        for layer in self.lower_layers():
            if layer.num_experts == 0:
                layer.drop_buffer()
                continue
            A, B, scale = merged_factors(list(layer.experts_A), list(layer.experts_B), layer.expert_scales,
                                         self.cfg.fusion)
            layer.buffer_A = nn.Parameter(A.clone(), requires_grad=False)
            layer.buffer_B = nn.Parameter(B.clone(), requires_grad=False)
            layer.buffer_scale = scale

    # ------------------------------------------------------------------ routing
    def prepare_batch(self, batch: dict, train: bool) -> None:
        self._train = train
        if train:
            self.context.buffer_weight = None
            self._weights = None
            return
        self.context.buffer_weight = 1.0  # lower linears: the merged expert (top linears have no buffer)
        self._weights = self.top_layer_weights(batch["records"]) if self.image_anchors else None

    @torch.no_grad()
    def top_layer_weights(self, records) -> Tensor:
        """(B, K) the top layer's expert weights for ``records`` from their embeddings alone (no task id)."""
        q = self.encoders.image_embeddings(records)
        t = self.encoders.text_embeddings(records)
        return anchor_routing_weights(q, t, torch.stack(self.image_anchors), torch.stack(self.text_anchors),
                                      *self.cfg.mixing())

    def _route(self, layer, x: Tensor) -> Tensor:
        K = layer.num_experts
        if self._train:
            t = self.current_task
            if t is None or t >= K:
                raise RuntimeError(f"hide: training forward without a current expert ({layer.key}, K={K})")
            w = torch.zeros(x.shape[0], K, device=x.device)
            w[:, t] = 1.0  # isolation: the task's expert alone, in every layer
            return w
        if not self.is_top(layer):
            return torch.zeros(x.shape[0], K, device=x.device)  # the merged expert (buffer) does the work
        if self._weights is None or self._weights.shape != (x.shape[0], K):
            raise RuntimeError(f"hide: evaluation forward at {layer.key} without anchor weights for this batch")
        return self._weights.to(x.device)

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors, meta = super().state()  # experts and the lower linears' merged factors
        if self.image_anchors:
            tensors["hide.anchors.image"] = torch.stack(self.image_anchors).cpu().contiguous()
            tensors["hide.anchors.text"] = torch.stack(self.text_anchors).cpu().contiguous()
        meta["hide"] = {"num_tasks": len(self.image_anchors), "top_indices": sorted(self.top_indices),
                        "fusion": self.cfg.fusion}
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        info = meta["hide"]
        if sorted(self.top_indices) != list(info["top_indices"]):
            raise RuntimeError(f"hide state: top layers {info['top_indices']} != configured {sorted(self.top_indices)}")
        for layer in self.layers.values():
            for p in (layer.buffer_A, layer.buffer_B):
                if p is not None:
                    p.requires_grad_(False)
        K = int(info["num_tasks"])
        self.image_anchors = list(tensors["hide.anchors.image"].float()) if K else []
        self.text_anchors = list(tensors["hide.anchors.text"].float()) if K else []
        if len(self.image_anchors) != K or len(self.text_anchors) != K:
            raise RuntimeError(f"hide state: {len(self.image_anchors)} anchors for {K} tasks")
        self._train = False

    # ------------------------------------------------------------------ accounting and analysis
    def param_counts(self) -> dict[str, int]:
        experts = {layer.key: sum(a.numel() + b.numel() for a, b in zip(layer.experts_A, layer.experts_B))
                   for layer in self.layers.values()}
        if not any(experts.values()):
            return {"trainable": 0, "stored": 0, "active_per_sample": 0}
        merged = sum(layer.buffer_A.numel() + layer.buffer_B.numel() for layer in self.lower_layers()
                     if layer.buffer_A is not None)
        anchors = sum(a.numel() for a in self.image_anchors + self.text_anchors)
        top = sum(experts[layer.key] for layer in self.layers.values() if self.is_top(layer))
        return {"trainable": self.one_expert_params(), "stored": sum(experts.values()) + merged + anchors,
                "active_per_sample": merged + top}

    @torch.no_grad()
    def stream_analysis(self, tasks) -> dict:
        """Share (%) of each seen task's test records whose largest top-layer weight is on the task's expert."""
        acc = {}
        for i, task in enumerate(tasks):
            if i < len(self.image_anchors) and len(task.test):
                picked = self.top_layer_weights(list(task.test)).argmax(-1)
                acc[task.name] = round(100.0 * (picked == i).float().mean().item(), 2)
        return {"top_layer_routing_accuracy": acc} if acc else {}
