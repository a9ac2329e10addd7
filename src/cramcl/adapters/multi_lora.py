"""A frozen linear with a LoRA buffer and a list of ragged-rank LoRA experts, mixed per sample (or per token).

Scale convention (one, stated once): expert k adds ``scale_k * B_k @ A_k``. A plain LoRA expert created with
``add_expert(rank, alpha=...)`` has ``scale_k = alpha / rank``; an expert made from factors that already carry
their scale (CRAM's consolidation) has ``scale_k = 1``. The buffer adds ``buffer_scale * B_buf @ A_buf`` with
``buffer_scale = alpha / R``.

Forward, for x: (B, T, d_in) and routing weights w: (B, K) or (B, T, K) (K experts, None = all ones):
    h = dropout(x) @ A_cat^T                      (B, T, sum_k r_k)   one matmul over every expert
    h = h * (w expanded to each expert's columns) * scale per column
    y = W0 x + h @ B_cat^T  [+ w_buf * buffer_scale * (dropout(x) @ A_buf^T) @ B_buf^T]
Experts of different ranks are concatenated, never padded, never looped over.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

RouteFn = Callable[["MultiLoRALinear", Tensor], "Tensor | None"]


@dataclass
class RoutingContext:
    """State shared by every adapted linear of one model, set by the method before each forward.

    ``route(layer, x)`` returns the layer's expert weights ((B, K) or (B, T, K)) or None for "all ones";
    ``buffer_weight`` is None (buffer off), a float, or (B,) per-sample weights.
    ``capture`` (when set) is called with (layer, dropout-free input x) so a method can record inputs
    (CRAM's orthogonality penalty pools them over image tokens).
    """

    route: RouteFn | None = None
    buffer_weight: float | Tensor | None = None
    capture: Callable[["MultiLoRALinear", Tensor], None] | None = None
    extra: dict = field(default_factory=dict)

    def reset(self) -> None:
        self.route = None
        self.buffer_weight = None
        self.capture = None
        self.extra.clear()


class MultiLoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear``; holds an optional buffer LoRA and K experts of ragged ranks."""

    def __init__(self, base: nn.Linear, key: str, layer_index: int, context: RoutingContext, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.key = key  # canonical: "layers.<i>.<proj>"
        self.layer_index = layer_index
        self.context = context
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.experts_A = nn.ParameterList()
        self.experts_B = nn.ParameterList()
        self.expert_scales: list[float] = []
        self.buffer_A: nn.Parameter | None = None
        self.buffer_B: nn.Parameter | None = None
        self.buffer_scale = 0.0
        self._col_owner: Tensor | None = None  # (sum r,) expert index of each concatenated column

    # ------------------------------------------------------------------ shapes
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def num_experts(self) -> int:
        return len(self.experts_A)

    @property
    def ranks(self) -> list[int]:
        return [a.shape[0] for a in self.experts_A]

    def _factory(self) -> dict:
        w = self.base.weight
        return {"device": w.device, "dtype": torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype}

    # ------------------------------------------------------------------ experts
    def add_expert(self, rank: int | None = None, *, alpha: float | None = None, A: Tensor | None = None,
                   B: Tensor | None = None, scale: float | None = None) -> int:
        """Append an expert: either a fresh LoRA (A Kaiming-uniform, B = 0, scale alpha/rank) or given factors
        A: (r, d_in), B: (d_out, r) with ``scale`` (default 1). Returns its index."""
        fk = self._factory()
        if A is None:
            A = torch.empty(rank, self.in_features, **fk)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            B = torch.zeros(self.out_features, rank, **fk)
            scale = (alpha if alpha is not None else rank) / rank
        else:
            assert B is not None and A.shape[0] == B.shape[1], "A: (r, d_in) and B: (d_out, r) must agree on r"
            A, B = A.detach().to(**fk).clone(), B.detach().to(**fk).clone()
            scale = 1.0 if scale is None else scale
        self.experts_A.append(nn.Parameter(A))
        self.experts_B.append(nn.Parameter(B))
        self.expert_scales.append(float(scale))
        self._col_owner = None
        return self.num_experts - 1

    def set_expert_trainable(self, index: int, trainable: bool) -> None:
        self.experts_A[index].requires_grad_(trainable)
        self.experts_B[index].requires_grad_(trainable)

    def expert_delta(self, index: int) -> Tensor:
        """The expert's weight update, (d_out, d_in)."""
        return self.expert_scales[index] * self.experts_B[index] @ self.experts_A[index]

    # ------------------------------------------------------------------ buffer
    def init_buffer(self, rank: int, alpha: float) -> None:
        """(Re)create the buffer LoRA: A random, B = 0, so it starts as the identity."""
        fk = self._factory()
        A = torch.empty(rank, self.in_features, **fk)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.buffer_A = nn.Parameter(A)
        self.buffer_B = nn.Parameter(torch.zeros(self.out_features, rank, **fk))
        self.buffer_scale = alpha / rank

    def drop_buffer(self) -> None:
        self.buffer_A = None
        self.buffer_B = None

    # ------------------------------------------------------------------ forward
    def _column_owner(self, device) -> Tensor:
        if self._col_owner is None or self._col_owner.device != device:
            owner = [k for k, r in enumerate(self.ranks) for _ in range(r)]
            self._col_owner = torch.tensor(owner, dtype=torch.long, device=device)
        return self._col_owner

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        ctx = self.context
        if ctx.capture is not None:
            ctx.capture(self, x)
        has_buffer = self.buffer_A is not None and ctx.buffer_weight is not None
        if self.num_experts == 0 and not has_buffer:
            return y
        xd = self.dropout(x).to(self.experts_A[0].dtype if self.num_experts else self.buffer_A.dtype)
        delta = torch.zeros((), dtype=xd.dtype, device=xd.device)
        if self.num_experts:
            weights = ctx.route(self, x) if ctx.route is not None else None
            delta = self._experts_forward(xd, weights)
        if has_buffer:
            w = ctx.buffer_weight
            buf = (xd @ self.buffer_A.t()) @ self.buffer_B.t() * self.buffer_scale
            if isinstance(w, Tensor):
                w = w.to(buf.dtype).view(-1, *([1] * (buf.dim() - 1)))
            delta = delta + w * buf
        return y + delta.to(y.dtype)

    def _experts_forward(self, xd: Tensor, weights: Tensor | None) -> Tensor:
        """xd: (B, T, d_in); weights: None | (B, K) | (B, T, K) -> (B, T, d_out)."""
        A_cat = torch.cat(list(self.experts_A), dim=0)  # (R, d_in)
        B_cat = torch.cat(list(self.experts_B), dim=1)  # (d_out, R)
        owner = self._column_owner(xd.device)
        col_scale = torch.tensor(self.expert_scales, dtype=xd.dtype, device=xd.device)[owner]  # (R,)
        h = xd @ A_cat.t()  # (B, T, R)
        if weights is None:
            h = h * col_scale
        else:
            if weights.shape[0] != xd.shape[0] or weights.shape[-1] != self.num_experts:
                raise RuntimeError(f"{self.key}: routing weights {tuple(weights.shape)} do not fit a batch of "
                                   f"{xd.shape[0]} over {self.num_experts} experts (stale routing state?)")
            w_cols = weights.to(xd.dtype)[..., owner] * col_scale  # (B, R) or (B, T, R)
            if w_cols.dim() == 2 and h.dim() == 3:
                w_cols = w_cols.unsqueeze(1)
            h = h * w_cols
        return h @ B_cat.t()

    def extra_repr(self) -> str:
        return f"key={self.key}, ranks={self.ranks}, buffer={'on' if self.buffer_A is not None else 'off'}"
