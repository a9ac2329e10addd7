"""`cramcl export`: one task's expert as a PEFT LoRA adapter directory (``--format peft``), or the run's frozen
tiny base as a saved base directory (``--format base``, :func:`export_base`).

The directory holds ``adapter_config.json`` (a PEFT ``LoraConfig``: every adapted module by its full path
in the model the adapter loads onto, each module's own rank in ``rank_pattern``) and
``adapter_model.safetensors`` (``lora_A`` / ``lora_B`` per module). The expert's scale is folded into
``lora_B`` and every module's alpha equals its rank, so PEFT's scaling (alpha / r = 1) reproduces the
expert's update exactly: ``peft.PeftModel.from_pretrained(base, OUT)`` on the same base model computes what
cramcl computes with that expert alone (oracle routing).

What export cannot carry: the routing. The adapter is that task's expert by itself, so the loaded model
behaves as if every input belonged to that task (no instruction groups, no centroids, no other experts).

The base the adapter loads onto: for a real model (``hf`` backbone) the model at ``backbone.model_path``
(``AutoModelForImageTextToText``); for the embedded tiny backbone its language model (a transformers
``LlamaForCausalLM``, fed the projected image tokens as ``inputs_embeds``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import cramcl.backbones  # build_backbone looked up when called: a test may replace it
from cramcl.adapters.multi_lora import MultiLoRALinear
from cramcl.backbones.tiny.saved_base import save_base
from cramcl.data.stream import load_stream
from cramcl.engine.saved_config import load_saved_config
from cramcl.errors import BadInputError


def peft_root(backbone) -> torch.nn.Module:
    """The module whose named paths the adapter uses (see the module docstring)."""
    return backbone.language_model if type(backbone).__name__ == "TinyBackbone" else backbone.model


def module_paths(root: torch.nn.Module) -> dict[str, str]:
    """Canonical adapter key (``layers.<i>.<proj>``) -> the wrapped linear's path under ``root``."""
    return {m.key: name for name, m in root.named_modules() if isinstance(m, MultiLoRALinear)}


def export_peft(session, task_name: str, out: Path) -> Path:
    """Write the expert that serves ``task_name`` as a PEFT LoRA directory at ``out`` (new or empty)."""
    from peft import LoraConfig  # seconds to import; only this command needs it

    method, names = session.method, session.bench.task_names()
    if task_name not in names:
        raise BadInputError(f"--task: unknown task '{task_name}' (tasks: {', '.join(names)})")
    task_index = names.index(task_name)
    expert = method.expert_for_task(task_index)
    if expert is None:
        raise BadInputError(f"method '{session.cfg.method}' has no single LoRA for task '{task_name}' to export "
                            "(it was not trained yet, or the method mixes shared experts per token)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"{out}: exists and is not an empty directory; choose another OUT")
    paths = module_paths(peft_root(session.backbone))
    tensors, ranks = {}, {}
    for key, layer in method.layers.items():
        path = paths[key]
        A = layer.experts_A[expert].detach().float().cpu()
        B = (layer.experts_B[expert].detach().float() * layer.expert_scales[expert]).cpu()
        tensors[f"base_model.model.{path}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = B.contiguous()
        ranks[path] = int(A.shape[0])
    r = max(ranks.values())
    base = getattr(session.cfg.backbone, "model_path", "") if session.cfg.backbone.name == "hf" else ""
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none", target_modules=sorted(ranks),
                        rank_pattern={p: k for p, k in ranks.items() if k != r},
                        alpha_pattern={p: k for p, k in ranks.items() if k != r},
                        base_model_name_or_path=base or None)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "cramcl_export.json").write_text(json.dumps({
        "run_method": session.cfg.method, "task": task_name, "expert": expert, "ranks": ranks,
        "note": "the task's expert alone: routing (groups, centroids, other experts) is not part of a PEFT adapter"},
        indent=1) + "\n")
    return out


def export_base(run_dir: Path, out: Path, log=print) -> Path:
    """Write the frozen base a tiny-backbone run used as a saved base directory at ``out`` (new or empty):
    load it with ``backbone.base_path=OUT`` (backbones/tiny/saved_base.py). The base comes from the cache
    (rebuilt with the run's settings and thread count if the cache was cleared); it must have the base key
    env.json recorded, else nothing is written."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"{out}: exists and is not an empty directory; choose another OUT")
    if not (run_dir / "config.yaml").exists():
        raise BadInputError(f"{run_dir / 'config.yaml'}: not found; --run must be the directory of a cramcl run")
    cfg = load_saved_config(run_dir)
    if cfg.backbone.name != "tiny":
        raise BadInputError(f"{run_dir}: backbone '{cfg.backbone.name}': --format base exports the tiny backbone's "
                            "base; a real model's base is the model at backbone.model_path")
    try:
        env = json.loads((run_dir / "env.json").read_text())
        recorded, threads = env["backbone"]["base_stage"], int(env["torch_threads"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise BadInputError(f"{run_dir / 'env.json'}: missing or damaged; cannot tell which base the run used") from None
    torch.set_num_threads(threads)  # the thread count is part of the base stage's cache key
    backbone = cramcl.backbones.build_backbone(cfg, load_stream(cfg.data), log=log)
    if backbone.base_key != recorded:
        raise BadInputError(f"{run_dir}: the run used base {recorded}, this machine builds {backbone.base_key} "
                            "(another torch version?); nothing was written")
    made_by = {"run": str(run_dir.resolve()), "base_stage": recorded, "benchmark": env.get("benchmark", {}),
               "backbone_config": {k: getattr(cfg.backbone, k) for k in (
                   "base_steps", "base_batch_size", "base_lr", "base_seed", "base_first_steps", "base_first_lr",
                   "base_first_warmup", "base_path")},
               "torch": torch.__version__, "torch_threads": threads}
    return save_base(backbone, out, made_by)
