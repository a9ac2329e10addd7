"""CRAM's penalty over a model's modules: the batched path (a GPU's) equals the per-module path (a CPU's) on
modules of several shapes, in the modules' order, with the phase's indices built once."""
from __future__ import annotations

import torch

torch.set_num_threads(1)

from cramcl.adapters.multi_lora import MultiLoRALinear, RoutingContext  # noqa: E402
from cramcl.methods.cram.penalty import OrthogonalityPenalty  # noqa: E402


def _layers(seed: int = 0) -> dict[str, MultiLoRALinear]:
    """4 layers x 2 modules; the new expert's rank differs by module (as CRAM's SVD gives) so that the
    penalty batches modules of several shapes."""
    g = torch.Generator().manual_seed(seed)
    ctx, layers = RoutingContext(), {}
    for i in range(4):
        for name, d_out in (("q_proj", 12), ("o_proj", 10)):
            layer = MultiLoRALinear(torch.nn.Linear(12, d_out), f"layers.{i}.{name}", i, ctx)
            for r in (3, 2):  # the group's earlier experts
                layer.add_expert(A=torch.randn(r, 12, generator=g), B=torch.randn(d_out, r, generator=g))
            new_rank = 2 + (i % 2)
            layer.add_expert(A=torch.randn(new_rank, 12, generator=g), B=torch.randn(d_out, new_rank, generator=g),
                             scale=0.5 + i)
            layers[layer.key] = layer
    return layers


def test_batched_penalty_equals_per_module_penalty_in_module_order():
    layers = _layers()
    penalty = OrthogonalityPenalty()
    penalty.start(layers, new=2, history=[0, 1], device="cpu")
    assert len(penalty.batches) > 1 and sorted(i for b in penalty.batches for i in b) == list(range(len(layers)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, 12, generator=g)
    mask = (torch.rand(5, 7, 1, generator=g) > 0.4).float()
    for layer in layers.values():
        penalty.capture(layer, x, mask)
    gates = torch.rand(4, 5, generator=g)
    per_module = penalty(layers, gates)
    batched = penalty._stacked(layers, gates)
    assert per_module.shape == (len(layers),) and (per_module > 0).all()
    assert torch.allclose(batched, per_module, rtol=1e-5, atol=0), (batched - per_module).abs().max()
    penalty.stop()
    assert not penalty.active and penalty._order is None
