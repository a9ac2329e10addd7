"""Atomic files: a checkpoint directory or a JSON file appears whole or not at all.

A finished task's checkpoint is ``checkpoints/task_<t>/`` with ``method.safetensors`` (every tensor of the
method: adapters, centroids, prototypes...), ``method.json`` (its metadata) and ``runner.json`` (matrix so
far, times, parameter counts). It is written into a temporary sibling and renamed, so an interrupted run
leaves either the previous checkpoint or the new one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

_TASK_DIR = re.compile(r"^task_(\d+)$")


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_yaml_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, task_index: int, tensors: dict, method_meta: dict, runner_state: dict) -> Path:
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"task_{task_index}"
    tmp = ckpt_root / f".task_{task_index}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "method.safetensors"))
    (tmp / "method.json").write_text(json.dumps(method_meta, indent=1))
    (tmp / "runner.json").write_text(json.dumps(runner_state, indent=1))
    if final.exists():  # a re-run of the same task after an interruption: replace as one step
        old = ckpt_root / f".task_{task_index}.old{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def last_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir() if (m := _TASK_DIR.match(p.name)) and p.is_dir()]
    return max(done)[1] if done else None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(tensors, method meta, runner state) of a checkpoint directory."""
    return (load_file(str(path / "method.safetensors")), json.loads((path / "method.json").read_text()),
            json.loads((path / "runner.json").read_text()))
