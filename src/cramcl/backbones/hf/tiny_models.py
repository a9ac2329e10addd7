"""Tiny random-weight image-text-to-text models of real transformers architectures, built offline.

Each builder makes a model from its config alone (no weights are downloaded), a byte-level BPE tokenizer
trained in milliseconds on a small corpus (so any text round-trips), the architecture's own image processor
at a small size, and the processor with a chat template in the architecture's prompt format; everything is
written with ``save_pretrained`` so :class:`~cramcl.backbones.hf.backbone.HFBackbone` loads it by path,
exactly as it loads a user's real checkpoint. Tests and benchmarks use them to prove the real-model path.

    build_tiny_model("llava", "/tmp/tiny-llava")   # also: qwen2_vl, idefics3, internvl
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.utils import is_torchvision_available

from cramcl.backbones.hf.backbone import image_only_processor

ARCHITECTURES = ("llava", "qwen2_vl", "idefics3", "internvl")
IMAGE_SIZE = 32  # pixels; every builder gives 16 image tokens per image at this size
IMAGE_TOKENS = 16

_CORPUS = [  # tokenizer training text; byte-level BPE round-trips any other text too
    "USER: ASSISTANT: User: Assistant: user assistant system",
    "What shape is in the image? circle square triangle star",
    "What colour is the shape? red green blue yellow black white",
    "How many dots are there? one two three four five 1 2 3 4 5",
    "Is there a circle in the image? yes no. Answer with one word.",
    "Read the text in the image. Describe the image in a sentence.",
]

# Chat templates, one per architecture's prompt format (content: a list of {"type": "image"|"text"} parts).
_PARTS = ("{% for c in m['content'] %}{% if c['type'] == 'image' %}IMG{% endif %}{% endfor %}"
          "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}")
_TEMPLATES = {
    # LLaVA-1.5: "USER: <image>\n{question} ASSISTANT: {answer}</s>"
    "llava": ("{% for m in messages %}{% if m['role'] == 'user' %}USER: " + _PARTS.replace("IMG", "<image>\n")
              + " {% else %}ASSISTANT: " + _PARTS.replace("IMG", "") + "</s>{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
    # Qwen2-VL: ChatML with <|vision_start|><|image_pad|><|vision_end|>
    "qwen2_vl": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 + _PARTS.replace("IMG", "<|vision_start|><|image_pad|><|vision_end|>")
                 + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    # Idefics3 / SmolVLM: "<|begin_of_text|>User:<image>{question}<end_of_utterance>\nAssistant: {answer}..."
    "idefics3": ("<|begin_of_text|>{% for m in messages %}{% if m['role'] == 'user' %}User:"
                 + _PARTS.replace("IMG", "<image>") + "{% else %}Assistant: " + _PARTS.replace("IMG", "")
                 + "{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"),
    # InternVL (HF-native): ChatML with <IMG_CONTEXT> expanded by the processor to <img>...</img>
    "internvl": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + _PARTS.replace("IMG", "<IMG_CONTEXT>\n")
                 + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
_SPECIAL = {  # (specials in vocabulary order, bos, eos, pad, extra attributes for the tokenizer)
    "llava": (["<pad>", "<s>", "</s>", "<image>"], "<s>", "</s>", "<pad>", {"image_token": "<image>"}),
    "qwen2_vl": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"], None, "<|im_end|>", "<|endoftext|>",
                 {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}),
    "idefics3": (["<|end_of_text|>", "<|begin_of_text|>", "<end_of_utterance>", "<fake_token_around_image>",
                  "<image>", "<global-img>"], "<|begin_of_text|>", "<end_of_utterance>", "<|end_of_text|>", {}),
    "internvl": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
                 None, "<|im_end|>", "<|endoftext|>",
                 {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}),
}


def build_tokenizer(arch: str, corpus: list[str] = (), vocab_size: int = 384):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the architecture's special tokens and chat template."""
    specials, bos, eos, pad, extra = _SPECIAL[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*_CORPUS, *corpus] * 4, trainer)
    kwargs = {"bos_token": bos} if bos else {}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                  extra_special_tokens=extra or None, chat_template=_TEMPLATES[arch], **kwargs)
    out.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (bos, eos, pad)]})
    return out


def _text_config(kind: str, tok, hidden: int, layers: int, heads: int, **extra) -> dict:
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    return dict(model_type=kind, vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=512, tie_word_embeddings=False, **ids, **extra)


def _video_processor(name: str, **kwargs):
    """The architecture's video processor where torchvision is installed (it needs it), else None."""
    return getattr(tf, name)(**kwargs) if is_torchvision_available() else None


def _processor(cls, video, **parts):
    return cls(video_processor=video, **parts) if video is not None else image_only_processor(cls, **parts)


def _build(arch: str, tok, hidden: int, layers: int):
    """(model, processor) for ``arch`` with a ``hidden``-wide LLM of ``layers`` layers."""
    heads = 4
    S = IMAGE_SIZE
    tid = tok.convert_tokens_to_ids
    if arch == "llava":  # CLIP 32 px / patch 8 -> 16 patches + CLS; the "default" strategy drops the CLS
        config = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=S, patch_size=8),
            text_config=_text_config("llama", tok, hidden, layers, heads), image_token_index=tid("<image>"),
            vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=IMAGE_TOKENS)
        ip = tf.CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
        proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                                 vision_feature_select_strategy="default", chat_template=_TEMPLATES[arch])
        return tf.LlavaForConditionalGeneration(config), proc
    if arch == "qwen2_vl":  # 32x32 at patch 4 -> 8x8 patches, merged 2x2 -> 16 tokens; mrope sums to head_dim/2
        half = hidden // heads // 2
        t = half // 4
        h = (half - t) // 2
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [t, h, half - t - h]}
        config = tf.Qwen2VLConfig(
            text_config=_text_config("qwen2_vl_text", tok, hidden, layers, heads, rope_parameters=rope),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
            vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
        ip = tf.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                      min_pixels=S * S, max_pixels=S * S)
        video = _video_processor("Qwen2VLVideoProcessor", patch_size=4, merge_size=2, temporal_patch_size=2,
                                 min_pixels=S * S, max_pixels=S * S)
        proc = _processor(tf.Qwen2VLProcessor, video, image_processor=ip, tokenizer=tok,
                          chat_template=_TEMPLATES[arch])
        return tf.Qwen2VLForConditionalGeneration(config), proc
    if arch == "idefics3":  # 32 px / patch 4 -> 64 patches, pixel shuffle by 2 -> 16 tokens
        config = tf.Idefics3Config(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=S, patch_size=4),
            text_config=_text_config("llama", tok, hidden, layers, heads), scale_factor=2,
            image_token_id=tid("<image>"))
        ip = tf.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": S},
                                       max_image_size={"longest_edge": S})
        proc = tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=IMAGE_TOKENS,
                                    chat_template=_TEMPLATES[arch])
        return tf.Idefics3ForConditionalGeneration(config), proc
    if arch == "internvl":  # 32 px / patch 4 -> 64 patches, pixel shuffle 0.5 -> 16 tokens
        config = tf.InternVLConfig(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=[S, S], patch_size=[4, 4]),
            text_config=_text_config("qwen2", tok, hidden, layers, heads), image_token_id=tid("<IMG_CONTEXT>"),
            image_seq_length=IMAGE_TOKENS, downsample_ratio=0.5, vision_feature_layer=-1,
            vision_feature_select_strategy="default", tie_word_embeddings=False)
        ip = tf.GotOcr2ImageProcessor(size={"height": S, "width": S}, max_patches=1)
        video = _video_processor("InternVLVideoProcessor", size={"height": S, "width": S})
        proc = _processor(tf.InternVLProcessor, video, image_processor=ip, tokenizer=tok,
                          image_seq_length=IMAGE_TOKENS, chat_template=_TEMPLATES[arch])
        return tf.InternVLForConditionalGeneration(config), proc
    raise ValueError(f"unknown tiny architecture '{arch}' (known: {', '.join(ARCHITECTURES)})")


def build_tiny_model(arch: str, out_dir: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0,
                     corpus: list[str] = ()) -> Path:
    """Build a random-weight ``arch`` model + processor and ``save_pretrained`` both into ``out_dir``.

    ``corpus``: extra text for the tokenizer's merges (optional; any text round-trips anyway). Returns the
    directory; an existing complete one is reused."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "processor_config.json").is_file():
        return out
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    tok = build_tokenizer(arch, list(corpus))
    model, processor = _build(arch, tok, hidden, layers)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id, do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    save_processor(processor, out)
    model.save_pretrained(out)
    return out


def save_processor(processor, out: Path) -> None:
    """``save_pretrained``, also for an image-only processor (no video processor: transformers' own
    save needs every part); the files are the ones a full save writes for the image and text parts."""
    if getattr(processor, "video_processor", True) is not None:
        processor.save_pretrained(out)
        return
    processor.tokenizer._set_processor_class(type(processor).__name__)
    processor.tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(processor.chat_template)
    config = {k: v for k, v in processor.to_dict().items() if v is not None and k != "chat_template"}
    (out / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_tiny_clip(out_dir: str | Path, *, projection_dim: int = 16, seed: int = 0) -> Path:
    """A random-weight CLIP (text + vision towers) with tokenizer and image processor, saved like a real
    checkpoint: the stand-in for the paper's CLIP routing encoders in tests (nothing is downloaded)."""
    # here, not at the top: without torchvision, importing CLIPImageProcessor logs a fallback warning
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out = Path(out_dir)
    tok = build_tokenizer("llava")
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out
