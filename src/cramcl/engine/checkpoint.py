"""Atomic, self-checking files: a checkpoint directory or a JSON file appears whole or not at all.

A finished task's checkpoint is ``checkpoints/task_<t>/`` with ``method.safetensors`` (every tensor of the
method: adapters, centroids, prototypes...), ``method.json`` (its metadata), ``runner.json`` (matrix so
far, times, parameter counts) and, written last, ``manifest.json`` (each file's size and SHA-256). Files
are fsynced, then the directory is renamed into place, so an interrupted run leaves either the previous
checkpoint or the new one. ``settings.json`` (the resolved settings the checkpoint was made under, see
engine/resume_check.py) is listed in the manifest of checkpoints that have it; older ones lack it.

Every reader goes through :func:`read_checkpoint` (or :func:`checkpoint_problem`, which runs it): the files
must match the manifest, parse, and hold only finite floating tensors. A checkpoint that fails is named with
the file (and tensor) and the reason: ``--resume`` reports it and uses the previous good one, the read-only
commands refuse it (:func:`checkpoint_for_reading`).

A step checkpoint (``checkpoints/step/``, see engine/step_checkpoint.py) is written the same way by the same
functions, with its own files and manifest format; there is at most one, for the task in progress.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from cramcl.engine.kill_points import kill_point
from cramcl.errors import BadInputError

MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("method.safetensors", "method.json", "runner.json")
SETTINGS_FILE = "settings.json"  # optional: checkpoints made before the settings record do not have it
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


def save_checkpoint(run_dir: Path, task_index: int, tensors: dict, method_meta: dict, runner_state: dict,
                    settings: dict | None = None) -> Path:
    """``settings``: the record of the resolved settings (``settings.json``), compared on resume."""
    json_files = {"method.json": method_meta, "runner.json": runner_state}
    if settings is not None:
        json_files[SETTINGS_FILE] = settings
    return write_checkpoint_dir(run_dir / "checkpoints", f"task_{task_index}", {"method.safetensors": tensors},
                                json_files, {"format": MANIFEST_FORMAT, "task": task_index})


class UnusableCheckpoint(BadInputError):
    """A checkpoint that cannot be used. ``problem`` names the file (and the tensor) and why; ``damaged`` is
    False when the files are whole but hold non-finite values."""

    def __init__(self, problem: str, damaged: bool = True):
        super().__init__(problem)
        self.problem, self.damaged = problem, damaged


def _parse(path: Path, data: bytes):
    return load_safetensors(data) if path.suffix == ".safetensors" else json.loads(data.decode("utf-8"))


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating tensors holding NaN or infinite values, sorted."""
    return [k for k, v in sorted(tensors.items()) if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def nonfinite_problem(file: Path, tensors: dict) -> str | None:
    """Which floating tensors of ``file`` hold NaN or infinite values (the first one named), or None."""
    bad = nonfinite_tensors(tensors)
    if not bad:
        return None
    kind = "NaN" if bool(torch.isnan(tensors[bad[0]]).any()) else "infinite"
    more = (f" (and {len(bad) - 1} more non-finite tensor(s): {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})"
            if len(bad) > 1 else "")
    return f"{file}: tensor '{bad[0]}' holds {kind} values{more}"


def _read_files(path: Path, files: tuple[str, ...], fmt: str) -> dict:
    """File name -> parsed contents of every file of the checkpoint directory ``path`` once it matches its
    manifest; raises :class:`UnusableCheckpoint` naming the file."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists() and fmt != MANIFEST_FORMAT:
        raise UnusableCheckpoint(f"{manifest_path}: missing (not a complete checkpoint)")
    if not manifest_path.exists():
        missing = [n for n in CHECKPOINT_FILES if not (path / n).is_file()]
        if missing:
            raise UnusableCheckpoint(f"{path / missing[0]}: missing (and no {MANIFEST}: not a complete checkpoint)")
        try:  # no manifest to check against: the files must at least parse
            return {n: _parse(path / n, (path / n).read_bytes()) for n in CHECKPOINT_FILES}
        except Exception as e:  # noqa: BLE001 - any parse failure means the checkpoint is unusable
            raise UnusableCheckpoint(f"{path}: no {MANIFEST} and a file does not parse "
                                     f"({type(e).__name__}: {e})") from None
    optional = {SETTINGS_FILE} if fmt == MANIFEST_FORMAT else set()
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
        if not isinstance(listed, dict) or not all(isinstance(w, dict) for w in listed.values()):
            raise TypeError("files")
        if manifest.get("format") != fmt or not set(files) <= set(listed) <= set(files) | optional:
            raise UnusableCheckpoint(f"{manifest_path}: not a {fmt} manifest")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UnusableCheckpoint(f"{manifest_path}: unreadable ({type(e).__name__})") from None
    m = _TASK_DIR.match(path.name)
    if m and manifest.get("task") != int(m.group(1)):
        raise UnusableCheckpoint(f"{manifest_path}: written for task {manifest.get('task')}, found in {path.name}")
    contents = {}
    for name, want in listed.items():
        f = path / name
        if not f.is_file():
            raise UnusableCheckpoint(f"{f}: missing")
        data = f.read_bytes()
        if len(data) != want.get("bytes"):
            raise UnusableCheckpoint(f"{f}: {len(data)} bytes, the manifest says {want.get('bytes')} "
                                     "(truncated or replaced)")
        if hashlib.sha256(data).hexdigest() != want.get("sha256"):
            raise UnusableCheckpoint(f"{f}: checksum does not match the manifest (damaged)")
        try:
            contents[name] = _parse(f, data)
        except Exception as e:  # noqa: BLE001 - matches its manifest yet does not parse: written damaged
            raise UnusableCheckpoint(f"{f}: does not parse ({type(e).__name__}: {e}) (damaged)") from None
    return contents


def read_checkpoint_files(path: Path, files: tuple[str, ...] = CHECKPOINT_FILES, fmt: str = MANIFEST_FORMAT) -> dict:
    """The one check every checkpoint reader goes through: file name -> parsed contents (tensors for
    ``.safetensors``, objects for ``.json``) of the checkpoint directory ``path``, once every file matches its
    manifest (a task checkpoint without a manifest, the first format, once its files parse) and every floating
    tensor is finite. Raises :class:`UnusableCheckpoint` naming the file (and the tensor).
    ``files``/``fmt``: what the manifest must list and say (a step checkpoint has its own)."""
    contents = _read_files(path, files, fmt)
    for name, value in contents.items():
        if name.endswith(".safetensors") and (problem := nonfinite_problem(path / name, value)):
            raise UnusableCheckpoint(problem, damaged=False)
    return contents


def checkpoint_problem(path: Path, files: tuple[str, ...] = CHECKPOINT_FILES,
                       fmt: str = MANIFEST_FORMAT) -> str | None:
    """Why the checkpoint directory ``path`` cannot be used (naming the file), or None when
    :func:`read_checkpoint_files` accepts it."""
    try:
        read_checkpoint_files(path, files, fmt)
    except UnusableCheckpoint as e:
        return e.problem
    return None


@dataclass
class TaskCheckpoint:
    """A task checkpoint read and checked: its tensors, method metadata, runner state and (None for a
    checkpoint made before it existed) settings record."""

    path: Path
    tensors: dict
    meta: dict
    runner: dict
    settings: dict | None

    @property
    def task(self) -> int:
        return int(_TASK_DIR.match(self.path.name).group(1))


def read_checkpoint(path: Path) -> TaskCheckpoint:
    """``checkpoints/task_<t>`` read through :func:`read_checkpoint_files`."""
    c = read_checkpoint_files(path)
    return TaskCheckpoint(path, c["method.safetensors"], c["method.json"], c["runner.json"], c.get(SETTINGS_FILE))


def finished_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoints/task_<t>`` directories, newest (largest t) first, without opening them."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [(int(m.group(1)), p) for p in root.iterdir() if (m := _TASK_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(done, reverse=True)]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoints/task_<t>`` directory by name (unchecked; see :func:`newest_good_checkpoint`)."""
    found = finished_checkpoints(run_dir)
    return found[0] if found else None


def newest_good_checkpoint(run_dir: Path, warn=print) -> TaskCheckpoint | None:
    """The newest checkpoint that :func:`read_checkpoint` accepts, read; each one skipped is reported
    through ``warn`` (what ``--resume`` continues from)."""
    for path in finished_checkpoints(run_dir):
        try:
            return read_checkpoint(path)
        except UnusableCheckpoint as e:
            warn(f"warning: checkpoint {path.name} is not usable ({e.problem}); falling back to the one before")
    return None


def checkpoint_for_reading(run_dir: Path, after_task: int | None = None) -> TaskCheckpoint:
    """The checkpoint a read-only command (eval, predict, export, inspect) uses: ``task_<after_task>``, by
    default the newest one. One that cannot be used is refused (bad input naming the file, the tensor where
    one is not finite, and the newest usable earlier checkpoint), never silently replaced by an older one."""
    run_dir = Path(run_dir)
    found = finished_checkpoints(run_dir)
    if after_task is None:
        path = found[0] if found else None
    else:
        path = run_dir / "checkpoints" / f"task_{after_task}"
    if path is None or not path.is_dir():
        raise BadInputError(f"{run_dir}: no checkpoint for task {after_task if after_task is not None else '(any)'}")
    try:
        return read_checkpoint(path)
    except UnusableCheckpoint as e:
        earlier = next((p for p in found if int(p.name.split("_")[1]) < int(path.name.split("_")[1])
                        and checkpoint_problem(p) is None), None)
        hint = (f"the newest usable one is {earlier.name}: --after-task {earlier.name.split('_')[1]}" if earlier
                else "no earlier checkpoint is usable")
        what = "is damaged" if e.damaged else "holds non-finite values"
        raise BadInputError(f"{e.problem}; checkpoint {path.name} {what} and cannot be used ({hint})") from None


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
    """(tensors, method meta, runner state) of a checkpoint directory read through :func:`read_checkpoint`
    (one that cannot be used is bad input naming the file)."""
    c = read_checkpoint(path)
    return c.tensors, c.meta, c.runner
