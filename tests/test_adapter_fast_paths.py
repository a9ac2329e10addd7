"""Only the active experts run, frozen factors are cached and rebuilt only when an expert changes, and half
precision stays half precision, all with the naive sum's numbers."""
from __future__ import annotations

import pytest
import torch

from adapter_fixtures import D_IN, D_OUT, naive, ragged_layer, x_and_weights


# ------------------------------------------------------------------ only the active experts run
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("active", [(0, 2), (1,), (), (0, 1, 2)])
@pytest.mark.parametrize("trainable", [(), (2,), (0, 2)])
def test_only_the_active_experts_run_with_the_same_numbers(active, trainable, fuse):
    """Weights are zero outside ``active`` (as a method that names the active set guarantees): the output
    equals the naive sum over every expert, frozen experts from the cache and trainable ones on their own
    (or, fused, appended to the frozen ones' chain)."""
    layer, ctx, experts, _ = ragged_layer()
    ctx.fuse_trainable = fuse
    for k in range(layer.num_experts):
        layer.set_expert_trainable(k, k in trainable)
    x, per_sample, _ = x_and_weights()
    mask = torch.zeros(layer.num_experts)
    mask[list(active)] = 1.0
    weights = per_sample * mask
    ctx.route = lambda lyr, inp: weights
    ctx.active = active
    got = layer(x)
    want = naive(layer, x, experts, weights)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    if trainable and set(trainable) & set(active):  # gradients reach the active trainable experts only
        got.sum().backward()
        for k in trainable:
            assert (layer.experts_A[k].grad is not None) == (k in active)


def test_frozen_factors_are_built_once_and_rebuilt_when_an_expert_changes(monkeypatch):
    layer, ctx, experts, _ = ragged_layer()
    for k in range(layer.num_experts):
        layer.set_expert_trainable(k, False)
    x, per_sample, _ = x_and_weights()
    ctx.route = lambda lyr, inp: per_sample
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    first = layer(x)
    n = len(calls)
    assert n == 2  # A's and B's of the frozen experts, once
    assert torch.equal(layer(x), first) and len(calls) == n  # reused
    with torch.no_grad():
        layer.experts_B[1].mul_(2.0)  # an in-place write (e.g. a checkpoint load)
    changed = layer(x)
    assert len(calls) == n + 2 and not torch.allclose(changed, first)
    layer.add_expert(A=torch.randn(2, D_IN), B=torch.randn(D_OUT, 2))  # trainable: joins without a re-cat
    ctx.route = lambda lyr, inp: torch.ones(inp.shape[0], lyr.num_experts)
    layer(x)
    assert len(calls) == n + 4  # the cache was dropped by add_expert and rebuilt for the frozen three
    layer(x)
    assert len(calls) == n + 4


# ------------------------------------------------------------------ precision
@pytest.mark.parametrize("fuse", [False, True])
def test_half_precision_inputs_are_not_upcast_and_gradients_reach_float32_factors(fuse):
    """A bf16 model's activations stay bf16 through the adapter (no fp32 copy of x per module), the result
    matches the fp32 computation to bf16 precision, and the float32 master factors receive float32 grads,
    with the trainable experts in their own chains or fused into the frozen one's (the GPU default)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layer, ctx, experts, _ = ragged_layer()
    ctx.fuse_trainable = fuse
    layer.set_expert_trainable(0, False)
    layer.base.to(torch.bfloat16)
    x, per_sample, _ = x_and_weights()
    ctx.route = lambda lyr, inp: per_sample
    with torch.no_grad():
        want = (x.to(torch.bfloat16).float() @ layer.base.weight.float().T + layer.base.bias.float()
                + sum(per_sample[:, k].view(-1, 1, 1) * s * (x.to(torch.bfloat16).float() @ A.T @ B.T)
                      for k, (A, B, s) in enumerate(experts)))

    seen = []

    class MatmulDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
                seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    with MatmulDtypes():
        got = layer(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert seen and all(d == {torch.bfloat16} for d in seen), seen
    assert torch.allclose(got.float(), want, atol=0.05 * float(want.abs().max()), rtol=0)
    got.float().pow(2).sum().backward()
    assert layer.experts_A[1].grad.dtype == torch.float32 and torch.count_nonzero(layer.experts_B[1].grad) > 0


def test_column_multipliers_are_reused_only_while_the_same_weights_come_back():
    """Decoding steps of one batch route with the same weights: the per-column multiplier is built once. A new
    batch's weights, an in-place change, or weights that carry a graph (training) are never served stale."""
    layer, ctx, experts, _ = ragged_layer()
    for k in range(layer.num_experts):
        layer.set_expert_trainable(k, False)
    x, per_sample, _ = x_and_weights()
    table = torch.stack([per_sample, per_sample.flip(0)])  # (L=2, B, K): the method's per-layer weights
    ctx.route = lambda lyr, inp: table[0]  # a fresh view of the same memory on every call, as CramMethod's
    with torch.no_grad():
        first = layer(x)
        plan = next(iter(layer._plans.values()))
        built = plan._multiplier
        assert torch.equal(layer(x), first) and plan._multiplier is built  # reused
        assert torch.allclose(first, naive(layer, x, experts, table[0]), atol=1e-5, rtol=1e-5)
        table.mul_(0.5)  # written in place: rebuilt
        assert torch.allclose(layer(x), naive(layer, x, experts, table[0]), atol=1e-5, rtol=1e-5)
        other = torch.rand_like(per_sample)  # another batch's weights
        ctx.route = lambda lyr, inp: other
        assert torch.allclose(layer(x), naive(layer, x, experts, other), atol=1e-5, rtol=1e-5)
    trained = per_sample.clone().requires_grad_(True)  # routing that trains: a new graph every step
    ctx.route = lambda lyr, inp: trained
    layer(x).sum().backward()
    assert trained.grad is not None and torch.count_nonzero(trained.grad) > 0
    assert plan._weights_seen is None or not plan._weights_seen.requires_grad


def test_optimizer_steps_on_the_trainable_expert_do_not_rebuild_the_frozen_factors(monkeypatch):
    """A training step writes the trainable expert in place; the frozen experts' concatenation (and its host-to-
    device copies of column owners and scales, a sync on a GPU) must not be rebuilt for that."""
    layer, ctx, experts, _ = ragged_layer()
    layer.set_expert_trainable(0, False)
    layer.set_expert_trainable(1, False)
    x, per_sample, _ = x_and_weights()
    ctx.route = lambda lyr, inp: per_sample
    opt = torch.optim.SGD([layer.experts_A[2], layer.experts_B[2]], lr=0.1)
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    before = layer.experts_B[2].detach().clone()
    for _ in range(3):
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(layer.experts_B[2], before)  # it did train
    assert len(calls) == 2  # one concatenation of the frozen A's and B's, at the first forward only


# ------------------------------------------------------------------ one chain: fused training, folded inference
def _dispatched(fn):
    """(result, the computing operators fn() dispatched: views and matmul's result reshapes left out; on a GPU
    each is a kernel launch)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket not in (torch.ops.aten._unsafe_view, torch.ops.aten.detach):
                seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        out = fn()
    return out, seen


def _matmuls(fn):
    """(result, number of matmul calls) of fn()."""
    out, ops = _dispatched(fn)
    return out, sum(op in ("mm", "bmm", "addmm") for op in ops)


def test_fused_training_gives_the_split_chains_numbers_and_gradients_in_one_chain():
    """CRAM's stable phase: frozen experts beside a trainable one, routing weights that train. Fused, the
    forward runs one A-matmul and one B-matmul (plus the base); output and every gradient (trainable factors,
    routing weights, input) equal the split chains'. The CPU default stays split (its float sums unchanged)."""
    results = {}
    for fuse in (False, True):
        layer, ctx, experts, _ = ragged_layer()
        layer.set_expert_trainable(0, False)
        layer.set_expert_trainable(1, False)
        ctx.fuse_trainable = fuse
        x, per_sample, _ = x_and_weights()
        x.requires_grad_(True)
        w = per_sample.clone().requires_grad_(True)
        ctx.route = lambda lyr, inp: w
        out, mm = _matmuls(lambda: layer(x))
        assert mm == (3 if fuse else 5)  # base + (A, B) once, or + (A, B) per chain
        out.pow(2).sum().backward()
        assert layer.experts_A[0].grad is None and layer.experts_B[1].grad is None  # frozen stay frozen
        results[fuse] = [out.detach(), x.grad, w.grad, layer.experts_A[2].grad, layer.experts_B[2].grad]
        assert torch.allclose(out, naive(layer, x.detach(), experts, per_sample), atol=1e-5, rtol=1e-5)
    for split, fused in zip(results[False], results[True]):
        assert torch.allclose(split, fused, atol=1e-5, rtol=1e-5), (split - fused).abs().max()
    layer, ctx, _, _ = ragged_layer()
    layer.set_expert_trainable(0, False)
    x, per_sample, _ = x_and_weights()
    ctx.route = lambda lyr, inp: per_sample
    assert ctx.fuse_trainable is None and layer._fuse(x.device) is False  # CPU: split by default
    _, mm = _matmuls(lambda: layer(x))
    assert mm == 7  # base, the frozen chain, one chain per trainable expert (1 and 2)


def test_without_grad_a_trainable_expert_joins_the_cached_chain_and_is_never_served_stale():
    """Evaluation between optimizer steps (or of a method whose expert stays trainable): with grad disabled
    every active expert is concatenated once (one chain, no casts per forward), and a write by an optimizer
    step rebuilds the concatenation before the next forward uses it."""
    layer, ctx, experts, _ = ragged_layer()
    layer.set_expert_trainable(0, False)  # 1 and 2 train
    x, per_sample, _ = x_and_weights()
    ctx.route = lambda lyr, inp: per_sample
    opt = torch.optim.SGD([layer.experts_A[2], layer.experts_B[2]], lr=0.5)
    for _ in range(2):
        with torch.no_grad():
            got, mm = _matmuls(lambda: layer(x))
        assert mm == 3
        current = [(a.detach(), b.detach(), s) for a, b, s in zip(layer.experts_A, layer.experts_B,
                                                                   layer.expert_scales)]
        assert torch.allclose(got, naive(layer, x, current, per_sample), atol=1e-5, rtol=1e-5)
        layer(x).pow(2).sum().backward()  # a training step writes expert 2 in place
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = layer(x)
    current = [(a.detach(), b.detach(), s) for a, b, s in zip(layer.experts_A, layer.experts_B, layer.expert_scales)]
    assert torch.allclose(after, naive(layer, x, current, per_sample), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, got)


def test_a_decoding_step_dispatches_what_a_plain_lora_does():
    """A decoding step is bound by kernel launches, not arithmetic. Per module it runs the base, the A-matmul,
    the column multiply, the B-matmul and the add: for a one-expert LoRA, and for CRAM's module with frozen
    experts beside a still-trainable one under per-sample weights that come back as the same tensor (no
    casts of the factors, no zeros to add to, no gather of the weights again)."""
    def module(experts: int, trainable: int):
        layer, ctx, _, _ = ragged_layer(ranks=(2, 5, 3)[:experts])
        for k in range(experts):
            layer.set_expert_trainable(k, k == trainable)
        return layer, ctx

    x, per_sample, _ = x_and_weights()
    lora, _ = module(1, trainable=0)
    cram, ctx = module(3, trainable=2)
    ctx.route = lambda lyr, inp: per_sample
    want = ["addmm", "mm", "mul", "mm", "add"]
    with torch.no_grad():
        for layer in (lora, cram):
            layer(x)  # the first step builds the plan and the multiplier
            for _ in range(2):
                assert _dispatched(lambda: layer(x))[1] == want
    lora.base.to(torch.bfloat16)  # a bf16 model: the fp32 master factors are cast once, not per step
    with torch.no_grad():
        lora(x.to(torch.bfloat16))
        assert _dispatched(lambda: lora(x.to(torch.bfloat16)))[1] == ["_to_copy", *want]  # x's own cast only
