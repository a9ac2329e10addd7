"""A real MLLM as the frozen base: any local transformers image-text-to-text checkpoint (LLaVA-1.5, Qwen2-VL,
Qwen2.5-VL, Idefics3 / SmolVLM, InternVL-hf, LLaVA-OneVision, Gemma 3, ...), loaded with ``AutoProcessor`` +
``AutoModelForImageTextToText``.

Nothing is downloaded: the model comes from a local directory (``backbone.model_path``; ``$VARS`` and ``~``
are expanded) and the Hugging Face offline switches are set before transformers loads anything.
Batches are the processor's own tensors (``pixel_values``, ``image_grid_thw``, ``pixel_attention_mask``,
``mm_token_type_ids`` ... whatever the architecture needs) with prompts from the model's chat template
(:mod:`cramcl.backbones.hf.chat`), plus ``image_mask`` (B, L): the positions of the image tokens.
"""
from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import (AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,  # noqa: E402
                          GenerationConfig)

from cramcl.backbones.hf.chat import ChatFormat  # noqa: E402
from cramcl.backbones.hf.collate import HFCollator  # noqa: E402
from cramcl.data.records import Record  # noqa: E402
from cramcl.errors import BadInputError  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


@dataclass
class HFOptions:
    """What HFBackbone needs; ``from_config`` reads them from a BackboneConfig (see the module's caller)."""
    model_path: str
    dtype: str = "auto"  # auto = bfloat16 on a GPU, float32 on CPU | bfloat16 | float16 | float32
    gradient_checkpointing: bool = False
    max_length: int = 2048  # prompt (image tokens included) + answer; longer answers are cut
    max_new_tokens: int = 12
    attn_implementation: str | None = None  # None = transformers' default (sdpa); e.g. flash_attention_2
    feature_batch_size: int = 16  # images per forward when pooling routing features
    processor_kwargs: dict = field(default_factory=dict)  # passed to every processor call, e.g. max_pixels

    @classmethod
    def from_config(cls, cfg) -> "HFOptions":
        names = [f for f in cls.__dataclass_fields__ if hasattr(cfg, f)]
        return cls(**{f: getattr(cfg, f) for f in names})


def resolve_model_path(raw: str) -> Path:
    """Expand ``~`` and ``$VARS``; a missing directory is a BadInputError naming it (nothing is downloaded)."""
    if not raw:
        raise BadInputError("backbone.model_path: not set (a local directory of a transformers image-text-to-text "
                            "model, e.g. backbone.model_path=/models/llava-1.5-7b-hf)")
    path = Path(os.path.expandvars(os.path.expanduser(str(raw))))
    if not path.is_dir():
        unset = re.findall(r"\$\{?(\w+)", str(path))
        hint = f" (environment variable {', '.join(unset)} not set)" if unset else ""
        raise BadInputError(f"backbone.model_path: local model directory '{path}' not found{hint}; "
                            "nothing is downloaded: download the model first (see docs/real-models.md)")
    return path


class _ImageOnly:
    """Mixin: a processor whose video processor is absent (transformers' video processors need torchvision,
    image-only instruction tuning does not)."""

    def check_argument_for_proper_class(self, name, arg):
        if arg is None and "video" in name:
            return None
        return super().check_argument_for_proper_class(name, arg)


def image_only_processor(cls, **parts):
    """An instance of processor class ``cls`` built from its parts with ``video_processor=None``."""
    return type(cls.__name__, (_ImageOnly, cls), {})(video_processor=None, **parts)


def load_processor(path: Path):
    """``AutoProcessor``; if only its video processor cannot load (no torchvision), the image-only processor."""
    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError) as exc:
        video_only = any(w in str(exc).lower() for w in ("video", "torchvision"))
        if not video_only or not (path / "processor_config.json").is_file():
            raise BadInputError(f"{path}: cannot load the processor: {str(exc).splitlines()[0]}") from None
    config = json.loads((path / "processor_config.json").read_text())
    cls = getattr(transformers, config["processor_class"])
    accepted = inspect.signature(cls.__init__).parameters
    extra = {k: v for k, v in config.items() if k in accepted and k not in cls.get_attributes()}
    template = path / "chat_template.jinja"
    extra["chat_template"] = template.read_text() if template.is_file() else None
    return image_only_processor(cls, image_processor=AutoImageProcessor.from_pretrained(path),
                                tokenizer=AutoTokenizer.from_pretrained(path), **extra)


def _explicit_params(fn) -> set[str]:
    return {n for n, p in inspect.signature(fn).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


class _Captured(Exception):
    """Raised by a hook to stop a forward once the LLM's input embeddings are known."""


class HFBackbone:
    """The Backbone protocol over a local transformers image-text-to-text model (frozen)."""

    def __init__(self, options: HFOptions | None = None, log=print, **kwargs):
        self.options = opts = options or HFOptions(**kwargs)
        self.path = resolve_model_path(opts.model_path)
        if opts.dtype != "auto" and opts.dtype not in DTYPES:
            raise BadInputError(f"backbone.dtype: '{opts.dtype}' is not one of auto, {', '.join(DTYPES)}")
        self.dtype = DTYPES.get(opts.dtype) or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        log(f"loading {self.path} ({str(self.dtype).removeprefix('torch.')})")
        self.processor = load_processor(self.path)
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.path, dtype=self.dtype, attn_implementation=opts.attn_implementation)
        except (OSError, ValueError, KeyError) as exc:
            raise BadInputError(f"{self.path}: cannot load an image-text-to-text model: "
                                f"{str(exc).splitlines()[0]}") from None
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        if opts.gradient_checkpointing:
            # non-reentrant checkpointing gives the adapters gradients although every input is frozen
            # (the reentrant variant would need enable_input_require_grads())
            ckpt = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # the name in recent transformers 5.x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        config = self.model.config
        self.text_config = config.get_text_config()
        self.num_layers = int(self.text_config.num_hidden_layers)
        self._lm = self._find_language_model()

        self.tokenizer = tok = self.processor.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        gen = self.model.generation_config
        gen_eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        eos = tok.eos_token_id if tok.eos_token_id is not None else gen_eos[0]
        self.stop_ids = list(dict.fromkeys(i for i in [eos, *gen_eos] if i is not None))
        self.chat = ChatFormat(self.processor, self.stop_ids, eos, str(self.path))
        candidates = (getattr(config, "image_token_id", None), getattr(config, "image_token_index", None),
                      getattr(self.processor, "image_token_id", None))
        self.image_token_id = next((v for v in candidates if v is not None), None)
        if self.image_token_id is None:
            raise BadInputError(f"{self.path}: the model config names no image token id")
        self.generation_config = GenerationConfig(max_new_tokens=opts.max_new_tokens, do_sample=False, num_beams=1,
                                                  eos_token_id=self.stop_ids, pad_token_id=tok.pad_token_id)
        self._forward_keys = _explicit_params(self.model.forward)
        self._feature_cache: dict[Path, Tensor] = {}

    # ------------------------------------------------------------------ structure
    def _find_language_model(self) -> nn.Module:
        lm = self.model.get_decoder()
        layers = [n for n, _ in lm.named_modules() if re.fullmatch(r"(?:.*\.)?layers\.\d+", n)]
        if lm is self.model or len(layers) != self.num_layers:
            raise RuntimeError(f"{self.path}: could not isolate the language model ({type(lm).__name__} has "
                               f"{len(layers)} decoder layers, the text config says {self.num_layers})")
        return lm

    @property
    def language_model(self) -> nn.Module:
        """The LLM decoder (no vision tower, no projector): adapters go on its attention projections."""
        return self._lm

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ batches
    def prepare(self, records: list[Record], desc: str = "") -> None:
        """Nothing to precompute: images are read per batch (routing features are cached on first use)."""

    @property
    def collator(self) -> HFCollator:
        """The picklable batch builder (image decoding + processor), run in DataLoader workers."""
        return HFCollator(self.processor, self.chat, frozenset(self._forward_keys), self.tokenizer.pad_token_id,
                          self.image_token_id, self.dtype, self.options.max_length, dict(self.options.processor_kwargs))

    def collate(self, records: list[Record], train: bool) -> dict:
        """See :class:`HFCollator`."""
        return self.collator(records, train)

    def model_inputs(self, batch: dict) -> dict:
        """What the model's forward takes (``image_mask`` and ``records`` stay out)."""
        inputs = {k: v for k, v in batch.items() if k in self._forward_keys and torch.is_tensor(v)}
        if "labels" in inputs:
            inputs["use_cache"] = False
        return inputs

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, model: nn.Module, batch: dict, on_step=None) -> list[str]:
        """Greedy answers of a left-padded prompt batch (``collate(..., train=False)``), prompt stripped.

        ``on_step`` is called before every forward of the decoding loop."""
        inputs = {k: v for k, v in self.model_inputs(batch).items() if k not in ("labels", "use_cache")}
        hook = model.register_forward_pre_hook(lambda *_: on_step()) if on_step is not None else None
        try:
            out = model.generate(**inputs, generation_config=self.generation_config)
        finally:
            if hook is not None:
                hook.remove()
        new = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    # ------------------------------------------------------------------ routing features
    @torch.no_grad()
    def pooled_image_features(self, records: list[Record]) -> Tensor:
        """(B, D) float32 on CPU: the mean over an image's tokens of the model's projected image features (what
        the LLM receives at the image positions); cached per image path."""
        todo = list(dict.fromkeys(r.image for r in records if r.image not in self._feature_cache))
        by_path = {r.image: r for r in records}
        step = max(1, self.options.feature_batch_size)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(todo), step):
                chunk = [by_path[p] for p in todo[start:start + step]]
                self._feature_cache.update(zip((r.image for r in chunk), self._pool(chunk)))
        finally:
            self.model.train(was_training)
        return torch.stack([self._feature_cache[r.image] for r in records])

    def _pool(self, records: list[Record]) -> list[Tensor]:
        batch = self.collate(records, train=False)
        counts = batch["image_mask"].sum(1).tolist()
        feats = self._image_features(batch)
        if feats is None or feats.shape[0] != sum(counts):
            feats = self._embeds_at_image_tokens(batch)
        return [chunk.float().mean(0).cpu() for chunk in feats.split(counts)]

    def _image_features(self, batch: dict) -> Tensor | None:
        """(N_image_tokens, D) from ``get_image_features`` (None if the model has none)."""
        get = getattr(self.model, "get_image_features", None)
        if get is None:
            return None
        keys = _explicit_params(get)
        inputs = {k: v.to(self.device) for k, v in batch.items() if k in keys and torch.is_tensor(v)}
        out = get(**inputs)
        pooled = getattr(out, "pooler_output", out)
        parts = pooled if isinstance(pooled, (list, tuple)) else [pooled]
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])

    def _embeds_at_image_tokens(self, batch: dict) -> Tensor:
        """(N_image_tokens, D): the LLM's input embeddings at the image positions (a hook stops the forward)."""
        seen = {}

        def grab(_module, args, kwargs):
            seen["embeds"] = kwargs.get("inputs_embeds", args[0] if args else None)
            raise _Captured

        handle = self._lm.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(**{k: v.to(self.device) for k, v in self.model_inputs(batch).items()})
        except _Captured:
            pass
        finally:
            handle.remove()
        return seen["embeds"][batch["image_mask"].to(self.device)]

    # ------------------------------------------------------------------ description
    def describe(self) -> dict:
        return {"backbone": "hf", "model_path": str(self.path), "model_type": self.model.config.model_type,
                "architecture": type(self.model).__name__, "dtype": str(self.dtype).removeprefix("torch."),
                "num_layers": self.num_layers, "hidden_size": int(self.text_config.hidden_size),
                "lm_params": sum(p.numel() for p in self._lm.parameters()),
                "total_params": sum(p.numel() for p in self.model.parameters()),
                "image_token_id": int(self.image_token_id),
                "gradient_checkpointing": bool(self.options.gradient_checkpointing),
                "max_length": self.options.max_length, "transformers": transformers.__version__}
