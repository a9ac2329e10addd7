"""A saved tiny base (`cramcl export --format base`, `backbone.base_path`): a stream with another task list runs
on the exported weights and vocabulary unchanged, and every way the directory or the stream can be wrong is
bad input naming the file (exit 2)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import LogSink, assert_refused, quick_config


@pytest.fixture(scope="module")
def saved_base(finished_run, tmp_path_factory) -> Path:
    from cramcl.cli import main

    out = tmp_path_factory.mktemp("saved") / "base"
    assert main(["export", "--run", str(finished_run), "--format", "base", str(out)]) == 0
    return out


def _build(extra: list[str]):
    from cramcl.backbones import build_backbone
    from cramcl.data.stream import load_stream

    cfg = quick_config(extra=extra)
    log = LogSink()
    return build_backbone(cfg, load_stream(cfg.data), log=log), log


def test_another_task_list_runs_on_the_exported_weights_and_vocabulary(saved_base, finished_run):
    from safetensors.torch import load_file

    meta = json.loads((saved_base / "base.json").read_text())
    run_env = json.loads((finished_run / "env.json").read_text())
    assert meta["made_by"]["base_stage"] == run_env["backbone"]["base_stage"]
    assert meta["made_by"]["backbone_config"]["base_first_steps"] == 0  # the whole recipe, first stage included
    # one task only: built from the stream, this vocabulary (and so the base) would be another one
    own, _ = _build(["data.tasks=shape"])
    backbone, log = _build(["data.tasks=shape", f"backbone.base_path={saved_base}"])
    run_backbone, _ = _build([])  # the exported run's stream (cached base)
    assert backbone.tokenizer.get_vocab() == run_backbone.tokenizer.get_vocab() != own.tokenizer.get_vocab()
    saved = load_file(str(saved_base / "base.safetensors"))
    for name, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    assert backbone.base_key.startswith("saved:") and not any("base stage" in line for line in log.lines)
    assert all(not p.requires_grad for p in backbone.model.parameters())


def test_a_run_with_a_saved_base_records_it_and_trains(saved_base, tmp_path):
    from cramcl.cli import main

    out = tmp_path / "run"
    assert main(["run", "--profile", "quick", "--method", "lora-ft", "--out", str(out), "data.tasks=shape,colour",
                 "train.steps_per_task=6", f"backbone.base_path={saved_base}"]) == 0
    env = json.loads((out / "env.json").read_text())
    assert env["backbone"]["base_stage"].startswith("saved:")
    assert json.loads((out / "results" / "matrix.json").read_text())["tasks"] == ["shape", "colour"]


def _stream_with_answer(tmp_path: Path, answer: str) -> Path:
    """The built-in shape task as a benchmark of its own, first training record's answer replaced."""
    from cramcl.data.stream import builtin_benchmark_path

    builtin = builtin_benchmark_path(quick_config().data)
    root = builtin.parent
    rows = json.loads((root / "shape" / "train.json").read_text())  # LLaVA conversations
    rows[0]["conversations"][1]["value"] = answer
    (tmp_path / "train.json").write_text(json.dumps(rows))
    shutil.copy(root / "shape" / "test.jsonl", tmp_path / "test.jsonl")
    (tmp_path / "b.yaml").write_text(f"name: one\nimage_root: {root / 'images'}\ntasks:\n  - name: shape\n    train: train.json\n"
                                     "    test: test.jsonl\n    scorer: exact\n")
    return tmp_path / "b.yaml"


def test_a_word_the_saved_vocabulary_lacks_is_bad_input_naming_file_record_and_word(saved_base, tmp_path, capsys):
    from cramcl.cli import main

    bench = _stream_with_answer(tmp_path, "zebra")
    out = tmp_path / "run"
    code = main(["run", "--profile", "quick", "--benchmark", str(bench), "--out", str(out),
                 f"backbone.base_path={saved_base}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.json" in err and "'zebra'" in err and "shape-train" in err and str(saved_base) in err


@pytest.mark.parametrize("damage, message", [
    ("truncate", "cannot read the weights"),
    ("drop_vocab", "missing tokenizer.json"),
    ("format", "format 99"),
    ("shape", "the config asks for"),
])
def test_a_damaged_or_mismatched_saved_base_is_bad_input(saved_base, tmp_path, damage, message):
    from cramcl.errors import BadInputError

    broken = tmp_path / "base"
    shutil.copytree(saved_base, broken)
    extra = []
    if damage == "truncate":
        data = (broken / "base.safetensors").read_bytes()
        (broken / "base.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "drop_vocab":
        (broken / "tokenizer.json").unlink()
    elif damage == "format":
        meta = json.loads((broken / "base.json").read_text())
        (broken / "base.json").write_text(json.dumps({**meta, "format": 99}))
    else:
        extra = ["backbone.hidden_size=128"]
    with pytest.raises(BadInputError) as e:
        _build([f"backbone.base_path={broken}", *extra])
    assert any(message in p for p in e.value.problems), e.value.problems


def test_export_base_refuses_a_non_empty_out_and_a_saved_base_needs_the_tiny_backbone(finished_run, tmp_path, capsys):
    from cramcl.cli import main

    (tmp_path / "keep.txt").write_text("mine")
    assert main(["export", "--run", str(finished_run), "--format", "base", str(tmp_path)]) == 2
    assert (tmp_path / "keep.txt").read_text() == "mine" and not (tmp_path / "base.safetensors").exists()
    assert "not an empty directory" in capsys.readouterr().err
    assert_refused("lora-ft", ["backbone.name=hf", "backbone.base_path=/x"], "for the tiny backbone only")


def test_resume_refuses_a_saved_base_whose_weights_changed(saved_base, tmp_path):
    from safetensors.torch import load_file, save_file

    from cramcl.engine.runner import run_stream
    from cramcl.errors import BadInputError

    base = tmp_path / "base"
    shutil.copytree(saved_base, base)
    cfg = quick_config(extra=["data.tasks=shape,colour", f"backbone.base_path={base}"])
    out = tmp_path / "run"
    run_stream(cfg, out, log=LogSink(), stop_after_task=0)
    state = load_file(str(base / "base.safetensors"))
    name = next(iter(state))
    state[name] = state[name] + 1e-3  # the same path, other weights
    save_file(state, str(base / "base.safetensors"))
    with pytest.raises(BadInputError) as e:
        run_stream(cfg, out, resume=True, log=LogSink())
    assert "env.json" in str(e.value) and "resuming would mix two bases" in str(e.value)
    assert json.loads((out / "env.json").read_text())["backbone"]["base_stage"].startswith("saved:")
