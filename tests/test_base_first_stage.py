"""The base stage's first stage (`pretrain_first:` + `backbone.base_first_*`): its records are trained alone,
with their own steps, lr and warm-up, before the base stage proper, and they are part of the base's cache key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import LogSink, quick_config

FIRST_QUESTION = "Which option says {} ? Options: A {} B {} Answer with the letter."


def _bench_with_first(tmp_path: Path) -> Path:
    """The quick stream's shape task and the built-in corpus's captions, plus 12 option-reading records."""
    from cramcl.data.stream import builtin_benchmark_path

    root = builtin_benchmark_path(quick_config().data).parent
    captions = [r for r in map(json.loads, open(root / "pretrain.jsonl")) if r["question"] == "Describe the image."]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    rows = []
    for i, r in enumerate(captions[:12]):
        word, other = ("red", "blue") if i % 2 else ("blue", "red")
        options = (word, other) if i % 3 else (other, word)
        rows.append({"id": f"first-{i}", "image": r["image"], "question": FIRST_QUESTION.format(word, *options),
                     "answer": "A" if options[0] == word else "B"})
    (tmp_path / "first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.yaml").write_text(
        f"name: first\nimage_root: {root / 'images'}\npretrain: captions.jsonl\n"
        "pretrain_first: first.jsonl\n"
        f"tasks:\n  - name: shape\n    train: {root / 'shape' / 'train.json'}\n    test: {root / 'shape' / 'test.jsonl'}\n"
        "    scorer: exact\n")
    return tmp_path / "b.yaml"


def _build(bench: Path, extra: list[str]):
    from cramcl.backbones import build_backbone
    from cramcl.data.stream import load_stream

    cfg = quick_config(extra=[f"data.benchmark={bench}", "data.tasks=null", *extra])
    log = LogSink()
    return build_backbone(cfg, load_stream(cfg.data), log=log), log


def test_first_stage_trains_its_records_alone_first_with_its_own_settings(tmp_path, monkeypatch):
    import cramcl.backbones.tiny.base_stage as base_stage

    bench = _bench_with_first(tmp_path)
    monkeypatch.setenv("CRAMCL_CACHE", str(tmp_path / "cache"))  # nothing cached: the stages run
    calls = []

    def recorded(model, make_batch, n_records, steps, batch_size, lr, seed, warmup=None):
        batch = make_batch(list(range(min(4, n_records))))
        calls.append({"n": n_records, "steps": steps, "lr": lr, "warmup": warmup, "ids": batch["input_ids"]})

    monkeypatch.setattr(base_stage, "_train", recorded)
    backbone, log = _build(bench, ["backbone.base_first_steps=7", "backbone.base_first_lr=3e-4",
                                   "backbone.base_first_warmup=2", "backbone.base_steps=5"])
    first, main = calls
    assert (first["n"], first["steps"], first["lr"], first["warmup"]) == (12, 7, 3e-4, 2)
    assert (main["steps"], main["lr"], main["warmup"]) == (5, backbone.cfg.base_lr, None) and main["n"] > 12
    decode = backbone.tokenizer.decode
    assert all("Which option says" in decode(row.tolist()) for row in first["ids"])
    assert not any("Which option says" in decode(row.tolist()) for row in main["ids"])
    assert any("7 steps on the first-stage records" in line for line in log.lines)

    calls.clear()
    without, _ = _build(bench, ["backbone.base_steps=5"])
    assert len(calls) == 1 and without.base_key != backbone.base_key
    # the first corpus's words are in the vocabulary whether or not its stage runs
    assert without.tokenizer.get_vocab() == backbone.tokenizer.get_vocab()


def test_a_first_stage_base_trains_and_is_cached(tmp_path, monkeypatch):
    bench = _bench_with_first(tmp_path)
    monkeypatch.setenv("CRAMCL_CACHE", str(tmp_path / "cache"))
    settings = ["backbone.base_first_steps=2", "backbone.base_steps=2", "backbone.base_batch_size=8"]
    trained, log = _build(bench, settings)
    assert any("base stage" in line for line in log.lines)
    again, log = _build(bench, settings)
    assert not any("base stage" in line for line in log.lines) and again.base_key == trained.base_key
    for name, value in trained.model.state_dict().items():
        assert (value == again.model.state_dict()[name]).all()


def test_first_stage_steps_without_first_stage_records_are_bad_input(tmp_path):
    from cramcl.errors import BadInputError

    bench = _bench_with_first(tmp_path)
    bench.write_text(bench.read_text().replace("pretrain_first: first.jsonl\n", ""))
    with pytest.raises(BadInputError) as e:
        _build(bench, ["backbone.base_first_steps=10"])
    assert "no 'pretrain_first' records file" in str(e.value)
