"""The real-model backbone: a local transformers image-text-to-text model (LLaVA, LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL, Idefics3, InternVL, Gemma 3).

``HFBackbone(HFOptions(model_path=...))`` or ``HFBackbone.from_config``-style ``HFOptions.from_config(cfg)``;
:mod:`cramcl.backbones.hf.tiny_models` builds tiny random-weight models of the same architectures offline.
"""
from cramcl.backbones.hf.backbone import HFBackbone, HFOptions, load_processor, resolve_model_path

__all__ = ["HFBackbone", "HFOptions", "load_processor", "resolve_model_path"]
