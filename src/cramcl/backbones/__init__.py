"""Backbone factory: `tiny` (embedded, offline) or `hf` (a local transformers image-text-to-text model)."""
from __future__ import annotations

from cramcl.errors import BadInputError


def build_backbone(run_cfg, bench, log=print):
    from cramcl.data.stream import base_corpora

    cfg = run_cfg.backbone
    if cfg.name == "tiny":
        from cramcl.backbones.tiny.backbone import TinyBackbone

        from cramcl.backbones.tiny.saved_base import SHIPPED, check_vocabulary, read_saved_base, resolve_base_path

        base_path = resolve_base_path(cfg.base_path, run_cfg.data.benchmark)
        if cfg.base_path == SHIPPED and not base_path:
            log(f"base: the shipped base is the built-in stream's; {bench.path} trains its own from its corpus")
        if base_path:  # a saved base: its own vocabulary, no base stage, no corpus needed
            saved = read_saved_base(base_path)
            check_vocabulary(saved, bench)
            return TinyBackbone(cfg, [], [], cfg.base_seed, log=log, saved=saved)
        texts = [r.question for t in bench.tasks for r in (*t.train, *t.test)]
        texts += [r.answer for t in bench.tasks for r in t.train]
        # the base stage stands for a pretrained MLLM: its seed is its own, so runs with other seeds share one base
        main, first = base_corpora(bench, run_cfg.data)
        if cfg.base_first_steps and not first:
            raise BadInputError(f"backbone.base_first_steps: {cfg.base_first_steps} steps of a first base stage, but "
                                f"{bench.path} has no 'pretrain_first' records file to train them on")
        return TinyBackbone(cfg, texts, main, cfg.base_seed, log=log, first_corpus=first)
    if cfg.name == "hf":
        from cramcl.backbones.hf import HFBackbone, HFOptions

        return HFBackbone(HFOptions.from_config(cfg), log=log)
    raise BadInputError(f"backbone.name: unknown backbone '{cfg.name}' (known: tiny, hf)")
