"""A frozen linear with a LoRA buffer and a list of ragged-rank LoRA experts, mixed per sample (or per token).

Scale convention (one, stated once): expert k adds ``scale_k * B_k @ A_k``. A plain LoRA expert created with
``add_expert(rank, alpha=...)`` has ``scale_k = alpha / rank``; an expert made from factors that already carry
their scale (CRAM's consolidation) has ``scale_k = 1``. The buffer adds ``buffer_scale * B_buf @ A_buf`` with
``buffer_scale = alpha / R``.

Forward, for x: (B, T, d_in) and routing weights w: (B, K) or (B, T, K) (K experts, None = all ones):
    h = dropout(x) @ A_cat^T                      (B, T, sum_k r_k)   one matmul over the active experts
    h = h * (w expanded to each expert's columns) * scale per column
    y = W0 x + h @ B_cat^T  [+ w_buf * buffer_scale * (dropout(x) @ A_buf^T) @ B_buf^T]
Precision: factors are stored in float32 (the optimizer's master copy, also under a bf16 model). A half-precision
input is never upcast: the factors (r x d, small) are cast to the input's dtype and the matmuls run in it, as
autocast would run them; upcasting x instead would write every activation again at twice its bytes in each
adapted module (128 per LLaVA-7B forward). Float32 inputs compute in the factors' dtype.
Experts of different ranks are concatenated, never padded. Only the *active* experts run: the method names
them per batch (``RoutingContext.active``: the experts some sample of the batch can route to, e.g. CRAM's
groups of the batch), so a sample's cost does not grow with experts it can never use. Frozen experts'
concatenated factors, column owners and scales are built once per active set and reused until an expert
changes (added, made trainable, or written in place); a trainable expert joins with its own matmul, never
copied into the concatenation.
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
    active: tuple[int, ...] | None = None  # experts the batch may use (their weights may be nonzero); None = all
    extra: dict = field(default_factory=dict)

    def reset(self) -> None:
        self.route = None
        self.buffer_weight = None
        self.capture = None
        self.active = None
        self.extra.clear()


def _is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


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
        self._frozen_cache: dict = {}  # active frozen experts -> (versions, A_cat, B_cat, weight columns, scales)
        self._refs: tuple | None = None  # plain lists of the experts' parameters (see _expert_refs)

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
        self._frozen_cache.clear()
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
    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        ctx = self.context
        if ctx.capture is not None:
            ctx.capture(self, x)
        has_buffer = self.buffer_A is not None and ctx.buffer_weight is not None
        active = range(self.num_experts) if ctx.active is None else ctx.active
        if not active and not has_buffer:
            return y
        xd = self.dropout(x)
        if not _is_half(x.dtype):  # fp32 inputs: compute in the factors' dtype (fp64 tests stay fp64)
            xd = xd.to(self._expert_refs()[0][0].dtype if self.num_experts else self.buffer_A.dtype)
        delta = torch.zeros((), dtype=xd.dtype, device=xd.device)
        if active:
            weights = ctx.route(self, x) if ctx.route is not None else None
            delta = self._experts_forward(xd, weights, tuple(active))
        if has_buffer:
            w = ctx.buffer_weight
            buf = (xd @ self.buffer_A.to(xd.dtype).t()) @ self.buffer_B.to(xd.dtype).t() * self.buffer_scale
            if isinstance(w, Tensor):
                w = w.to(buf.dtype).view(-1, *([1] * (buf.dim() - 1)))
            delta = delta + w * buf
        return y + delta.to(y.dtype)

    def _expert_refs(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The experts' A's and B's as plain lists: indexing a ParameterList costs microseconds per access, which a
        forward would pay per expert in each of a model's adapted modules (and per decoding step). Rebuilt
        whenever the ParameterLists are replaced or grow (add_expert, loading a state)."""
        refs = self._refs
        if refs is None or refs[0] is not self.experts_A or refs[1] is not self.experts_B or len(refs[2]) != len(self.experts_A):
            refs = self._refs = (self.experts_A, self.experts_B, list(self.experts_A), list(self.experts_B))
        return refs[2], refs[3]

    def _frozen_factors(self, frozen: tuple[int, ...], device, dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A_cat (R, d_in), B_cat (d_out, R), owner (R,) expert index per column, scale (R,)) of frozen
        experts in the compute ``dtype``, built once and reused while none of them changes (``_version``
        counts in-place writes)."""
        As, Bs = self._expert_refs()
        versions = tuple((id(As[k]), As[k]._version, id(Bs[k]), Bs[k]._version, self.expert_scales[k]) for k in frozen)
        hit = self._frozen_cache.get(frozen)
        if hit is not None and hit[0] == versions and hit[1].device == device and hit[1].dtype == dtype:
            return hit[1:]
        with torch.no_grad():
            A_cat = torch.cat([self.experts_A[k] for k in frozen], dim=0).to(dtype)
            B_cat = torch.cat([self.experts_B[k] for k in frozen], dim=1).to(dtype)
        owner = torch.tensor([k for k in frozen for _ in range(self.experts_A[k].shape[0])], device=device)
        scale = torch.tensor([self.expert_scales[k] for k in frozen for _ in range(self.experts_A[k].shape[0])],
                             dtype=A_cat.dtype, device=device)
        self._frozen_cache[frozen] = (versions, A_cat, B_cat, owner, scale)
        return A_cat, B_cat, owner, scale

    def _experts_forward(self, xd: Tensor, weights: Tensor | None, active: tuple[int, ...]) -> Tensor:
        """xd: (B, T, d_in); weights: None | (B, K) | (B, T, K) over all K experts, zero outside ``active``
        -> (B, T, d_out), summed over the active experts only."""
        if weights is not None:
            if weights.shape[0] != xd.shape[0] or weights.shape[-1] != self.num_experts:
                raise RuntimeError(f"{self.key}: routing weights {tuple(weights.shape)} do not fit a batch of "
                                   f"{xd.shape[0]} over {self.num_experts} experts (stale routing state?)")
            weights = weights.to(xd.dtype)
            if weights.dim() == 2 and xd.dim() == 3:
                weights = weights.unsqueeze(1)  # (B, 1, K): one weight per sample for every token
        As, Bs = self._expert_refs()
        frozen = tuple(k for k in active if not As[k].requires_grad)
        out = None
        if frozen:
            A_cat, B_cat, owner, scale = self._frozen_factors(frozen, xd.device, xd.dtype)
            h = xd @ A_cat.t()  # (B, T, R)
            h = h * (scale if weights is None else weights[..., owner] * scale)
            out = h @ B_cat.t()
        for k in active:  # trainable experts (one in CRAM's stable phase): their own matmul, never copied
            if not As[k].requires_grad:
                continue
            h = (xd @ As[k].to(xd.dtype).t()) * self.expert_scales[k]
            if weights is not None:
                h = h * weights[..., k:k + 1]
            part = h @ Bs[k].to(xd.dtype).t()
            out = part if out is None else out + part
        return out

    def extra_repr(self) -> str:
        return f"key={self.key}, ranks={self.ranks}, buffer={'on' if self.buffer_A is not None else 'off'}"
