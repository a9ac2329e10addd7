"""The built-in stream: eleven small vision-language tasks in five instruction formats, generated offline.

``generate_builtin(out_dir)`` writes ``benchmark.yaml``, per task a LLaVA JSON train file and a JSONL
test file, PNG images under ``images/<task>/``, ``pretrain.jsonl`` (the tiny backbone's base corpus) and
``reading.jsonl`` (its first stage). The corpus's captions name what a pretrained MLLM would know of an
image ("a red circle", "a handwritten 7", "3 dots", "a red blob", "a small red circle in the top-left
corner") and never use a task's instruction or answer format, so the tasks teach formats on top of a base
that can see; a caption-style reply ("a handwritten 7") is not counted as the answer "7". Every short answer
is a word the captions use: the tiny base's word embeddings are frozen with it. Per captioned image the
corpus also holds what instruction tuning teaches a real MLLM about answering with a letter
(:mod:`.reading`: multiple choices about the image's colour, shape, digit or corner, and "which option says
red?" records, the latter also trained alone first as ``reading.jsonl``), under stems of their own.

Every format asks ONE question, identical for all its tasks (:mod:`.questions`; a multiple choice lists its
options between the format's stem and tail); its tasks differ in visual domain and answer space, so the
instruction text picks the format (CRAM's level-1 group) and only the image tells the tasks of a format
apart (level-2 routing). The formats interleave: each format's second task arrives after other formats have
trained. In training order:

===============  =======  ======  ============================  =====================  ==================
task             format   scorer  question                      domain                 answers
===============  =======  ======  ============================  =====================  ==================
shape            name     exact   Answer with one word: what    easy-VQA (copied)      circle, rectangle,
                                  do you see?                                          triangle
digits           number   exact   What number does the picture  scikit-learn digits    0-9
                                  show?
corner           corner   exact   In which corner of the        a shape on light grey  top-left,
                                  picture is the object?                               top-right, ...
mc-shape         choice   exact   Multiple-choice question:     a shape on a pale      A-C: the three
                                  which option matches the      tint                   shapes, shuffled
                                  picture? Options: A .. C ..                          per record
                                  Reply with the letter of the
                                  correct option.
caption          caption  caption Describe the scene briefly.   one or two shapes      "a red circle left
                                                                                       of a blue square"
colour           name     exact   (as shape)                    a blob on grey noise   6 colour names
ocr              number   exact   (as digits)                   a printed digit        0-9
digit-corner     corner   exact   (as corner)                   a digit on black       (as corner)
mc-corner-fixed  choice   exact   (as mc-shape)                 (as corner)            A-D: the four
                                                                                       corners, always in
                                                                                       one order
count            number   exact   (as digits)                   1-4 coloured dots      1-4
stripes          caption  caption (as caption)                  two-colour stripes     "red and blue
                                                                                       vertical stripes"
===============  =======  ======  ============================  =====================  ==================

The letters of the choice format mean different things in its two tasks: a shape drawn anew per record
(the model must read the options) in one, a corner that is always the same letter in the other.
With all-MiniLM-L6-v2 and CRAM's rule at the default profile's theta (0.25) the stream makes exactly five
groups, one per format (checked in tests/test_builtin.py).

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

from cramcl.data.builtin import choice, corner, digits, easyvqa, ocr, patches, questions, reading, related, scenes
from cramcl.data.builtin._common import Sample, pixel_hash
from cramcl.errors import BadInputError

# Bump whenever generation changes what it writes, so stale cached benchmarks get regenerated.
BUILTIN_VERSION = "cramcl-builtin/6"
PRETRAIN_QUESTION = "Describe the image."
#: Binding records per captioned base image (the base's reading stage, :mod:`.reading`).
BINDING_PER_IMAGE = 3


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task: its name, instruction format, scorer, visual domain and generator
    ``make(split, n, ...)``."""

    name: str
    format: str
    scorer: str
    domain: str
    make: Callable[..., list[Sample]]
    pretrain_share: float  # fraction of the pretrain corpus drawn from this task's domain


def _choice(make: Callable[..., list[Sample]]) -> Callable[..., list[Sample]]:
    """A multiple-choice task's generator under the stream's stem and tail (:data:`questions.CHOICE`)."""
    def make_task(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                  exclude: set[str]) -> list[Sample]:
        return make(split, n, task_seed, image_size, exclude, stem=questions.CHOICE, tail=questions.CHOICE_TAIL)
    return make_task


TASK_INFO: tuple[BuiltinTask, ...] = (
    BuiltinTask("shape", "name", "exact", "easy-vqa", easyvqa.make_shape, 0.15),
    BuiltinTask("digits", "number", "exact", "digits", digits.make_digits, 0.11),
    BuiltinTask("corner", "corner", "exact", "corner-shapes", corner.make_corner, 0.11),
    BuiltinTask("mc-shape", "choice", "exact", "tinted-shapes", _choice(choice.make_mc_shape), 0.09),
    BuiltinTask("caption", "caption", "caption", "shape-scenes", scenes.make_caption, 0.09),
    BuiltinTask("colour", "name", "exact", "blobs", patches.make_colour, 0.09),
    BuiltinTask("ocr", "number", "exact", "printed-numbers", ocr.make_ocr, 0.11),
    BuiltinTask("digit-corner", "corner", "exact", "corner-digits", corner.make_digit_corner, 0.11),
    BuiltinTask("mc-corner-fixed", "choice", "exact", "corner-shapes", _choice(choice.make_mc_corner_fixed), 0.0),
    BuiltinTask("count", "number", "exact", "dot-scenes", scenes.make_count, 0.09),
    BuiltinTask("stripes", "caption", "caption", "stripes", patches.make_stripes, 0.05),
)
#: Task names of the built-in stream, in training order.
BUILTIN_TASKS: tuple[str, ...] = tuple(t.name for t in TASK_INFO)

#: The related-skills stream (:mod:`.related`): no base corpus of its own (the shipped base sees its domains).
RELATED_TASK_INFO: tuple[BuiltinTask, ...] = (
    BuiltinTask("digits", "number", "exact", "digits", digits.make_digits, 0.0),
    BuiltinTask("colour", "name", "exact", "blobs", patches.make_colour, 0.0),
    BuiltinTask("corner", "corner", "exact", "corner-shapes", corner.make_corner, 0.0),
    BuiltinTask("colour-three", "name", "exact", "blobs", related.make_colour_three, 0.0),
    BuiltinTask("corner-where", "corner", "exact", "corner-shapes", related.corner_where(2), 0.0),
    BuiltinTask("shape-colour", "name", "exact", "colour-shapes", related.make_shape_colour, 0.0),
    BuiltinTask("count", "number", "exact", "dot-scenes", scenes.make_count, 0.0),
)


@dataclass(frozen=True)
class BuiltinStream:
    """A generated stream: its manifest version, its benchmark name, its tasks and whether it writes the base
    corpus (``pretrain.jsonl`` / ``reading.jsonl``)."""

    version: str
    name: str
    tasks: tuple[BuiltinTask, ...]
    corpus: bool


#: ``data.builtin_stream`` -> the stream it generates; ``main`` is the default one.
BUILTIN_STREAMS: dict[str, BuiltinStream] = {
    "main": BuiltinStream(BUILTIN_VERSION, "cramcl-builtin", TASK_INFO, corpus=True),
    "related": BuiltinStream("cramcl-builtin-related/1", "cramcl-builtin-related", RELATED_TASK_INFO, corpus=False),
}


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


def pretrain_samples(seed: int, n: int, image_size: int, test_hashes: dict[str, set[str]],
                     tasks: tuple[BuiltinTask, ...] = TASK_INFO) -> list[Sample]:
    """The base corpus's n captioned samples, domain by domain (``pretrain_share``), never a test image
    (``test_hashes``: task name -> pixel hashes of its test images; a task not listed excludes none).
    ``tasks``: the stream whose domains (and stream positions, which seed them) the corpus follows."""
    samples: list[Sample] = []
    sharing = [(i, t) for i, t in enumerate(tasks) if t.pretrain_share > 0]
    for k, (index, task) in enumerate(sharing):
        # The last domain takes the rounding remainder so the corpus has exactly n records.
        want = n - len(samples) if k == len(sharing) - 1 else round(n * task.pretrain_share)
        if task.domain == "easy-vqa":
            samples += easyvqa.make_pretrain(want, (seed, index))
        else:
            samples += task.make("pretrain", want, (seed, index), image_size, test_hashes.get(task.name, set()))
    return samples


def _write_pretrain(root: Path, seed: int, n: int, image_size: int,
                    test_hashes: dict[str, set[str]]) -> None:
    """Generic captions ("a red circle", "a printed number", "some dots", ...) over non-test images, and per
    captioned image its attribute multiple choices and binding records (:mod:`.reading`); the binding records
    again, in corpus order, as ``reading.jsonl`` (the base's first stage)."""
    samples = pretrain_samples(seed, n, image_size, test_hashes)
    records = [(PRETRAIN_QUESTION, s.caption, s) for s in samples]
    records += [(q, a, samples[i]) for i, q, a in reading.choice_records(
        [s.caption for s in samples], np.random.default_rng([seed, 11]), binding=BINDING_PER_IMAGE, spaced=True,
        tail=questions.CHOICE_TAIL)]
    # Mix the domains and kinds so a base stage reading in order sees all of them in every batch.
    order = np.random.default_rng([seed, len(TASK_INFO)]).permutation(len(records))
    write_pretrain_records(root, [records[i] for i in order], first=reading.is_binding)


def write_pretrain_records(root: Path, records: list[tuple[str, str, Sample]],
                           first: Callable[[str], bool] | None = None) -> None:
    """``pretrain.jsonl`` from (question, answer, sample) triples in order, one image per distinct sample under
    images/pretrain/; with ``first`` (a test on the question), the records it picks also go, in the same order
    and with the same ids, to ``reading.jsonl``."""
    samples = list({id(s): s for _, _, s in records}.values())
    rels = dict(zip(map(id, samples), _save_images(root / "images", "pretrain", "img", samples)))
    rows = [{"id": f"pretrain-{i:05d}", "image": rels[id(s)], "question": q, "answer": a}
            for i, (q, a, s) in enumerate(records)]
    (root / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if first is not None:
        (root / "reading.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if first(r["question"])),
                                            encoding="utf-8")


def write_tasks(root: Path, tasks: list[tuple[int, BuiltinTask]], params: dict) -> dict[str, set[str]]:
    """Each (stream index, task)'s test and train splits (train never holding a test image); returns the
    test images' pixel hashes per task name."""
    seed, image_size = params["seed"], params["image_size"]
    test_hashes: dict[str, set[str]] = {}
    for index, task in tasks:
        test = task.make("test", params["n_test"], (seed, index), image_size, set())
        test_hashes[task.name] = {pixel_hash(s.image) for s in test if s.image is not None}
        train = task.make("train", params["n_train"], (seed, index), image_size, test_hashes[task.name])
        _write_task(root, task, "test", test)
        _write_task(root, task, "train", train)
    return test_hashes


def write_yaml(root: Path, header: str, name: str, tasks: list[BuiltinTask], first: bool = False,
               corpus: bool = True) -> Path:
    """``first``: name ``reading.jsonl`` as the benchmark's ``pretrain_first`` corpus; ``corpus``: name
    ``pretrain.jsonl`` as its base corpus."""
    lines = [f"# {header}", f"name: {name}", "image_root: images"] + (["pretrain: pretrain.jsonl"] if corpus else [])
    lines += ["pretrain_first: reading.jsonl"] if first else []
    lines += ["tasks:"]
    for task in tasks:
        lines += [f"  - name: {task.name}", f"    train: {task.name}/train.json",
                  f"    test: {task.name}/test.jsonl", f"    scorer: {task.scorer}"]
    (root / "benchmark.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "benchmark.yaml"


def _generate_into(root: Path, params: dict, stream: BuiltinStream) -> None:
    test_hashes = write_tasks(root, list(enumerate(stream.tasks)), params)
    if stream.corpus:
        _write_pretrain(root, params["seed"], params["n_pretrain"], params["image_size"], test_hashes)
    write_yaml(root, f"cramcl built-in stream ({stream.version}; " + ", ".join(f"{k}={v}" for k, v in params.items())
               + ")", stream.name, list(stream.tasks), first=stream.corpus, corpus=stream.corpus)


def _read_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def generate_builtin(out_dir: str | Path, *, seed: int = 0, n_train: int = 800, n_test: int = 200,
                     image_size: int = 64, n_pretrain: int | None = None, stream: str = "main") -> Path:
    """Write the built-in benchmark ``stream`` (a name in :data:`BUILTIN_STREAMS`) into ``out_dir`` (if not
    already there); return its YAML path.

    ``n_train`` / ``n_test`` are per task (digits caps them at its pool: 1,438 / 359; easy-VQA at
    its images). ``image_size`` applies to generated images; easy-VQA's are kept at their 64 px.
    ``n_pretrain`` (captioned base images) defaults to 1,650 at n_train=800, scaled with n_train (at least 50).
    An existing ``out_dir`` from an earlier call with other parameters is replaced; any other
    non-empty directory is left alone (BadInputError).
    """
    bad = [f"generate_builtin: {k} must be an integer >= {lo}, got {v!r}"
           for k, v, lo in (("seed", seed, 0), ("n_train", n_train, 1), ("n_test", n_test, 1),
                            ("image_size", image_size, 16), ("n_pretrain", n_pretrain, 1))
           if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo)]
    if stream not in BUILTIN_STREAMS:
        bad.append(f"generate_builtin: stream {stream!r} is not one of {', '.join(BUILTIN_STREAMS)}")
    if bad:
        raise BadInputError(bad)
    spec = BUILTIN_STREAMS[stream]
    if n_pretrain is None:
        n_pretrain = max(50, round(n_train * 1650 / 800))
    params = {"seed": seed, "n_train": n_train, "n_test": n_test, "image_size": image_size}
    if spec.corpus:
        params["n_pretrain"] = n_pretrain
    manifest = {"version": spec.version, "params": params}
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
        _generate_into(tmp, params, spec)
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


__all__ = ["BUILTIN_STREAMS", "BUILTIN_TASKS", "BUILTIN_VERSION", "RELATED_TASK_INFO", "TASK_INFO", "BuiltinStream",
           "BuiltinTask", "generate_builtin"]
