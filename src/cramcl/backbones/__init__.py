"""Backbone factory: `tiny` (embedded, offline) or `hf` (a local transformers image-text-to-text model)."""
from __future__ import annotations

import os

from cramcl.errors import BadInputError


def build_backbone(run_cfg, bench, log=print):
    from cramcl.data.stream import base_corpus

    cfg = run_cfg.backbone
    if cfg.name == "tiny":
        from cramcl.backbones.tiny.backbone import TinyBackbone

        if cfg.base_path:  # a saved base: its own vocabulary, no base stage, no corpus needed
            from cramcl.backbones.tiny.saved_base import check_vocabulary, read_saved_base

            saved = read_saved_base(os.path.expandvars(cfg.base_path))
            check_vocabulary(saved, bench)
            return TinyBackbone(cfg, [], [], cfg.base_seed, log=log, saved=saved)
        texts = [r.question for t in bench.tasks for r in (*t.train, *t.test)]
        texts += [r.answer for t in bench.tasks for r in t.train]
        # the base stage stands for a pretrained MLLM: its seed is its own, so runs with other seeds share one base
        return TinyBackbone(cfg, texts, base_corpus(bench, run_cfg.data), cfg.base_seed, log=log)
    if cfg.name == "hf":
        from cramcl.backbones.hf import HFBackbone, HFOptions

        return HFBackbone(HFOptions.from_config(cfg), log=log)
    raise BadInputError(f"backbone.name: unknown backbone '{cfg.name}' (known: tiny, hf)")
