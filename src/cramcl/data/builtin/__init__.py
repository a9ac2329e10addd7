"""The built-in stream: seven small vision-language tasks generated offline, as an ordinary benchmark.

``generate_builtin(out_dir)`` writes ``benchmark.yaml``, per task a LLaVA JSON train file and a JSONL
test file, PNG images under ``images/<task>/``, and ``pretrain.jsonl`` (captions for the tiny backbone's
base stage). Those captions name what a pretrained MLLM would know of an image ("a red circle", "a
handwritten 7", "3 dots", "a printed number 4") and never use a task's instruction or answer format, so
the tasks teach formats on top of a base that can see; digits, count and ocr are scored by exact match,
so a caption-style reply ("a handwritten 7") is not counted as the answer "7". The tasks, in training order, each with its own instruction format, over four visual domains:

=========  ==========  ==========================================  =========================
task       scorer      question                                    domain
=========  ==========  ==========================================  =========================
shape      exact       What shape is in the image?                 easy-VQA (copied images)
colour     exact       Name the colour of the object.              easy-VQA
yesno      exact       easy-VQA's own: "Is there a blue shape?"    easy-VQA
digits     exact       Which handwritten digit is shown?           scikit-learn digits
count      exact       How many dots are there?                    generated dot scenes
ocr        exact       Read the printed number.                    rendered digits
caption    caption     Describe the scene briefly.                 generated shape scenes
=========  ==========  ==========================================  =========================

The templates were picked so that all-MiniLM-L6-v2 tells the formats apart: the largest cosine
similarity between two tasks' templates is 0.56 (digits vs ocr), and every yes/no question lies
nearer the yes/no centroid than any other template.

Output is a pure function of the parameters (same seed: byte-identical files). A ``manifest.json``
records the parameters and ``BUILTIN_VERSION``; a second call with the same ones returns at once.
Generation happens in a temporary sibling directory renamed into place, so a crash never leaves a
half-written benchmark behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cramcl.data.builtin import digits, easyvqa, ocr, scenes
from cramcl.data.builtin._common import Sample, pixel_hash
from cramcl.errors import BadInputError

# Bump whenever generation changes what it writes, so stale cached benchmarks get regenerated.
BUILTIN_VERSION = "cramcl-builtin/3"
PRETRAIN_QUESTION = "Describe the image."


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task: its name, scorer, visual domain and generator ``make(split, n, ...)``."""

    name: str
    scorer: str
    domain: str
    make: Callable[..., list[Sample]]
    pretrain_share: float  # fraction of the pretrain corpus drawn from this task's domain


TASK_INFO: tuple[BuiltinTask, ...] = (
    BuiltinTask("shape", "exact", "easy-vqa", easyvqa.make_shape, 0.4),
    BuiltinTask("colour", "exact", "easy-vqa", easyvqa.make_colour, 0.0),
    BuiltinTask("yesno", "exact", "easy-vqa", easyvqa.make_yesno, 0.0),
    BuiltinTask("digits", "exact", "digits", digits.make_digits, 0.15),
    BuiltinTask("count", "exact", "dot-scenes", scenes.make_count, 0.15),
    BuiltinTask("ocr", "exact", "printed-numbers", ocr.make_ocr, 0.15),
    BuiltinTask("caption", "caption", "shape-scenes", scenes.make_caption, 0.15),
)
#: Task names of the built-in stream, in training order.
BUILTIN_TASKS: tuple[str, ...] = tuple(t.name for t in TASK_INFO)


def _save_images(image_root: Path, folder: str, prefix: str, samples: list[Sample]) -> list[str]:
    """Write each sample's image under ``image_root/folder``; return paths relative to image_root."""
    (image_root / folder).mkdir(parents=True, exist_ok=True)
    rels = []
    for i, sample in enumerate(samples):
        if sample.source is not None:
            rel = f"{folder}/{prefix}-{sample.key}.png"
            if not (image_root / rel).exists():  # yes/no questions share images: copy once
                shutil.copyfile(sample.source, image_root / rel)
        else:
            rel = f"{folder}/{prefix}-{i:05d}.png"
            sample.image.save(image_root / rel, format="PNG")
        rels.append(rel)
    return rels


def _write_task(root: Path, task: BuiltinTask, split: str, samples: list[Sample]) -> None:
    """Train split as LLaVA JSON, test split as JSONL QA: the stream exercises both formats."""
    rels = _save_images(root / "images", task.name, split, samples)
    ids = [f"{task.name}-{split}-{i:05d}" for i in range(len(samples))]
    (root / task.name).mkdir(exist_ok=True)
    if split == "train":
        data = [{"id": i, "image": rel, "conversations": [
                    {"from": "human", "value": f"<image>\n{s.question}"},
                    {"from": "gpt", "value": s.answer}]}
                for i, rel, s in zip(ids, rels, samples)]
        (root / task.name / "train.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    else:
        lines = [json.dumps({"id": i, "image": rel, "question": s.question, "answer": s.answer})
                 for i, rel, s in zip(ids, rels, samples)]
        (root / task.name / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_pretrain(root: Path, seed: int, n: int, image_size: int,
                    test_hashes: dict[str, set[str]]) -> None:
    """Generic captions ("a red circle", "a printed number", "some dots", ...) over non-test images."""
    samples: list[Sample] = []
    sharing = [(i, t) for i, t in enumerate(TASK_INFO) if t.pretrain_share > 0]
    for k, (index, task) in enumerate(sharing):
        # The last domain takes the rounding remainder so the corpus has exactly n records.
        want = n - len(samples) if k == len(sharing) - 1 else round(n * task.pretrain_share)
        if task.domain == "easy-vqa":
            samples += easyvqa.make_pretrain(want, (seed, index))
        else:
            samples += task.make("pretrain", want, (seed, index), image_size, test_hashes[task.name])
    # Mix the domains so a base stage reading in order sees all of them in every batch.
    order = np.random.default_rng([seed, len(TASK_INFO)]).permutation(len(samples))
    samples = [samples[i] for i in order]
    rels = _save_images(root / "images", "pretrain", "img", samples)
    lines = [json.dumps({"id": f"pretrain-{i:05d}", "image": rel, "question": PRETRAIN_QUESTION,
                         "answer": s.caption})
             for i, (rel, s) in enumerate(zip(rels, samples))]
    (root / "pretrain.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_yaml(root: Path, params: dict) -> None:
    lines = [f"# cramcl built-in stream ({BUILTIN_VERSION}; "
             + ", ".join(f"{k}={v}" for k, v in params.items()) + ")",
             "name: cramcl-builtin", "image_root: images", "pretrain: pretrain.jsonl", "tasks:"]
    for task in TASK_INFO:
        lines += [f"  - name: {task.name}", f"    train: {task.name}/train.json",
                  f"    test: {task.name}/test.jsonl", f"    scorer: {task.scorer}"]
    (root / "benchmark.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _generate_into(root: Path, params: dict) -> None:
    seed, image_size = params["seed"], params["image_size"]
    test_hashes: dict[str, set[str]] = {}
    for index, task in enumerate(TASK_INFO):
        test = task.make("test", params["n_test"], (seed, index), image_size, set())
        test_hashes[task.name] = {pixel_hash(s.image) for s in test if s.image is not None}
        train = task.make("train", params["n_train"], (seed, index), image_size, test_hashes[task.name])
        _write_task(root, task, "test", test)
        _write_task(root, task, "train", train)
    _write_pretrain(root, seed, params["n_pretrain"], image_size, test_hashes)
    _write_yaml(root, params)


def _read_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def generate_builtin(out_dir: str | Path, *, seed: int = 0, n_train: int = 800, n_test: int = 200,
                     image_size: int = 64, n_pretrain: int | None = None) -> Path:
    """Write the built-in benchmark into ``out_dir`` (if not already there); return its YAML path.

    ``n_train`` / ``n_test`` are per task (digits caps them at its pool: 1,438 / 359; easy-VQA at
    its images). ``image_size`` applies to generated images; easy-VQA's are kept at their 64 px.
    ``n_pretrain`` defaults to 1,500 at n_train=800, scaled with n_train (at least 50).
    An existing ``out_dir`` from an earlier call with other parameters is replaced; any other
    non-empty directory is left alone (BadInputError).
    """
    bad = [f"generate_builtin: {k} must be an integer >= {lo}, got {v!r}"
           for k, v, lo in (("seed", seed, 0), ("n_train", n_train, 1), ("n_test", n_test, 1),
                            ("image_size", image_size, 16), ("n_pretrain", n_pretrain, 1))
           if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo)]
    if bad:
        raise BadInputError(bad)
    if n_pretrain is None:
        n_pretrain = max(50, round(n_train * 1500 / 800))
    params = {"seed": seed, "n_train": n_train, "n_test": n_test, "image_size": image_size,
              "n_pretrain": n_pretrain}
    manifest = {"version": BUILTIN_VERSION, "params": params}
    out_dir = Path(out_dir)
    yaml_path = out_dir / "benchmark.yaml"
    existing = _read_manifest(out_dir)
    if existing == manifest and yaml_path.is_file():
        return yaml_path
    if existing is None and out_dir.is_dir() and any(out_dir.iterdir()):
        raise BadInputError([f"{out_dir}: exists and is not a cramcl built-in benchmark "
                             "(no manifest.json); refusing to overwrite it"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the benchmark is ordinary data
        _generate_into(tmp, params)
        # The manifest goes last: its presence means the directory is complete.
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "data")
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # Another process finished the same generation first: its result is as good as ours.
            if _read_manifest(out_dir) != manifest:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return yaml_path


__all__ = ["BUILTIN_TASKS", "BUILTIN_VERSION", "TASK_INFO", "BuiltinTask", "generate_builtin"]
