"""`routing-cl`: routing-based continual learning (Mohta et al., arXiv 2511.01831; PHATGOOSE-style), PEERS.md.

Pure isolation plus a token-level router learned after the fact. Per task t (expert index == task index):

1. phase ``expert``: a fresh LoRA expert (rank 8, alpha 16) on every adapted linear trains alone on the task:
   routing weight 1 on it, 0 on every earlier expert (they are frozen); the base is frozen.
2. phase ``gates``: the expert is frozen; per adapted linear a gate vector v_t (d_in) trains with
   ``y = W0 x + sigmoid(v_t . x) s B_t A_t x`` per token (only expert t active), at its own lr (1e-3).
3. evaluation (no task id), per token and per adapted linear: ``score_i = LN(x) . LN(v_i) / sqrt(d)``
   (LayerNorm without affine), keep the top-k (k = 2, or all when fewer experts), softmax the kept scores,
   mix those experts (per-token weights (B, T, K), 0 for the dropped experts).

Choices where the spec is silent:
* Gate vectors start at zero (as in the PHATGOOSE authors' code: sigmoid(0) = 1/2 for every token);
  ``gate_init: input_mean`` starts them at the mean input of the task's tokens at that linear instead
  (accumulated over the expert phase, padding excluded).
* The gate phase comes out of the task's step budget (every method runs ``steps_per_task`` optimizer steps):
  ``gate = min(gate_steps, ceil(gate_fraction * steps_per_task))`` (at least 1, leaving the expert at least
  1); the expert phase gets the rest. ``gate_fraction: 0.2`` only binds below 500 steps a task (the built-in
  stream); ``null`` removes the cap.
* ``active_per_sample`` counts, per token, the top-k experts' LoRA parameters plus every gate vector (all of
  them are scored); ``stored`` counts every expert and every gate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cramcl.errors import BadInputError
from cramcl.methods.base import Phase, Services, freeze_all_experts, lora_params
from cramcl.methods.expert_merging import sigmoid_gate_weights, token_topk_routing
from cramcl.methods.lora_ft import LoraFTConfig
from cramcl.methods.per_task import PerTaskLora
from cramcl.utils.dist import all_reduce_sum

GATE_INITS = ("zeros", "input_mean")


@dataclass
class RoutingCLConfig(LoraFTConfig):
    top_k: int = 2
    gate_steps: int = 100
    gate_fraction: float | None = 0.2  # cap on the gate phase as a share of steps_per_task; None: no cap
    gate_lr: float = 1.0e-3
    gate_init: str = "zeros"  # zeros (PHATGOOSE's code) | input_mean
    ln_eps: float = 1.0e-5


class RoutingCL(PerTaskLora):
    name = "routing-cl"

    def __init__(self, config: RoutingCLConfig):
        super().__init__(config)
        problems = []
        if config.top_k < 1:
            problems.append(f"method.top_k: must be >= 1, got {config.top_k}")
        if config.gate_steps < 0:
            problems.append(f"method.gate_steps: must be >= 0, got {config.gate_steps}")
        if config.gate_fraction is not None and not 0.0 <= config.gate_fraction <= 1.0:
            problems.append(f"method.gate_fraction: must lie in [0, 1] (or be null), got {config.gate_fraction}")
        if config.gate_init not in GATE_INITS:
            problems.append(f"method.gate_init: '{config.gate_init}' is not one of {', '.join(GATE_INITS)}")
        if problems:
            raise BadInputError(problems)
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
        """Optimizer steps of the gate phase within a task of ``total_steps`` (see the module docstring)."""
        if total_steps < 2 or self.cfg.gate_steps == 0 or self.cfg.gate_fraction == 0:
            return 0
        cap = self.cfg.gate_steps
        if self.cfg.gate_fraction is not None:
            cap = min(cap, max(1, math.ceil(self.cfg.gate_fraction * total_steps)))
        return min(cap, total_steps - 1)

    def phases(self, task_index: int, total_steps: int) -> list[Phase]:
        gate = self.gate_phase_steps(total_steps)
        out = [Phase("expert", total_steps - gate)]
        if gate:
            out.append(Phase("gates", gate, lr=self.cfg.gate_lr))
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

    def after_task(self, task_index: int) -> None:
        super().after_task(task_index)  # freezes every expert, current_task = None
        for gs in self.gates.values():
            for g in gs:
                g.requires_grad_(False)
        self.context.capture = None
        self._mode = "eval"

    def trainable_parameters(self) -> list[nn.Parameter]:
        gates = [g for gs in self.gates.values() for g in gs if g.requires_grad]
        return super().trainable_parameters() + gates

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
        meta["routing_cl"] = {"num_experts": K, "top_k": self.cfg.top_k, "gate_init": self.cfg.gate_init}
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        K = int(meta["routing_cl"]["num_experts"])
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
