"""The embedded backbone: word tokenizer + cached EfficientNet tokens + TinyVLM, with its cached base stage."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from cramcl.backbones.tiny.base_stage import FirstStage, base_stage_key, load_or_train_base
from cramcl.backbones.tiny.model import Encoder, TinyVLM
from cramcl.backbones.tiny.saved_base import SavedBase, check_compatible, load_weights
from cramcl.backbones.tiny.tokenizer import build_word_tokenizer, decode_words, tokenizer_digest
from cramcl.backbones.tiny.vision import EfficientNetFeatures
from cramcl.config import BackboneConfig
from cramcl.data.records import Record


class TinyBackbone:
    def __init__(self, cfg: BackboneConfig, stream_texts: list[str], base_corpus: list[Record], seed: int,
                 log=print, saved: SavedBase | None = None, first_corpus: list[Record] = ()):
        """``stream_texts``: the stream's questions and its *training* answers (test answers never shape
        the vocabulary). ``saved``: a saved base to load (its vocabulary and weights) instead of building a
        vocabulary from the texts and training the base stage on ``base_corpus``. ``first_corpus``: records
        trained alone first (``backbone.base_first_steps``); their words are in the vocabulary either way."""
        self.cfg = cfg
        if saved is None:
            corpus = [*base_corpus, *first_corpus]
            texts = list(stream_texts) + [r.question for r in corpus] + [r.answer for r in corpus]
            self.tokenizer = build_word_tokenizer(texts)
        else:
            self.tokenizer = saved.tokenizer
        self.vision = EfficientNetFeatures(cfg.image_size)
        if saved is not None:
            check_compatible(saved, cfg, self.vision.identity)
        n_img = (cfg.image_size // 32) ** 2
        self.encoder = Encoder(self.tokenizer, n_img)
        torch.manual_seed(seed)
        self.model = TinyVLM(self.tokenizer.get_vocab_size(), cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                             cfg.intermediate_size)
        self.num_layers = cfg.num_layers
        if saved is None:
            self._train_base(base_corpus, list(first_corpus), seed, log)
        else:
            load_weights(saved, self.model)
            self.base_key = f"saved:{saved.digest}"
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)  # the base is frozen, as a real pretrained MLLM would be

    @property
    def language_model(self) -> nn.Module:
        return self.model.lm

    def _train_base(self, corpus: list[Record], first: list[Record], seed: int, log) -> None:
        cfg = self.cfg
        self.vision.prepare([r.image for r in corpus + first], desc="image features (base corpus)")
        parts = {
            "model": [cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size],
            "vision": self.vision.identity, "vocab": tokenizer_digest(self.tokenizer), "corpus": self._digest(corpus),
            "steps": cfg.base_steps, "batch": cfg.base_batch_size, "lr": cfg.base_lr, "seed": seed,
            "torch": torch.__version__,
            # float reductions differ with the thread count: a base trained with 1 thread is not bit-identical
            # to one trained with 2, and near-chance tasks can move by several points between them
            "threads": torch.get_num_threads()}
        first_stage = None
        if cfg.base_first_steps and first:  # only then in the key: keys of bases without it stay as they were
            parts["first"] = [self._digest(first), cfg.base_first_steps, cfg.base_first_lr, cfg.base_first_warmup]
            first_stage = FirstStage(self._batch_maker(first), len(first), cfg.base_first_steps, cfg.base_first_lr,
                                     cfg.base_first_warmup)
        self.base_key = key = base_stage_key(parts)
        load_or_train_base(self.model, key, self._batch_maker(corpus), len(corpus), steps=cfg.base_steps,
                           batch_size=cfg.base_batch_size, lr=cfg.base_lr, seed=seed, log=log, first=first_stage)

    def _digest(self, records: list[Record]) -> str:
        return hashlib.sha1("\n".join(
            f"{self.vision._digest_of[r.image]}\t{r.question}\t{r.answer}" for r in records).encode()).hexdigest()

    def _batch_maker(self, records: list[Record]):
        return lambda idx: self.collate([records[i] for i in idx], train=True, tensors_only=True)

    def prepare(self, records: list[Record], desc: str = "image features") -> None:
        self.vision.prepare([r.image for r in records], desc=desc)

    def collate(self, records: list[Record], train: bool, tensors_only: bool = False) -> dict:
        batch = self.encoder.build([r.question for r in records], [r.answer for r in records] if train else None)
        batch["image_feats"] = self._features(records)
        if not tensors_only:
            batch["records"] = records
        return batch

    def model_inputs(self, batch: dict) -> dict:
        keys = ("input_ids", "attention_mask", "image_feats", "image_mask", "labels")
        return {k: batch[k] for k in keys if k in batch}

    @torch.no_grad()
    def generate(self, model: nn.Module, batch: dict, on_step=None) -> list[str]:
        inputs = self.model_inputs(batch)
        inputs.pop("labels", None)
        ids = model.greedy_generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, eos_id=self.encoder.eos_id)
        return [decode_words(self.tokenizer, row.tolist()) for row in ids]

    def _features(self, records: list[Record]) -> Tensor:
        """(B, n_img, 1280); images not prepared yet are encoded (and cached) now."""
        self._prepare_missing(records)
        return self.vision.features([self.vision._digest_of[r.image] for r in records])

    def _prepare_missing(self, records: list[Record]) -> None:
        missing = [r.image for r in records if r.image not in self.vision._digest_of]
        if missing:
            self.vision.prepare(missing)

    def pooled_image_features(self, records: list[Record]) -> Tensor:
        return self._features(records).mean(dim=1)  # (B, 1280)

    def keep_pooled_blocks(self, blocks: tuple[int, ...]) -> None:
        """Images encoded from now on also cache these blocks' pooled outputs (one forward for both)."""
        self.vision.pooled_blocks = tuple(dict.fromkeys((*self.vision.pooled_blocks, *blocks)))

    def pooled_block_features(self, records: list[Record], blocks: tuple[int, ...]) -> list[Tensor]:
        """Per vision block of ``blocks``: (B, C_block), its output mean-pooled (routing features that keep the
        colour and texture the final ImageNet features are largely insensitive to; method.image_feature_blocks)."""
        self._prepare_missing(records)
        return self.vision.pooled_block_features([r.image for r in records], blocks)

    def describe(self) -> dict:
        return {"backbone": "tiny", "vision": self.vision.identity, "vocab_size": self.tokenizer.get_vocab_size(),
                "lm_params": sum(p.numel() for p in self.model.lm.parameters()),
                "projector_params": sum(p.numel() for p in self.model.projector.parameters()),
                "base_stage": self.base_key}
