"""Only the active experts run, frozen factors are cached and rebuilt only when an expert changes, and half
precision stays half precision, all with the naive sum's numbers."""
from __future__ import annotations

import pytest
import torch

from adapter_fixtures import D_IN, D_OUT, naive, ragged_layer, x_and_weights


# ------------------------------------------------------------------ only the active experts run
@pytest.mark.parametrize("active", [(0, 2), (1,), (), (0, 1, 2)])
@pytest.mark.parametrize("trainable", [(), (2,), (0, 2)])
def test_only_the_active_experts_run_with_the_same_numbers(active, trainable):
    """Weights are zero outside ``active`` (as a method that names the active set guarantees): the output
    equals the naive sum over every expert, frozen experts from the cache and trainable ones on their own."""
    layer, ctx, experts, _ = ragged_layer()
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
def test_half_precision_inputs_are_not_upcast_and_gradients_reach_float32_factors():
    """A bf16 model's activations stay bf16 through the adapter (no fp32 copy of x per module), the result
    matches the fp32 computation to bf16 precision, and the float32 master factors receive float32 grads."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layer, ctx, experts, _ = ragged_layer()
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
