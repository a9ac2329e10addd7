"""Atomic, self-checking files: a checkpoint directory or a JSON file appears whole or not at all.

A finished task's checkpoint is ``checkpoints/task_<t>/`` with ``method.safetensors`` (every tensor of the
method: adapters, centroids, prototypes...), ``method.json`` (its metadata), ``runner.json`` (matrix so
far, times, parameter counts) and, written last, ``manifest.json`` (each file's size and SHA-256). Files
are fsynced, then the directory is renamed into place, so an interrupted run leaves either the previous
checkpoint or the new one. On load, a checkpoint whose files do not match its manifest is reported (file
and reason) and the previous good one is used.

A step checkpoint (``checkpoints/step/``, see engine/step_checkpoint.py) is written the same way by the same
functions, with its own files and manifest format; there is at most one, for the task in progress.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from cramcl.engine.kill_points import kill_point
from cramcl.errors import BadInputError

MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("method.safetensors", "method.json", "runner.json")
MANIFEST_FORMAT = "cramcl-checkpoint/1"
_TASK_DIR = re.compile(r"^task_(\d+)$")
_ORPHAN = re.compile(r"^\.(task_\d+|step)\.(tmp|old)\d+$")


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') bytes to disk before a rename makes them visible."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write_text_synced(tmp, json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_yaml_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write_text_synced(tmp, yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint_dir(ckpt_root: Path, name: str, tensor_files: dict[str, dict], json_files: dict[str, object],
                         manifest: dict, kill_name: str = "checkpoint_write") -> Path:
    """Write ``ckpt_root/name`` as one step: every file fsynced in a temporary directory, ``manifest.json``
    (``manifest`` plus each file's size and SHA-256) last, then a rename over any older ``name``.

    ``tensor_files``: file name -> tensors (safetensors); ``json_files``: file name -> JSON-able object.
    ``kill_name``: the fault-injection point between the data files and the manifest."""
    final = ckpt_root / name
    tmp = ckpt_root / f".{name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for fname, tensors in tensor_files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / fname))
        _fsync(tmp / fname)
    for fname, data in json_files.items():
        _write_text_synced(tmp / fname, json.dumps(data, indent=1))
    kill_point(kill_name)
    names = [*tensor_files, *json_files]
    manifest = {**manifest, "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
                                      for n in names}}
    _write_text_synced(tmp / MANIFEST, json.dumps(manifest, indent=1))  # last: its presence means complete
    _fsync(tmp)
    if final.exists():  # a re-run of the same task after an interruption, or a newer step: replace as one step
        old = ckpt_root / f".{name}.old{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(ckpt_root)
    return final


def save_checkpoint(run_dir: Path, task_index: int, tensors: dict, method_meta: dict, runner_state: dict) -> Path:
    return write_checkpoint_dir(run_dir / "checkpoints", f"task_{task_index}", {"method.safetensors": tensors},
                                {"method.json": method_meta, "runner.json": runner_state},
                                {"format": MANIFEST_FORMAT, "task": task_index})


def checkpoint_problem(path: Path, files: tuple[str, ...] = CHECKPOINT_FILES,
                       fmt: str = MANIFEST_FORMAT) -> str | None:
    """Why the checkpoint directory ``path`` cannot be trusted (naming the file), or None when every file
    matches its manifest. A task checkpoint without a manifest (the first format) is accepted when its files
    parse. ``files``/``fmt``: what the manifest must list and say (a step checkpoint has its own)."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists() and fmt != MANIFEST_FORMAT:
        return f"{manifest_path}: missing (not a complete checkpoint)"
    if not manifest_path.exists():
        missing = [n for n in CHECKPOINT_FILES if not (path / n).is_file()]
        if missing:
            return f"{path / missing[0]}: missing (and no {MANIFEST}: not a complete checkpoint)"
        try:  # no manifest to check against: the files must at least parse
            json.loads((path / "method.json").read_text())
            json.loads((path / "runner.json").read_text())
            load_file(str(path / "method.safetensors"))
        except Exception as e:  # noqa: BLE001 - any parse failure means the checkpoint is unusable
            return f"{path}: no {MANIFEST} and a file does not parse ({type(e).__name__}: {e})"
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
        if manifest.get("format") != fmt or set(listed) != set(files):
            return f"{manifest_path}: not a {fmt} manifest"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{manifest_path}: unreadable ({type(e).__name__})"
    m = _TASK_DIR.match(path.name)
    if m and manifest.get("task") != int(m.group(1)):
        return f"{manifest_path}: written for task {manifest.get('task')}, found in {path.name}"
    for name, want in listed.items():
        f = path / name
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != want.get("bytes"):
            return f"{f}: {f.stat().st_size} bytes, the manifest says {want.get('bytes')} (truncated or replaced)"
        if _sha256(f) != want.get("sha256"):
            return f"{f}: checksum does not match the manifest (damaged)"
    return None


def finished_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoints/task_<t>`` directories, newest (largest t) first, without opening them."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [(int(m.group(1)), p) for p in root.iterdir() if (m := _TASK_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(done, reverse=True)]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoints/task_<t>`` directory by name (unchecked; see :func:`last_good_checkpoint`)."""
    found = finished_checkpoints(run_dir)
    return found[0] if found else None


def last_good_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint whose files match its manifest; each one skipped is reported through ``warn``."""
    for path in finished_checkpoints(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warn(f"warning: checkpoint {path.name} is not usable ({problem}); falling back to the one before")
    return None


def remove_orphans(run_dir: Path) -> list[str]:
    """Delete temporary checkpoint directories an interrupted write left behind; returns their names."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    orphans = [p for p in root.iterdir() if _ORPHAN.match(p.name) and p.is_dir()]
    for p in orphans:
        shutil.rmtree(p, ignore_errors=True)
    return sorted(p.name for p in orphans)


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(tensors, method meta, runner state) of a checkpoint directory, after checking it against its
    manifest (a damaged one is bad input naming the file)."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise BadInputError(problem)
    return (load_file(str(path / "method.safetensors")), json.loads((path / "method.json").read_text()),
            json.loads((path / "runner.json").read_text()))
