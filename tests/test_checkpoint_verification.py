"""Checkpoints are verified when they are read, not only when they are written, and a resume is held to the
settings its checkpoint was made under.

Every reader (eval, predict, export, inspect, the Python API) refuses a checkpoint holding a non-finite tensor
(naming the tensor and the checkpoint) or a damaged one (naming the file and the damage), exit 2 with one line
and the run directory untouched; ``--resume`` falls back to the previous good checkpoint and ends as an
uninterrupted run. A ``config.yaml`` edited after a checkpoint was made is refused on resume, one line per
changed key (the checkpoint's ``settings.json``); a checkpoint without that record (an earlier cramcl)
still resumes. Each damaged run is a copy of the session's finished quick run."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import LogSink, quick_config

torch.set_num_threads(1)
IMAGE = Path(__file__).parent / "malformed" / "_valid" / "images" / "red.png"


def _tree(path: Path) -> dict:
    """Every file under ``path``: its bytes' digest and modification time (folders by name)."""
    return {str(p.relative_to(path)): ((hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                                       if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


def _copy(finished_run: Path, dest: Path) -> Path:
    shutil.copytree(finished_run, dest)
    return dest


def _rewrite_manifest(ckpt: Path, drop: tuple[str, ...] = ()) -> None:
    """Make the manifest match the files as they are now (so only the read-time checks can object)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in drop:
        manifest["files"].pop(name, None)
        (ckpt / name).unlink(missing_ok=True)
    for name in manifest["files"]:
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _plant_nan(ckpt: Path) -> str:
    """A NaN in one adapter tensor of ``ckpt``, with a manifest that matches; returns the tensor's name."""
    f = ckpt / "method.safetensors"
    tensors = load_file(str(f))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(f))
    _rewrite_manifest(ckpt)
    return name


def _damage(run: Path, kind: str) -> str:
    """Damage ``run``'s last checkpoint; returns the words the refusal must hold."""
    ckpt = run / "checkpoints" / "task_2"
    f = ckpt / "method.safetensors"
    if kind == "nan":
        return f"{f}: tensor '{_plant_nan(ckpt)}' holds NaN values; checkpoint task_2 holds non-finite values"
    if kind == "truncated":
        f.write_bytes(f.read_bytes()[:100])
        return f"{f}: 100 bytes, the manifest says"
    f.write_bytes(b"not a safetensors file at all")  # unreadable, with a manifest that matches it
    _rewrite_manifest(ckpt)
    return f"{f}: does not parse"


@pytest.fixture(scope="module", params=["nan", "truncated", "unreadable"])
def damaged_run(request, finished_run, tmp_path_factory):
    run = _copy(finished_run, tmp_path_factory.mktemp(f"damaged-{request.param}") / "run")
    return run, request.param, _damage(run, request.param)


def _refused(argv, capsys, *words) -> str:
    from cramcl.cli import main

    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cramcl: error: "), err
    assert all(w in lines[0] for w in words), (words, err)
    return lines[0]


READERS = {
    "eval": lambda run, tmp: ["eval", "--run", run],
    "predict": lambda run, tmp: ["predict", "--run", run, "--image", IMAGE, "--question", "What colour is it?"],
    "export": lambda run, tmp: ["export", "--run", run, "--task", "ocr", tmp / "adapter"],
    "inspect": lambda run, tmp: ["inspect", "--run", run],
}


@pytest.mark.parametrize("command", sorted(READERS))
def test_readers_refuse_a_damaged_or_non_finite_last_checkpoint(command, damaged_run, tmp_path, capsys):
    run, kind, words = damaged_run
    before = _tree(run)
    line = _refused(READERS[command](run, tmp_path), capsys, words, "checkpoint task_2",
                    "the newest usable one is task_1: --after-task 1")
    if kind != "nan":
        assert "checkpoint task_2 is damaged" in line
    assert _tree(run) == before and not (tmp_path / "adapter").exists()


def test_export_of_a_truncated_last_checkpoint_names_the_damage_not_an_untrained_task(finished_run, tmp_path,
                                                                                      capsys):
    run = _copy(finished_run, tmp_path / "run")
    words = _damage(run, "truncated")
    line = _refused(["export", "--run", run, "--task", "ocr", tmp_path / "adapter"], capsys, words,
                    "(truncated or replaced)", "checkpoint task_2 is damaged")
    assert "not trained yet" not in line


def test_an_earlier_checkpoint_is_read_when_asked_for(damaged_run):
    from cramcl.engine.checkpoint import checkpoint_for_reading

    run, _, _ = damaged_run
    assert checkpoint_for_reading(run, 1).task == 1


def test_the_python_api_refuses_a_non_finite_checkpoint(finished_run, tmp_path):
    import cramcl
    from cramcl.errors import BadInputError

    run = _copy(finished_run, tmp_path / "run")
    name = _plant_nan(run / "checkpoints" / "task_2")
    before = _tree(run)
    opened = cramcl.open_run(run)
    with pytest.raises(BadInputError, match=f"tensor '{name}' holds NaN values"):
        opened.predict([{"image": str(IMAGE), "question": "What colour is it?"}])
    with pytest.raises(BadInputError, match="checkpoint task_2 holds non-finite values"):
        opened.export_peft("ocr", tmp_path / "adapter")
    assert _tree(run) == before


def test_a_non_finite_step_checkpoint_is_ignored(finished_run, tmp_path):
    """The step checkpoint is read through the same check: one holding NaN is reported, the task restarts."""
    from cramcl.engine.checkpoint import write_checkpoint_dir
    from cramcl.engine.step_checkpoint import STEP_FILES, STEP_FORMAT, read_step_checkpoint, step_dir

    run = tmp_path / "run"
    tensors = load_file(str(finished_run / "checkpoints" / "task_1" / "method.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("inf")
    assert set(STEP_FILES) == {"method.safetensors", "method.json", "trainer.safetensors", "trainer.json"}
    write_checkpoint_dir(run / "checkpoints", step_dir(run).name, {"method.safetensors": tensors,
                                                                   "trainer.safetensors": {}},
                         {"method.json": {}, "trainer.json": {"task": 2, "step": 4, "phase_index": 0}},
                         {"format": STEP_FORMAT, "task": 2, "step": 4})
    log = LogSink()
    assert read_step_checkpoint(run, 2, warn=log) is None
    assert any(f"tensor '{name}' holds infinite values" in line and "restarts from its first step" in line
               for line in log.lines), log.lines


# ------------------------------------------------------------------ --resume past a non-finite checkpoint
def _results(run: Path) -> dict:
    files = [run / "results" / "matrix.json", *sorted((run / "results" / "predictions").rglob("*.jsonl"))]
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


def test_resume_falls_back_past_a_non_finite_checkpoint_and_ends_identical(finished_run, tmp_path, capsys):
    """The last checkpoint holds a NaN (its manifest matches): resume says so, continues from task_1 and
    ends byte-identical to the uninterrupted run. config.yaml rewritten with its keys in another order and a
    force-safe setting changed is still the same run."""
    from cramcl.cli import main

    run = _copy(finished_run, tmp_path / "run")
    name = _plant_nan(run / "checkpoints" / "task_2")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["train"]["log_every"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=True))
    assert main(["run", "--resume", "--out", str(run)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert (f"checkpoint task_2 is not usable ({run / 'checkpoints' / 'task_2' / 'method.safetensors'}: tensor "
            f"'{name}' holds NaN values); falling back to the one before") in out, out
    assert "resuming after task 1 (colour)" in out, out
    assert _results(run) == _results(finished_run)
    assert load_file(str(run / "checkpoints" / "task_2" / "method.safetensors")).keys() == \
        load_file(str(finished_run / "checkpoints" / "task_2" / "method.safetensors")).keys()


def test_resume_with_no_usable_checkpoint_says_it_starts_again(finished_run, tmp_path):
    from cramcl.engine.runner import run_stream

    run = _copy(finished_run, tmp_path / "run")
    for t in (1, 2):
        shutil.rmtree(run / "checkpoints" / f"task_{t}")
    _plant_nan(run / "checkpoints" / "task_0")
    log = LogSink()
    got = run_stream(None, run, resume=True, log=log, stop_after_task=0)
    assert any("checkpoint task_0 is not usable" in line and "holds NaN values" in line for line in log.lines)
    assert any("no checkpoint of this run is usable; it starts again from its first task" in line
               for line in log.lines), log.lines
    want = json.loads((finished_run / "results" / "matrix.json").read_text())["scores"]
    assert got["scores"][0] == want[0]


# ------------------------------------------------------------------ --resume held to the checkpoint's settings
def test_checkpoints_carry_the_settings_they_were_made_under(finished_run):
    from cramcl.engine.resume_check import FORCE_SAFE, settings_record

    for t in range(3):
        ckpt = finished_run / "checkpoints" / f"task_{t}"
        stored = json.loads((ckpt / "settings.json").read_text())
        assert "settings.json" in json.loads((ckpt / "manifest.json").read_text())["files"]
        assert stored == settings_record(quick_config())
        assert stored["settings"]["train.lr"] == quick_config().train.lr
        assert not FORCE_SAFE & set(stored["settings"]) and "data.validate_images" not in stored["settings"]
        canonical = json.dumps(stored["settings"], sort_keys=True, separators=(",", ":"))
        assert stored["settings_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()


def test_resume_refuses_a_config_yaml_edited_after_the_checkpoint(finished_run, tmp_path, capsys):
    from cramcl.cli import main

    run = _copy(finished_run, tmp_path / "run")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    lr = saved["train"]["lr"]
    saved["train"]["lr"] = 0.001
    saved["method_args"]["rank"] = saved["method_args"]["rank"] + 1
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    before = _tree(run)
    assert main(["run", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 2 and all(x.startswith("cramcl: error: ") for x in lines), err
    assert (f"{run / 'config.yaml'}: method_args.rank: {saved['method_args']['rank'] - 1} in checkpoint task_2, "
            f"{saved['method_args']['rank']} in config.yaml") in lines[0], err
    assert f"{run / 'config.yaml'}: train.lr: {lr!r} in checkpoint task_2, 0.001 in config.yaml" in lines[1], err
    assert _tree(run) == before
    # --force accepts only settings that cannot change results: these are refused with it too
    assert main(["run", "--resume", "--force", "--out", str(run)]) == 2
    assert "train.lr: " in capsys.readouterr().err
    assert _tree(run) == before


def test_a_checkpoint_without_the_settings_record_still_resumes(finished_run, tmp_path):
    """Checkpoints made before the record existed: resumed as before (config.yaml is not compared)."""
    from cramcl.engine.runner import run_stream

    run = _copy(finished_run, tmp_path / "run")
    for t in range(3):
        _rewrite_manifest(run / "checkpoints" / f"task_{t}", drop=("settings.json",))
    log = LogSink()
    got = run_stream(None, run, resume=True, log=log)
    assert any("checkpoint task_2 has no settings record" in line for line in log.lines), log.lines
    assert got == json.loads((finished_run / "results" / "matrix.json").read_text())
    assert _results(run) == _results(finished_run)


def test_settings_differences_compare_values_not_spelling():
    from cramcl.engine.resume_check import checkpoint_settings_differences, settings_record

    cfg = quick_config()
    stored = settings_record(cfg)
    assert checkpoint_settings_differences(stored, cfg) == []
    cfg.train.eval_batch_size += 1  # force-safe: not part of the record
    assert checkpoint_settings_differences(stored, cfg) == []
    cfg.train.lr = 0.5
    cfg.seed = 7
    lr = stored["settings"]["train.lr"]
    assert checkpoint_settings_differences(stored, cfg) == [("seed", 0, 7), ("train.lr", lr, 0.5)]
    newer = {**stored, "settings_sha256": "x", "settings": {**stored["settings"], "train.some_new_setting": 1}}
    assert checkpoint_settings_differences(newer, quick_config()) == []  # a key only one version knows
