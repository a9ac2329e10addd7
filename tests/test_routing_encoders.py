"""Routing encoders from local paths: a random-weight CLIP built from config stands in for the paper's CLIP."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import LogSink, quick_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from cramcl.backbones.hf.tiny_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_clip_text_and_image_encoders_load_from_a_path(clip_dir, warm_cache):
    from cramcl.data.stream import load_stream
    from cramcl.encoders import ClipImageEncoder, TextEncoder

    text = TextEncoder(str(clip_dir))
    assert text.is_clip
    t = text.encode(["What shape is in the image?", "Read the printed number.", "What shape is in the image?"])
    assert t.shape == (3, 16) and torch.equal(t[0], t[2]) and not torch.allclose(t[0], t[1])
    records = list(load_stream(quick_config().data).tasks[0].test[:4])
    image = ClipImageEncoder(str(clip_dir))
    q1, q2 = image.encode_records(records), image.encode_records(records[::-1])
    assert q1.shape == (4, 16) and torch.equal(q1, q2.flip(0))  # cached per image, order-independent


def test_missing_encoder_path_is_bad_input(tmp_path):
    from cramcl.encoders import TextEncoder
    from cramcl.errors import BadInputError

    with pytest.raises(BadInputError, match="not found"):
        TextEncoder(str(tmp_path / "nope"))


def test_cram_routes_with_clip_encoders(tmp_path, clip_dir, warm_cache):
    from cramcl.engine.runner import run_stream

    cfg = quick_config("cram", [f"method.text_encoder={clip_dir}", f"method.image_encoder={clip_dir}",
                                "train.steps_per_task=4"])
    out = tmp_path / "run"
    run_stream(cfg, out, log=LogSink())
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    centroids = json.loads((out / "checkpoints" / "task_2" / "method.json").read_text())["cram"]
    assert len(centroids["expert_group"]) == 3
    from safetensors.torch import load_file

    tensors = load_file(str(out / "checkpoints" / "task_2" / "method.safetensors"))
    assert tensors["cram.centroids.0"].shape[-1] == 16  # centroids live in CLIP's projection space
    assert tensors["cram.groups.prototypes"].shape[-1] == 16
    assert set(metrics["method_analysis"]["group_accuracy"]) == {"shape", "colour", "ocr"}
