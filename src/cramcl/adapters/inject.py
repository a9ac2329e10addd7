"""Put MultiLoRALinear around the LLM's attention projections; save and load adapter state canonically.

Targets are found by name: ``...layers.<i>.<self_attn|attention>.<proj>`` inside the language model only.
The count is asserted against ``num_layers * len(targets)`` so a renamed module in a new transformers release
fails loudly instead of silently adapting nothing. State is keyed canonically (``layers.<i>.<proj>...``), not
by the model's module path, so it survives such renames too.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from cramcl.adapters.multi_lora import MultiLoRALinear, RoutingContext

_TARGET_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|attention|attn|mlp|feed_forward)\.([A-Za-z_]+)$")
_SKIP = ("vision", "visual", "image_encoder", "multi_modal_projector", "mm_projector", "connector")


def find_target_linears(model: nn.Module, targets: list[str]) -> dict[str, tuple[str, int, nn.Linear]]:
    """Canonical key -> (module path, layer index, linear) for every target projection of the LLM."""
    found = {}
    for path, module in model.named_modules():
        if any(s in path for s in _SKIP):
            continue
        m = _TARGET_RE.search(path)
        if m and m.group(2) in targets and isinstance(module, nn.Linear):
            key = f"layers.{int(m.group(1))}.{m.group(2)}"
            if key in found:
                raise RuntimeError(f"two modules map to the adapter key '{key}': {found[key][0]} and {path}")
            found[key] = (path, int(m.group(1)), module)
    return found


def inject_adapters(model: nn.Module, targets: list[str], expected_count: int, context: RoutingContext,
                    dropout: float = 0.0) -> dict[str, MultiLoRALinear]:
    """Replace each target linear with a MultiLoRALinear (no experts yet: outputs are unchanged)."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = find_target_linears(model, targets)
    if len(found) != expected_count:
        raise RuntimeError(f"expected {expected_count} adapted modules ({targets}), found {len(found)}: "
                           f"{sorted(found)[:8]}...")
    layers = {}
    for key, (path, index, linear) in sorted(found.items(), key=lambda kv: (kv[1][1], kv[0])):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        wrapped = MultiLoRALinear(linear, key, index, context, dropout)
        wrapped.train(linear.training)  # a new module defaults to train mode (dropout on); follow the model
        setattr(parent, child, wrapped)
        layers[key] = wrapped
    return layers


def adapter_state(layers: dict[str, MultiLoRALinear]) -> tuple[dict[str, Tensor], dict]:
    """Tensors under canonical keys and the metadata (ranks, scales) needed to rebuild the experts."""
    tensors: dict[str, Tensor] = {}
    meta: dict = {}
    for key, layer in layers.items():
        for k in range(layer.num_experts):
            tensors[f"{key}.expert.{k}.A"] = layer.experts_A[k].detach().cpu().contiguous()
            tensors[f"{key}.expert.{k}.B"] = layer.experts_B[k].detach().cpu().contiguous()
        if layer.buffer_A is not None:
            tensors[f"{key}.buffer.A"] = layer.buffer_A.detach().cpu().contiguous()
            tensors[f"{key}.buffer.B"] = layer.buffer_B.detach().cpu().contiguous()
        meta[key] = {"ranks": layer.ranks, "scales": list(layer.expert_scales),
                     "buffer_scale": layer.buffer_scale, "buffer": layer.buffer_A is not None}
    return tensors, meta


def load_adapter_state(layers: dict[str, MultiLoRALinear], tensors: dict[str, Tensor], meta: dict) -> None:
    """Rebuild experts (ranks from ``meta``) and copy weights; every key must match exactly."""
    if set(meta) != set(layers):
        missing, extra = sorted(set(layers) - set(meta)), sorted(set(meta) - set(layers))
        raise RuntimeError(f"adapter state does not match the model: missing {missing[:4]}, unexpected {extra[:4]}")
    for key, layer in layers.items():
        info = meta[key]
        layer.experts_A = nn.ParameterList()  # ParameterList has no item deletion
        layer.experts_B = nn.ParameterList()
        layer.expert_scales = []
        layer._plans.clear()
        for k, (rank, scale) in enumerate(zip(info["ranks"], info["scales"])):
            A, B = tensors[f"{key}.expert.{k}.A"], tensors[f"{key}.expert.{k}.B"]
            assert A.shape[0] == rank == B.shape[1], f"{key} expert {k}: rank mismatch"
            layer.add_expert(A=A, B=B, scale=scale)
            layer.set_expert_trainable(k, False)
        if info["buffer"]:
            layer.init_buffer(tensors[f"{key}.buffer.A"].shape[0], 1.0)
            with torch.no_grad():
                layer.buffer_A.copy_(tensors[f"{key}.buffer.A"])
                layer.buffer_B.copy_(tensors[f"{key}.buffer.B"])
            layer.buffer_scale = info["buffer_scale"]
        else:
            layer.drop_buffer()
