"""`routing-cl`: routing-based continual learning (Mohta et al., arXiv 2511.01831; PHATGOOSE-style).

Source: the PHATGOOSE authors' code, r-three/phatgoose (gate vectors trained after each frozen expert, zero
initialised, 100 steps at lr 5e-3 with accumulation 32, top-2 routing on LayerNorm'ed scores), as the
routing-CL paper adopts it; read, not copied (docs/peers.md, "Routing-based CL").

Pure isolation plus a token-level router learned after the fact. Per task t (expert index == task index):

1. phase ``expert``: a fresh LoRA expert (rank 8, alpha 16) on every adapted linear trains alone on the task:
   routing weight 1 on it, 0 on every earlier expert (they are frozen); the base is frozen.
2. gates: the expert is frozen; per adapted linear a gate vector v_t (d_in) trains with
   ``y = W0 x + sigmoid(v_t . x) s B_t A_t x`` per token (only expert t active).
3. evaluation (no task id), per token and per adapted linear: ``score_i = LN(x) . LN(v_i) / sqrt(d)``
   (LayerNorm without affine), keep the top-k (k = 2, or all when fewer experts), softmax the kept scores,
   mix those experts (per-token weights (B, T, K), 0 for the dropped experts).

The gate budget (``gate_budget``; ``gate_steps``, ``gate_lr``, ``gate_accum`` override one part each):
* ``phatgoose`` (the method file's default: the source's budget): after the expert has taken the task's whole
  step budget, and in addition to it, the gates train ``gate_steps`` = 100 optimizer steps of ``gate_accum``
  = 32 micro-batches (``train.batch_size`` records per process each) at ``gate_lr`` = 5e-3, constant after a
  linear warm-up of ``train.warmup_ratio``. The method runs this loop itself at the end of the task
  (``train_gates_after``; the trainer's loop knows one batch size per task), on the task's own records in a
  seeded order, gradients averaged over processes. Its steps are not in ``budget.steps_per_task`` of
  metrics.json (the trainer's) but in ``method_analysis.gate_training``.
* ``ours`` (the built-in profiles' choice: 32 x 100 micro-batches would be 32 times the expert's 100 steps,
  and the larger budget does not help on the built-in stream; docs/profiles.md, "default: routing-cl
  gate_budget"): a gate phase taken out of the task's step budget,
  ``min(gate_steps, ceil(gate_fraction * steps_per_task))`` steps
  (at least 1, leaving the expert at least 1; ``gate_fraction: 0.2`` gives <= 20 of 100 steps; null removes
  the cap) at ``gate_lr`` = 1e-3 on the trainer's batches and schedule; ``gate_accum`` must be 1.

Where we differ from the source:
* experts on q, k, v, o of every decoder layer (the adapted set every method shares), rank 8 / alpha 16;
* ``gate_init: input_mean`` (an option) starts the gates at the mean input of the task's tokens at that linear
  (accumulated over the expert phase, padding excluded) instead of PHATGOOSE's zeros;
* the ``phatgoose`` gate loop runs without the trainer's mixed-precision autocast (the model's own dtype) and
  is not counted in the runner's per-task training time;
* on the built-in stream the gates often pick another task's expert, whatever the budget (docs/peers.md,
  "Routing-based CL");
* ``active_per_sample`` counts, per token, the top-k experts' LoRA parameters plus every gate vector (all of
  them are scored); ``stored`` counts every expert and every gate.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from accelerate import PartialState
from torch import Tensor, nn

from cramcl.engine.trainer import global_batches, lr_factor
from cramcl.errors import BadInputError, TrainingFault
from cramcl.methods.base import Phase, Services, freeze_all_experts, lora_params
from cramcl.methods.lora_ft import LoraFTConfig
from cramcl.methods.routing_cl_gates import sigmoid_gate_weights, token_topk_routing
from cramcl.methods.per_task import PerTaskLora
from cramcl.utils.dist import all_reduce_sum

GATE_INITS = ("zeros", "input_mean")
# gate_budget -> defaults of (gate_steps, gate_lr, gate_accum) and where the gate steps come from
GATE_BUDGETS = {"phatgoose": {"steps": 100, "lr": 5.0e-3, "accum": 32, "placement": "after"},
                "ours": {"steps": 100, "lr": 1.0e-3, "accum": 1, "placement": "within"}}


@dataclass
class RoutingCLConfig(LoraFTConfig):
    top_k: int = 2
    gate_budget: str = "phatgoose"  # phatgoose: after the expert, in addition | ours: within the task's budget
    gate_steps: int | None = None  # None: the gate_budget's (100)
    gate_lr: float | None = None  # None: the gate_budget's (5e-3 phatgoose, 1e-3 ours)
    gate_accum: int | None = None  # micro-batches per gate step; None: the gate_budget's (32 phatgoose, 1 ours)
    gate_fraction: float | None = 0.2  # ours only: cap on the gate phase as a share of steps_per_task; None: none
    gate_init: str = "zeros"  # zeros (PHATGOOSE's code) | input_mean
    ln_eps: float = 1.0e-5

    def gate_settings(self) -> dict:
        """{"steps", "lr", "accum", "placement"} in effect: the gate_budget's, each overridden where set."""
        out = dict(GATE_BUDGETS.get(self.gate_budget, GATE_BUDGETS["phatgoose"]))
        for key, value in (("steps", self.gate_steps), ("lr", self.gate_lr), ("accum", self.gate_accum)):
            if value is not None:
                out[key] = value
        return out

    def problems(self) -> list[str]:
        """Settings out of range, one line each (checked when the config is resolved)."""
        checks = [("top_k", self.top_k >= 1, ">= 1"),
                  ("gate_budget", self.gate_budget in GATE_BUDGETS, f"one of {', '.join(GATE_BUDGETS)}"),
                  ("gate_steps", self.gate_steps is None or self.gate_steps >= 0, "null or >= 0"),
                  ("gate_lr", self.gate_lr is None or self.gate_lr > 0, "null or > 0"),
                  ("gate_accum", self.gate_accum is None or self.gate_accum >= 1, "null or >= 1"),
                  ("gate_fraction", self.gate_fraction is None or 0.0 <= self.gate_fraction <= 1.0,
                   "null or in [0, 1]"),
                  ("gate_init", self.gate_init in GATE_INITS, f"one of {', '.join(GATE_INITS)}"),
                  ("dropout", 0 <= self.dropout < 1, "in [0, 1)")]
        out = [f"{name}: {getattr(self, name)!r} must be {want}" for name, ok, want in checks if not ok]
        if not out and self.gate_settings()["placement"] == "within" and self.gate_settings()["accum"] != 1:
            out.append(f"gate_accum: {self.gate_accum!r} needs gate_budget: phatgoose (gates inside the task's "
                       "budget train on the trainer's batches)")
        return out


class RoutingCL(PerTaskLora):
    name = "routing-cl"

    def __init__(self, config: RoutingCLConfig):
        super().__init__(config)
        problems = config.problems()
        if problems:
            raise BadInputError([f"method.{p}" for p in problems])
        self.gate = config.gate_settings()
        self.gate_log: list[dict] = []  # per task trained here: the gate budget as it ran (phatgoose)
        self._records: list = []
        self.gates: dict[str, list[nn.Parameter]] = {}  # layer key -> [v_k (d_in,)], one per expert
        self._phase = "expert"  # expert | gates (training)
        self._mode = "eval"  # expert | gates | eval: what the next forward routes by
        self._mask: Tensor | None = None
        self._input_sums: dict[str, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ lifecycle
    def setup(self, services: Services) -> None:
        super().setup(services)
        self.gates = {key: [] for key in self.layers}
        self.context.route = self._route

    def before_task(self, task_index: int, task) -> None:
        super().before_task(task_index, task)  # a fresh trainable expert at index task_index
        for key, layer in self.layers.items():
            w = layer.base.weight
            dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
            self.gates[key].append(nn.Parameter(torch.zeros(layer.in_features, dtype=dtype, device=w.device),
                                                requires_grad=False))

    def gate_phase_steps(self, total_steps: int) -> int:
        """Optimizer steps of the gate phase within a task of ``total_steps`` (``ours``; 0 for ``phatgoose``,
        whose gates train after the task's budget)."""
        if self.gate["placement"] != "within":
            return 0
        if total_steps < 2 or self.gate["steps"] == 0 or self.cfg.gate_fraction == 0:
            return 0
        cap = self.gate["steps"]
        if self.cfg.gate_fraction is not None:
            cap = min(cap, max(1, math.ceil(self.cfg.gate_fraction * total_steps)))
        return min(cap, total_steps - 1)

    def phases(self, task_index: int, total_steps: int) -> list[Phase]:
        gate = self.gate_phase_steps(total_steps)
        out = [Phase("expert", total_steps - gate)]
        if gate:
            out.append(Phase("gates", gate, lr=self.gate["lr"]))
        return out

    def begin_phase(self, phase: Phase) -> None:
        t = self.current_task
        self._phase = phase.name
        freeze_all_experts(self.layers)
        for gs in self.gates.values():
            for g in gs:
                g.requires_grad_(False)
        if phase.name == "expert":
            for layer in self.layers.values():
                layer.set_expert_trainable(t, True)
            if self.cfg.gate_init == "input_mean":
                self._input_sums = {}
                self.context.capture = self._capture
        elif phase.name == "gates":
            for gs in self.gates.values():
                gs[t].requires_grad_(True)
        else:
            raise RuntimeError(f"routing-cl: unknown phase '{phase.name}'")

    def end_phase(self, phase: Phase) -> None:
        self.context.capture = None
        if phase.name == "expert" and self.cfg.gate_init == "input_mean":
            self._init_gates_from_inputs()

    def training_records(self, task_index: int, task, stream: list) -> list:
        self._records = list(task.train)  # the phatgoose gate loop draws from them after the expert's steps
        return self._records

    def after_task(self, task_index: int) -> None:
        if self.gate["placement"] == "after" and self.gate["steps"] > 0 and self._records:
            self.train_gates_after(task_index)
        self._records = []
        super().after_task(task_index)  # freezes every expert, current_task = None
        for gs in self.gates.values():
            for g in gs:
                g.requires_grad_(False)
        self.context.capture = None
        self._mode = "eval"

    def trainable_parameters(self) -> list[nn.Parameter]:
        gates = [g for gs in self.gates.values() for g in gs if g.requires_grad]
        return super().trainable_parameters() + gates

    # ------------------------------------------------------------------ gates after the expert (phatgoose)
    def train_gates_after(self, task_index: int) -> dict:
        """Train task ``task_index``'s gate vectors on its frozen expert: ``gate["steps"]`` AdamW steps, each of
        ``gate["accum"]`` micro-batches of ``train.batch_size`` records per process, lr ``gate["lr"]`` constant
        after a linear warm-up (``train.warmup_ratio``); gradients averaged over processes. Returns (and logs in
        ``gate_log``) the budget as it ran."""
        train = self.services.run_config.train
        backbone, model = self.services.backbone, self.services.backbone.model
        state = PartialState()
        steps, accum, lr = int(self.gate["steps"]), int(self.gate["accum"]), float(self.gate["lr"])
        self.begin_phase(Phase("gates", steps, lr=lr))  # (input_mean gates were set at the expert phase's end)
        params = [gs[task_index] for gs in self.gates.values()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        seed = random.Random(f"gates:{getattr(self.services.run_config, 'seed', 0)}:{task_index}").randrange(2 ** 31)
        batches = global_batches(len(self._records), steps * accum, train.batch_size * state.num_processes, seed)
        device = next(model.parameters()).device
        was_training, micro, last = model.training, 0, None
        model.train()
        try:
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = lr * lr_factor(step, steps, train.warmup_ratio, "constant")
                finite = True
                for _ in range(accum):
                    local = [self._records[i] for i in batches[micro][state.process_index::state.num_processes]]
                    micro += 1
                    batch = {k: v.to(device) if torch.is_tensor(v) else v
                             for k, v in backbone.collate(local, train=True).items()}
                    self.prepare_batch(batch, train=True)
                    loss, _ = self.compute_loss(model, batch)
                    finite = finite and bool(torch.isfinite(loss.detach()))
                    (loss / accum).backward()
                    last = float(loss.detach())
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad = all_reduce_sum(p.grad) / state.num_processes
                norm = torch.nn.utils.clip_grad_norm_(params, train.grad_clip if train.grad_clip > 0 else float("inf"))
                if not finite or not bool(torch.isfinite(norm)):
                    if train.nonfinite != "skip":
                        raise TrainingFault(f"task {task_index}, gate step {step + 1} (phatgoose gates): the loss or "
                                            "gradient is not finite (lower method.gate_lr, or train.nonfinite=skip)")
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            model.train(was_training)
            self.context.capture = None
        record = {"task": task_index, "steps": steps, "micro_batches": micro, "accum": accum, "lr": lr,
                  "final_loss": None if last is None else round(last, 4)}
        self.gate_log.append(record)
        self.services.log(f"    gates (phatgoose budget): {steps} steps x {accum} micro-batches at lr {lr:g} after "
                          f"the expert's, final loss {record['final_loss']}")
        return record

    def stream_analysis(self, tasks) -> dict:
        out = {"budget": self.cfg.gate_budget, **{k: v for k, v in self.gate.items()}}
        if self.gate_log:
            out["per_task"] = list(self.gate_log)
        return {"gate_training": out}

    # ------------------------------------------------------------------ gate initialisation (input_mean)
    def _capture(self, layer, x: Tensor) -> None:
        x = x.detach().float()
        mask = self._mask
        if mask is None or tuple(mask.shape) != tuple(x.shape[:-1]):
            mask = torch.ones(x.shape[:-1], device=x.device)
        mask = mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)
        s, n = (x * mask).flatten(0, -2).sum(0).double(), mask.sum().double()
        if layer.key in self._input_sums:
            s0, n0 = self._input_sums[layer.key]
            s, n = s0 + s, n0 + n
        self._input_sums[layer.key] = (s, n)

    @torch.no_grad()
    def _init_gates_from_inputs(self) -> None:
        t = self.current_task
        for key, gs in self.gates.items():
            if key not in self._input_sums:
                continue
            s, n = self._input_sums[key]
            s, n = all_reduce_sum(s), all_reduce_sum(n)
            gs[t].copy_((s / n.clamp(min=1)).to(gs[t].dtype))
        self._input_sums = {}

    # ------------------------------------------------------------------ routing
    def prepare_batch(self, batch: dict, train: bool) -> None:
        self._mode = self._phase if train else "eval"  # evaluation reads no task id
        self._mask = batch.get("attention_mask") if train else None

    def _route(self, layer, x: Tensor) -> Tensor:
        K = layer.num_experts
        if self._mode == "eval":
            return self.routing_weights(layer.key, x)
        t = self.current_task
        if t is None or t >= K:
            raise RuntimeError(f"routing-cl: training forward without a current expert ({layer.key}, K={K})")
        if self._mode == "gates":
            return sigmoid_gate_weights(x, self.gates[layer.key][t], t, K)  # (B, T, K)
        w = torch.zeros(x.shape[0], K, device=x.device)
        w[:, t] = 1.0  # isolation: the task's expert alone
        return w

    def stacked_gates(self, key: str) -> Tensor:
        """(K, d_in) the gate vectors of every expert at one adapted linear."""
        return torch.stack([g.detach() for g in self.gates[key]])

    def routing_weights(self, key: str, x: Tensor) -> Tensor:
        """x: (B, T, d_in) inputs of the adapted linear ``key`` -> (B, T, K) evaluation weights."""
        return token_topk_routing(x, self.stacked_gates(key).to(x.device), self.cfg.top_k, self.cfg.ln_eps)

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors, meta = super().state()
        for key, gs in self.gates.items():
            if gs:
                tensors[f"routing_cl.gates.{key}"] = self.stacked_gates(key).cpu().contiguous()
        K = self.num_experts
        meta["routing_cl"] = {"num_experts": K, "top_k": self.cfg.top_k, "gate_init": self.cfg.gate_init,
                              "gate_log": list(self.gate_log)}
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        K = int(meta["routing_cl"]["num_experts"])
        self.gate_log = list(meta["routing_cl"].get("gate_log", []))
        for key, layer in self.layers.items():
            if layer.num_experts != K:
                raise RuntimeError(f"routing-cl state: {key} has {layer.num_experts} experts, the gates {K}")
            self.gates[key] = []
            if K == 0:
                continue
            stacked = tensors[f"routing_cl.gates.{key}"]
            if tuple(stacked.shape) != (K, layer.in_features):
                raise RuntimeError(f"routing-cl state: gates of {key} have shape {tuple(stacked.shape)}, "
                                   f"expected {(K, layer.in_features)}")
            device = layer.base.weight.device
            self.gates[key] = [nn.Parameter(stacked[k].clone().to(device), requires_grad=False) for k in range(K)]
        self._mode = "eval"

    # ------------------------------------------------------------------ accounting
    @property
    def num_experts(self) -> int:
        return len(next(iter(self.gates.values()), []))

    def param_counts(self) -> dict[str, int]:
        K = self.num_experts
        if K == 0:
            return {"trainable": 0, "stored": 0, "active_per_sample": 0}
        experts = sum(l.experts_A[k].numel() + l.experts_B[k].numel() for l in self.layers.values()
                      for k in range(l.num_experts))
        one_gate_set = sum(layer.in_features for layer in self.layers.values())
        one_expert = sum(lora_params(layer, self.cfg.rank) for layer in self.layers.values())
        return {"trainable": one_expert + one_gate_set, "stored": experts + K * one_gate_set,
                "active_per_sample": min(self.cfg.top_k, K) * one_expert + K * one_gate_set}
