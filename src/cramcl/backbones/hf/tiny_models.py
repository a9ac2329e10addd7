"""Tiny random-weight image-text-to-text models of real transformers architectures, built offline.

Each builder makes a model from its config alone (no weights are downloaded), a byte-level BPE tokenizer
(:mod:`cramcl.backbones.hf.tiny_tokenizers`: the architecture's special tokens and chat template), the
architecture's own image processor at a small size and its processor; everything is written with
``save_pretrained`` so :class:`~cramcl.backbones.hf.backbone.HFBackbone` loads it by path, exactly as it loads
a user's real checkpoint. Tests and benchmarks use them to prove the real-model path.

    build_tiny_model("llava", "/tmp/tiny-llava")   # or any other name of ARCHITECTURES
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import transformers as tf
from transformers import GenerationConfig
from transformers.utils import is_torchvision_available

from cramcl.backbones.hf.backbone import image_only_processor
from cramcl.backbones.hf.tiny_tokenizers import TEMPLATES, build_tokenizer, generation_stop_ids

__all__ = ["ARCHITECTURES", "IMAGE_SIZE", "IMAGE_TOKENS", "ONEVISION_IMAGE_TOKENS", "build_tiny_clip",
           "build_tiny_model", "build_tokenizer", "save_processor"]

ARCHITECTURES = ("llava", "qwen2_vl", "idefics3", "internvl", "qwen2_5_vl", "llava_onevision", "gemma3")
IMAGE_SIZE = 32  # pixels; every builder but llava_onevision gives 16 image tokens per image at this size
IMAGE_TOKENS = 16
# llava_onevision (anyres): 16 base tokens + the best grid of 32 px tiles (one per pinpoint cell), 4 x 4 tokens
# a tile plus one newline token a row; by square image side: 32 px -> 1 tile, 48 px -> a 2 x 2 grid
ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
ONEVISION_IMAGE_TOKENS = {32: 16 + 4 * 5, 48: 16 + 8 * 9}


def _text_config(kind: str, tok, hidden: int, layers: int, heads: int, **extra) -> dict:
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    return {**dict(model_type=kind, vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                   max_position_embeddings=512, tie_word_embeddings=False, **ids), **extra}


def _video_processor(name: str, **kwargs):
    """The architecture's video processor where torchvision is installed (it needs it), else None."""
    return getattr(tf, name)(**kwargs) if is_torchvision_available() else None


def _processor(cls, video, **parts):
    return cls(video_processor=video, **parts) if video is not None else image_only_processor(cls, **parts)


def _qwen_rope(hidden: int, heads: int) -> dict:
    """mrope sections (temporal, height, width) that sum to half the head dimension."""
    half = hidden // heads // 2
    t = half // 4
    h = (half - t) // 2
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [t, h, half - t - h]}


def _qwen_vision_ids(tid) -> dict:
    return dict(image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))


def _qwen_processor(cls, arch: str, tok):
    """32x32 px at patch 4 -> 8x8 patches, merged 2x2 -> 16 tokens (Qwen2-VL's and Qwen2.5-VL's processor)."""
    S = IMAGE_SIZE
    sizes = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=S * S, max_pixels=S * S)
    video = _video_processor("Qwen2VLVideoProcessor", **sizes)
    return _processor(cls, video, image_processor=tf.Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                      chat_template=TEMPLATES[arch])


def _llava(tok, hidden, layers, heads):  # CLIP 32 px / patch 8 -> 16 patches + CLS; "default" drops the CLS
    S = IMAGE_SIZE
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=S, patch_size=8),
        text_config=_text_config("llama", tok, hidden, layers, heads),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=IMAGE_TOKENS)
    ip = tf.CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                             vision_feature_select_strategy="default", chat_template=TEMPLATES["llava"])
    return tf.LlavaForConditionalGeneration(config), proc


def _qwen2_vl(tok, hidden, layers, heads):
    config = tf.Qwen2VLConfig(
        text_config=_text_config("qwen2_vl_text", tok, hidden, layers, heads,
                                 rope_parameters=_qwen_rope(hidden, heads)),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
        **_qwen_vision_ids(tok.convert_tokens_to_ids))
    return tf.Qwen2VLForConditionalGeneration(config), _qwen_processor(tf.Qwen2VLProcessor, "qwen2_vl", tok)


def _qwen2_5_vl(tok, hidden, layers, heads):
    # window attention over 2x2 merged tokens (window 16 px at patch 4, merge 2) in block 0, full in block 1
    config = tf.Qwen2_5_VLConfig(
        text_config=_text_config("qwen2_5_vl_text", tok, hidden, layers, heads,
                                 rope_parameters=_qwen_rope(hidden, heads)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[1]),
        **_qwen_vision_ids(tok.convert_tokens_to_ids))
    return tf.Qwen2_5_VLForConditionalGeneration(config), _qwen_processor(tf.Qwen2_5_VLProcessor, "qwen2_5_vl", tok)


def _idefics3(tok, hidden, layers, heads):  # 32 px / patch 4 -> 64 patches, pixel shuffle by 2 -> 16 tokens
    S = IMAGE_SIZE
    config = tf.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=S, patch_size=4),
        text_config=_text_config("llama", tok, hidden, layers, heads), scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"))
    ip = tf.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": S},
                                   max_image_size={"longest_edge": S})
    proc = tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=IMAGE_TOKENS,
                                chat_template=TEMPLATES["idefics3"])
    return tf.Idefics3ForConditionalGeneration(config), proc


def _internvl(tok, hidden, layers, heads):  # 32 px / patch 4 -> 64 patches, pixel shuffle 0.5 -> 16 tokens
    S = IMAGE_SIZE
    config = tf.InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[S, S], patch_size=[4, 4]),
        text_config=_text_config("qwen2", tok, hidden, layers, heads),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=IMAGE_TOKENS,
        downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False)
    ip = tf.GotOcr2ImageProcessor(size={"height": S, "width": S}, max_patches=1)
    video = _video_processor("InternVLVideoProcessor", size={"height": S, "width": S})
    proc = _processor(tf.InternVLProcessor, video, image_processor=ip, tokenizer=tok,
                      image_seq_length=IMAGE_TOKENS, chat_template=TEMPLATES["internvl"])
    return tf.InternVLForConditionalGeneration(config), proc


def _llava_onevision(tok, hidden, layers, heads):
    # SigLIP 32 px / patch 8 -> 16 tokens a tile (no CLS: strategy "full"); anyres tiles as the checkpoints do
    S = IMAGE_SIZE
    tid = tok.convert_tokens_to_ids
    config = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=S, patch_size=8),
        text_config=_text_config("qwen2", tok, hidden, layers, heads), image_token_index=tid("<image>"),
        video_token_index=tid("<video>"), vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=ONEVISION_PINPOINTS)
    ip = tf.LlavaOnevisionImageProcessor(size={"height": S, "width": S}, image_grid_pinpoints=ONEVISION_PINPOINTS)
    video = _video_processor("LlavaOnevisionVideoProcessor", size={"height": S, "width": S})
    proc = _processor(tf.LlavaOnevisionProcessor, video, image_processor=ip, tokenizer=tok,
                      num_image_tokens=IMAGE_TOKENS, vision_feature_select_strategy="full",
                      vision_aspect_ratio="anyres_max_9", chat_template=TEMPLATES["llava_onevision"])
    return tf.LlavaOnevisionForConditionalGeneration(config), proc


def _gemma3(tok, hidden, layers, heads):
    # SigLIP 32 px / patch 4 -> 8x8 patches, average-pooled to 4x4 = 16 tokens; sliding-window and global
    # layers alternate, with a window shorter than a training row so that the sliding mask is exercised
    S = IMAGE_SIZE
    tid = tok.convert_tokens_to_ids
    kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    text = _text_config("gemma3_text", tok, hidden, layers, heads, head_dim=hidden // heads,
                        query_pre_attn_scalar=hidden // heads, sliding_window=24, layer_types=kinds,
                        tie_word_embeddings=True)
    config = tf.Gemma3Config(
        vision_config=tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=S, patch_size=4),
        text_config=text, mm_tokens_per_image=IMAGE_TOKENS, image_token_index=tid("<image_soft_token>"),
        boi_token_index=tid("<start_of_image>"), eoi_token_index=tid("<end_of_image>"))
    ip = tf.Gemma3ImageProcessor(size={"height": S, "width": S}, do_pan_and_scan=False)
    proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=IMAGE_TOKENS,
                              chat_template=TEMPLATES["gemma3"])
    model = tf.Gemma3ForConditionalGeneration(config)
    # transformers initialises the projector's matrix to zeros (every image would look the same): random here
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=config.initializer_range)
    return model, proc


_BUILDERS = {"llava": _llava, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "idefics3": _idefics3,
             "internvl": _internvl, "llava_onevision": _llava_onevision, "gemma3": _gemma3}


def _build(arch: str, tok, hidden: int, layers: int):
    """(model, processor) for ``arch`` with a ``hidden``-wide LLM of ``layers`` layers (4 heads)."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown tiny architecture '{arch}' (known: {', '.join(ARCHITECTURES)})")
    return _BUILDERS[arch](tok, hidden, layers, 4)


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
    stops = generation_stop_ids(arch, tok)
    model.generation_config = GenerationConfig(eos_token_id=stops if len(stops) > 1 else stops[0],
                                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                               do_sample=False)
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
