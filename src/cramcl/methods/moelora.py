"""`moelora`: the MoELoRA baseline of CoIN (Chen et al., 2024): a dense mixture of small LoRA experts.

Every adapted linear holds E LoRA experts that split a total rank r evenly (r = 8, E = 4: rank 2 each) and a
bias-free router ``W_r: Linear(d_in -> E)``. Per token n:

    g_n = softmax(W_r x_n)                                   (E,)  dense: every expert, no top-k
    y_n = W0 x_n + sum_e g_{n,e} * s * B_e A_e x_n           s = alpha / r (the total rank, as in MOELoRA)

Experts and routers are shared by all tasks and all of them train on every task (no freezing, no task id,
no load-balancing loss), so the method forgets like sequential LoRA with a different parameterisation.
The routers live on the adapted linears (``layer.moe_router``) so they move, wrap (DDP) and count with
the model; they are saved under ``moelora.router.<canonical key>``.

Source: CoIN's MoELoRA, zackschen/CoIN ``CoIN/peft/tuners/coinmoelora.py`` (Prism carries a port,
``PEFT/tuners/custom/moelora.py``); read, not copied. Where we differ: the experts sit on q, k, v, o of every
decoder layer (the adapted set every method shares); the router is per adapted linear and sees the
linear's own input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cramcl.errors import BadInputError
from cramcl.methods.base import Method, Services

ROUTER_PREFIX = "moelora.router."


@dataclass
class MoELoraConfig:
    rank: int = 8  # total rank r over all experts of one linear
    num_experts: int = 4  # E; each expert has rank r / E
    alpha: float = 16.0  # scale alpha / r for every expert
    dropout: float = 0.05


def router_weights(router: nn.Linear, x: Tensor) -> Tensor:
    """Dense per-token routing: x (B, T, d_in) -> softmax over experts (B, T, E), in the router's dtype."""
    return torch.softmax(router(x.to(router.weight.dtype)), dim=-1)


class MoELora(Method):
    name = "moelora"

    def __init__(self, config: MoELoraConfig):
        super().__init__(config)
        if config.num_experts < 1 or config.rank % config.num_experts:
            raise BadInputError(f"method.rank: {config.rank} must split evenly into method.num_experts = "
                                f"{config.num_experts} experts")

    @property
    def expert_rank(self) -> int:
        return self.cfg.rank // self.cfg.num_experts

    def setup(self, services: Services) -> None:
        super().setup(services)
        r, E = self.expert_rank, self.cfg.num_experts
        for layer in self.layers.values():
            for _ in range(E):
                # add_expert's scale is alpha'/rank_e; alpha' = alpha * rank_e / r gives alpha / r
                layer.add_expert(r, alpha=self.cfg.alpha * r / self.cfg.rank)
            w = layer.base.weight
            router = nn.Linear(layer.in_features, E, bias=False, device=w.device,
                               dtype=layer.experts_A[0].dtype)  # default (Kaiming-uniform) init
            layer.add_module("moe_router", router)
        self.context.route = lambda layer, x: router_weights(layer.moe_router, x)

    def _set_trainable(self, trainable: bool) -> None:
        for layer in self.layers.values():
            for k in range(layer.num_experts):
                layer.set_expert_trainable(k, trainable)
            layer.moe_router.requires_grad_(trainable)

    def before_task(self, task_index: int, task) -> None:
        super().before_task(task_index, task)
        self._set_trainable(True)  # every expert and router, on every task (also after a resume)

    def after_task(self, task_index: int) -> None:
        self._set_trainable(False)
        self.current_task = None

    # ---- state
    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors, meta = super().state()
        for key, layer in self.layers.items():
            tensors[ROUTER_PREFIX + key] = layer.moe_router.weight.detach().cpu().contiguous()
        meta["moelora"] = {"num_experts": self.cfg.num_experts, "expert_rank": self.expert_rank}
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        info = meta.get("moelora", {})
        if info.get("num_experts") != self.cfg.num_experts:
            raise RuntimeError(f"moelora: the checkpoint has {info.get('num_experts')} experts per linear, "
                               f"the config {self.cfg.num_experts}")
        routers = {k: v for k, v in tensors.items() if k.startswith(ROUTER_PREFIX)}
        super().load_state({k: v for k, v in tensors.items() if k not in routers}, meta)
        for key, layer in self.layers.items():
            with torch.no_grad():
                layer.moe_router.weight.copy_(routers[ROUTER_PREFIX + key])
            layer.moe_router.requires_grad_(False)

    # ---- accounting: the base counts every non-base parameter of the layers (experts + routers)
    def param_counts(self) -> dict[str, int]:
        counts = super().param_counts()
        counts["trainable"] = counts["stored"]  # everything trains on every task; dense: all active
        return counts

    def report_sections(self) -> list[tuple[str, str]]:
        text = (f"{self.cfg.num_experts} experts of rank {self.expert_rank} per adapted linear "
                f"({len(self.layers)} linears), dense per-token softmax routers; all train on every task.")
        return [("MoELoRA", text)]
