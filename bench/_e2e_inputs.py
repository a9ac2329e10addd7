"""What bench/gpu_e2e.py's phases run on: random-weight checkpoints of the real 7B configs' sizes and a small
3-task image stream. Nothing is downloaded.

checkpoints  ``build_checkpoint`` writes a random-weight LLaVA-1.5-7B or Qwen2-VL-7B-Instruct (``MODELS``) in
             bf16 with ``save_pretrained``, with an offline tokenizer and processor: the tiny builders of
             ``cramcl.backbones.hf.tiny_models`` give the architecture's config, special tokens, chat template
             and processor; this module overrides their sizes (``FULL``) and image processor, and never edits
             them. ``tiny=True`` keeps the builders' own sizes (``TINY``: hidden 64, 2 layers) in fp32 on the CPU.
stream       ``write_stream`` writes a benchmark YAML, JSONL records and PNG images of three tasks (``TASKS``:
             shape, colour, count).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

TASKS = ("shape", "colour", "count")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")

# key -> the tiny builder's architecture, the repository's backbone file, the real checkpoint it stands for
MODELS = {
    "llava": {"arch": "llava", "file": "configs/backbones/llava-1.5-7b.yaml", "real": "llava-hf/llava-1.5-7b-hf"},
    "qwen2_vl": {"arch": "qwen2_vl", "file": "configs/backbones/qwen2-vl-7b.yaml",
                 "real": "Qwen/Qwen2-VL-7B-Instruct"},
}

# The real checkpoints' config.json sizes, written over the tiny builders' configs (text, vision, top level).
FULL = {
    "llava": {  # CLIP ViT-L/14-336 + Vicuna-7B (Llama): 7.06 B parameters, 576 image tokens
        "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, head_dim=128, vocab_size=32064, max_position_embeddings=4096,
                     rms_norm_eps=1e-5),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
        "top": dict(image_seq_length=576),
    },
    "qwen2_vl": {  # a 675 M ViT (patch 14, 2x2 merge) + Qwen2-7B: 8.29 B parameters
        "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     layer_types=["full_attention"] * 28, max_window_layers=28,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
        "top": {},
    },
}
# --tiny: the builders' own sizes (hidden 64, 2 layers, 32 px); the override path runs all the same
TINY = {"llava": {"text": {}, "vision": {}, "top": {}}, "qwen2_vl": {"text": {}, "vision": {}, "top": {}}}


# ----------------------------------------------------------------------------------------------- checkpoints
def _processor_at_full_size(arch: str, processor) -> None:
    """The real checkpoints' image processing (336 px CLIP crop; Qwen2-VL's patch 14, 2x2 merge, its pixel range)."""
    import transformers as tf

    if arch == "llava":
        processor.image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 336},
                                                          crop_size={"height": 336, "width": 336})
        processor.patch_size = 14
    else:
        sizes = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56,
                     max_pixels=28 * 28 * 16384)
        processor.image_processor = tf.Qwen2VLImageProcessor(**sizes)
        if getattr(processor, "video_processor", None) is not None:
            processor.video_processor = tf.Qwen2VLVideoProcessor(**sizes)


def model_config(key: str, tiny: bool):
    """(model class, config, tokenizer, processor) of ``key`` at full (or tiny) size: the tiny builder's, with
    the sizes of ``FULL`` written over its config (nothing is instantiated at full size here)."""
    import logging

    import torch

    from cramcl.backbones.hf import tiny_models
    from cramcl.backbones.hf.tiny_tokenizers import build_tokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    arch, sizes = MODELS[key]["arch"], (TINY if tiny else FULL)[key]
    torch.manual_seed(0)
    tok = build_tokenizer(arch)
    small, processor = tiny_models._build(arch, tok, 64, 2)  # the architecture's config, ids and processor
    d = small.config.to_dict()
    d["text_config"].update(sizes["text"])
    d["vision_config"].update(sizes["vision"])
    d.update(sizes["top"])
    if not tiny:
        _processor_at_full_size(arch, processor)
    return type(small), type(small.config).from_dict(d), tok, processor


def build_checkpoint(key: str, out: Path, tiny: bool) -> dict:
    """Build ``key``'s model at full (or tiny) size with random weights and ``save_pretrained`` it into ``out``."""
    import torch
    from transformers import GenerationConfig

    from cramcl.backbones.hf import tiny_models
    from cramcl.backbones.hf.tiny_tokenizers import generation_stop_ids

    cls, config, tok, processor = model_config(key, tiny)
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(torch.float32)
    init_s = time.perf_counter() - t0
    stops = generation_stop_ids(MODELS[key]["arch"], tok)  # as build_tiny_model sets it
    model.generation_config = GenerationConfig(eos_token_id=stops if len(stops) > 1 else stops[0],
                                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                               do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    tiny_models.save_processor(processor, out)
    t0 = time.perf_counter()
    model.save_pretrained(out)
    text = config.get_text_config()
    return {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).removeprefix("torch."),
            "device": device, "init_s": round(init_s, 2), "save_s": round(time.perf_counter() - t0, 2),
            "hidden": text.hidden_size, "layers": text.num_hidden_layers, "vocab": text.vocab_size,
            "bytes_on_disk": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}


# ----------------------------------------------------------------------------------------------------- stream
def _draw(task: str, i: int, size: int):
    """(image, question, answer) number i of ``task``: one drawn shape, colour or count of dots."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(im)
    s = size / 32  # drawn on a 32-unit grid, scaled to the image
    names = list(COLOURS)
    if task == "shape":
        shape = SHAPES[i % 3]
        box = [int(v * s) for v in (6 + i % 3, 6, 26, 26 - i % 4)]
        fill = COLOURS[names[i % 4]]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
        return im, "What shape is in the image? Answer with one word.", shape
    if task == "colour":
        colour = names[i % 4]
        draw.rectangle([int(v * s) for v in (4 + i % 5, 5, 27, 28 - i % 3)], fill=COLOURS[colour])
        return im, "What colour is the shape? Answer with one word.", colour
    n = 1 + i % 5
    for k in range(n):
        x, y = 4 + (k * 11 + i) % 22, 4 + (k * 7 + 3 * i) % 22
        draw.ellipse([int(x * s), int(y * s), int((x + 4) * s), int((y + 4) * s)], fill=(255, 255, 255))
    return im, "How many dots are there? Answer with a number.", str(n)


def write_stream(root: Path, n_train: int, n_test: int, size: int) -> Path:
    """A 3-task benchmark under ``root``: bench.yaml, <task>/{train,test}.jsonl, images/<task>/*.png."""
    lines = ["name: gpu-e2e", "image_root: images", "tasks:"]
    for task in TASKS:
        (root / "images" / task).mkdir(parents=True, exist_ok=True)
        (root / task).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n_train + n_test):
            im, question, answer = _draw(task, i, size)
            im.save(root / "images" / task / f"{i}.png")
            rows.append({"id": f"{task}-{i}", "image": f"{task}/{i}.png", "question": question, "answer": answer})
        for split, part in (("train", rows[:n_train]), ("test", rows[n_train:])):
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        scorer = "number" if task == "count" else "exact"
        lines.append(f"  - {{name: {task}, train: {task}/train.jsonl, test: {task}/test.jsonl, scorer: {scorer}}}")
    (root / "bench.yaml").write_text("\n".join(lines) + "\n")
    return root / "bench.yaml"
