"""The base shipped in the package for the built-in stream (`backbone.base_path: builtin`, the default profile):
found, complete, made on the current stream, holding every word the stream can generate, used for the
built-in stream only."""
from __future__ import annotations

import json

import pytest

from cramcl.backbones.tiny.saved_base import check_vocabulary, read_saved_base, resolve_base_path, shipped_base_dir
from cramcl.config import resolve_config
from cramcl.data.benchmark import load_benchmark
from cramcl.data.builtin import BUILTIN_TASKS, generate_builtin


def test_builtin_names_the_shipped_base_for_the_built_in_stream_only():
    assert resolve_base_path("builtin", "") == str(shipped_base_dir())
    assert resolve_base_path("builtin", "my/benchmark.yaml") == ""  # its own words: trained from its corpus
    assert resolve_base_path("", "") == ""
    assert resolve_base_path("~/b", "") not in ("", "~/b")  # an explicit directory, expanded
    cfg = resolve_config(method="cram", profile="default")
    assert cfg.backbone.base_path == "builtin"


def test_the_default_profile_builds_the_built_in_stream_on_the_shipped_base():
    """No base stage: the weights, the vocabulary and the recipe come from the package."""
    from cramcl.backbones import build_backbone
    from cramcl.data.stream import load_stream

    cfg = resolve_config(method="cram", profile="default",
                         overrides=["data.builtin_n_train=20", "data.builtin_n_test=10"])
    lines = []
    backbone = build_backbone(cfg, load_stream(cfg.data), log=lines.append)
    saved = read_saved_base(shipped_base_dir())
    assert backbone.base_key == f"saved:{saved.digest}"
    assert not any("base stage" in str(line) for line in lines)
    made_by = saved.meta["made_by"]
    assert made_by["benchmark"]["tasks"] == list(BUILTIN_TASKS)  # made on the stream it ships with


@pytest.mark.parametrize("seed,n_train", [(0, 40), (1, 30)])
def test_the_shipped_vocabulary_holds_every_word_of_the_built_in_stream(tmp_path, seed, n_train):
    bench = load_benchmark(generate_builtin(tmp_path / "b", seed=seed, n_train=n_train, n_test=20, n_pretrain=60))
    check_vocabulary(read_saved_base(shipped_base_dir()), bench)  # raises BadInputError naming unknown words


def test_a_real_model_config_may_keep_the_profiles_builtin_base_path():
    cfg = resolve_config(method="lora-ft", profile="default", overrides=["backbone.name=hf"])
    assert cfg.backbone.base_path == "builtin"  # meaningless to a real model, and not an error


def test_the_shipped_base_json_records_how_to_remake_it():
    meta = json.loads((shipped_base_dir() / "base.json").read_text())
    config = meta["made_by"]["backbone_config"]
    assert {k: config[k] for k in ("base_first_steps", "base_first_lr", "base_steps", "base_lr")} == {
        "base_first_steps": 2000, "base_first_lr": 5e-4, "base_steps": 1000, "base_lr": 5e-4}
