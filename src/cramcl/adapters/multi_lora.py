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
changes (added, made trainable, or written in place). A trainable expert joins with its own matmul chain,
except where the forward cannot train it (grad disabled: evaluation, generation), where it is concatenated like
a frozen one and re-concatenated after each write, or where ``RoutingContext.fuse_trainable`` asks for one
chain (its factors appended to the frozen concatenation in every forward: one pass over the activations
instead of two; off on the CPU by default, where it would change the order of float sums).
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
    # a setting, not per batch (reset keeps it): train a trainable expert inside the frozen experts' matmul
    # chain; None = on for inputs off the CPU (docs/cram.md, "Speed")
    fuse_trainable: bool | None = None

    def reset(self) -> None:
        self.route = None
        self.buffer_weight = None
        self.capture = None
        self.active = None
        self.extra.clear()


@dataclass(eq=False)
class _Plan:
    """A layer's cached way to run one set of active experts (see ``MultiLoRALinear._plan``)."""
    refs: list  # the layer's list of A parameters when the plan was made (identity: a rebuilt list = stale)
    brefs: list  # ... and of B parameters
    state: list  # per active expert: True if it trains here, else its A's and B's in-place write counters
    scales: list
    frozen: tuple[int, ...]  # concatenated once (cached)
    trainable: tuple[int, ...]  # read afresh in every forward
    fused: bool = False  # the trainable experts' columns follow the frozen ones in one chain
    A_cat: Tensor | None = None  # (R, d_in) frozen experts' A's, in the compute dtype
    B_cat: Tensor | None = None  # (d_out, R)
    owner: Tensor | None = None  # (R [+ trainable ranks if fused],) expert of each column
    scale: Tensor | None = None  # (R [+ ...],) its scale
    _weights_seen: Tensor | None = None  # the weights the cached multiplier was made from (held, so its memory
    _multiplier: Tensor | None = None  # cannot be reused by another batch's weights while cached)
    _seen_version: int = -1  # their in-place write counter then (views share it, so it is kept as a number)
    _seen_per_token: bool = False

    def column_weights(self, weights: Tensor | None, per_token: bool) -> Tensor:
        """Per-column multiplier ``weights[..., owner] * scale``: (R,) for no weights, (B, 1, R) for per-sample
        weights (B, K) when ``per_token`` inputs (B, T, d) take them, else weights' shape with K -> R. Reused
        while the same weights come back (every decoding step of a batch, every module of one layer): a
        gather and a multiply per module and step saved."""
        if weights is None:
            return self.scale
        if weights.requires_grad:  # training the routing: a fresh graph every step, nothing to reuse
            return _per_sample(weights[..., self.owner] * self.scale, per_token)
        seen = self._weights_seen
        if seen is weights and self._seen_version == weights._version and self._seen_per_token == per_token:
            return self._multiplier  # the same tensor object (CramMethod's per-layer views): the fast check
        if (seen is None or seen.data_ptr() != weights.data_ptr() or seen.shape != weights.shape
                or seen.stride() != weights.stride() or self._seen_version != weights._version
                or seen.dtype != weights.dtype or seen.device != weights.device or self._seen_per_token != per_token):
            self._multiplier = _per_sample(weights[..., self.owner] * self.scale, per_token)
        self._weights_seen, self._seen_version, self._seen_per_token = weights, weights._version, per_token
        return self._multiplier


def _per_sample(multiplier: Tensor, per_token: bool) -> Tensor:
    """(B, R) -> (B, 1, R) where inputs are (B, T, d): one multiplier per sample for every token."""
    return multiplier.unsqueeze(1) if per_token and multiplier.dim() == 2 else multiplier


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
        self._plans: dict = {}  # (active experts, device, dtype) -> _Plan
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
        self._plans.clear()
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
        delta = None  # no zeros tensor to add to: one kernel launch less per module and decoding step
        if active:
            weights = ctx.route(self, x) if ctx.route is not None else None
            delta = self._experts_forward(xd, weights, tuple(active))
        if has_buffer:
            w = ctx.buffer_weight
            buf = (xd @ self.buffer_A.to(xd.dtype).t()) @ self.buffer_B.to(xd.dtype).t() * self.buffer_scale
            if isinstance(w, Tensor):
                w = w.to(buf.dtype).view(-1, *([1] * (buf.dim() - 1)))
            delta = w * buf if delta is None else delta + w * buf
        return y + delta.to(y.dtype)

    def _expert_refs(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The experts' A's and B's as plain lists: indexing a ParameterList costs microseconds per access, which a
        forward would pay per expert in each of a model's adapted modules (and per decoding step). Rebuilt
        whenever the ParameterLists are replaced or grow (add_expert, loading a state)."""
        refs = self._refs
        A_list, B_list = self.experts_A, self.experts_B
        if refs is None or refs[0] is not A_list or refs[1] is not B_list or len(refs[2]) != len(A_list):
            refs = self._refs = (self.experts_A, self.experts_B, list(self.experts_A), list(self.experts_B))
        return refs[2], refs[3]

    def _fuse(self, device) -> bool:
        fuse = self.context.fuse_trainable
        return device.type != "cpu" if fuse is None else fuse

    def _plan(self, active: tuple[int, ...], device, dtype) -> "_Plan":
        """How this layer runs ``active``: which experts are concatenated (cached) and which are read afresh in
        every forward (those that train in it). Reused across forwards while no expert of the set is added,
        replaced, written in place (``_version``), rescaled or switched between frozen and trainable; otherwise
        rebuilt. With grad disabled nothing trains, so every expert is concatenated and its writes tracked."""
        As, Bs = self._expert_refs()
        training = torch.is_grad_enabled()
        # a trainable expert is read afresh in every forward: only whether it trains matters, not its writes
        state = [True if training and As[k].requires_grad else (As[k]._version, Bs[k]._version) for k in active]
        scales = [self.expert_scales[k] for k in active]
        fuse = training and self._fuse(device)
        key = (active, device, dtype, training, fuse)
        plan = self._plans.get(key)
        if plan is not None and plan.refs is As and plan.state == state and plan.scales == scales:
            return plan
        frozen = tuple(k for k, s in zip(active, state) if s is not True)
        trainable = tuple(k for k, s in zip(active, state) if s is True)
        plan = _Plan(As, Bs, state, scales, frozen, trainable, fused=fuse and bool(frozen) and bool(trainable))
        if frozen:
            with torch.no_grad():
                plan.A_cat = torch.cat([As[k] for k in frozen], dim=0).to(dtype)
                plan.B_cat = torch.cat([Bs[k] for k in frozen], dim=1).to(dtype)
            columns = [k for k in frozen + (trainable if plan.fused else ()) for _ in range(As[k].shape[0])]
            plan.owner = torch.tensor(columns, device=device)
            plan.scale = torch.tensor([self.expert_scales[k] for k in columns], dtype=plan.A_cat.dtype, device=device)
        self._plans[key] = plan
        return plan

    def _experts_forward(self, xd: Tensor, weights: Tensor | None, active: tuple[int, ...]) -> Tensor:
        """xd: (B, T, d_in); weights: None | (B, K) | (B, T, K) over all K experts, zero outside ``active``
        -> (B, T, d_out), summed over the active experts only."""
        if weights is not None:
            if weights.shape[0] != xd.shape[0] or weights.shape[-1] != len(self.expert_scales):
                raise RuntimeError(f"{self.key}: routing weights {tuple(weights.shape)} do not fit a batch of "
                                   f"{xd.shape[0]} over {len(self.expert_scales)} experts (stale routing state?)")
            if weights.dtype != xd.dtype:
                weights = weights.to(xd.dtype)
        per_token = xd.dim() == 3
        plan = self._plan(active, xd.device, xd.dtype)
        if plan.fused:  # one chain: the trainable experts' factors appended to the cached frozen ones
            A = torch.cat([plan.A_cat] + [plan.refs[k].to(xd.dtype) for k in plan.trainable], dim=0)
            B = torch.cat([plan.B_cat] + [plan.brefs[k].to(xd.dtype) for k in plan.trainable], dim=1)
            return ((xd @ A.t()) * plan.column_weights(weights, per_token)) @ B.t()
        out = None
        if plan.frozen:
            h = xd @ plan.A_cat.t()  # (B, T, R)
            h = h * plan.column_weights(weights, per_token)
            out = h @ plan.B_cat.t()
        for k in plan.trainable:  # trainable experts (one in CRAM's stable phase): their own matmul chain
            A, B = plan.refs[k], plan.brefs[k]
            h = (xd @ A.to(xd.dtype).t()) * self.expert_scales[k]
            if weights is not None:
                h = h * _per_sample(weights[..., k:k + 1], per_token)
            part = h @ B.to(xd.dtype).t()
            out = part if out is None else out + part
        return out

    def extra_repr(self) -> str:
        return f"key={self.key}, ranks={self.ranks}, buffer={'on' if self.buffer_A is not None else 'off'}"
