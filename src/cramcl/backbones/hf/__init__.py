"""The real-model backbone: a local transformers image-text-to-text model (LLaVA, Qwen2-VL, Idefics3, InternVL).

``HFBackbone(HFOptions(model_path=...))`` or ``HFBackbone.from_config``-style ``HFOptions.from_config(cfg)``;
:mod:`cramcl.backbones.hf.tiny_models` builds tiny random-weight models of the same architectures offline.
"""
from cramcl.backbones.hf.backbone import HFBackbone, HFOptions, load_processor, resolve_model_path

__all__ = ["HFBackbone", "HFOptions", "load_processor", "resolve_model_path"]
