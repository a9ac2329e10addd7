"""`cramcl run` with the tiny backbone's base stage probed every N steps (the MC study, studies/mc-format/README.md).

The base stage trains exactly as in a plain run (same batches, same cache key: the base is cached for
later runs with the same thread count); every ``--every`` steps, and after the last, the model answers the
probe sets greedily and one JSON line per probe goes to ``--log``:

* ``colour``: 200 fresh colour multiple choices on the benchmark's captioned base images (new option
  shuffles of images the base trains on: the skill, not the records);
* ``bind``: 200 fresh binding records ("Which option says red? ...": reading the options only; with
  ``--spaced`` "says red ? ...", as ``mc_attribute_base.py --spaced`` writes them);
* ``mc-*``: the test records of the benchmark's MC tasks (``mc-shape``, ``mc-digit``, ...; zero-shot).

    python studies/mc-format/base_probe.py --bench B --log probes.jsonl [--every 250] [--threads 1] \
        -- run --benchmark B/benchmark.yaml --method zero-shot --profile default --out DIR backbone.base_steps=3000

The option-reading stage of rounds 4 and 5 is the base's first stage: a benchmark written by
``mc_attribute_base.py`` names its binding records as ``pretrain_first: reading.jsonl``, and
``backbone.base_first_steps=2000 backbone.base_first_lr=5e-4 backbone.base_first_warmup=300`` trains them
alone first (bit-identical to the ``--reading-first`` flag this script had before). ``--init-from``
(continue a cached base) and ``--image-fresh`` (round 5) need a CRAMCL_CACHE of their own.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import cramcl.backbones.tiny.backbone as tiny_backbone
import cramcl.backbones.tiny.base_stage as base_stage
from cramcl.data.builtin.choice import TAIL, options_question
from cramcl.data.builtin.reading import ATTRIBUTES, new_binding
from cramcl.data.builtin.reading import some_options as options
from cramcl.data.records import Record
from mc_attribute_base import caption_records

PROBE_SIZE = 200


def binding_record(rng: np.random.Generator, rid: str, image: Path, spaced: bool, tail: str = TAIL) -> Record:
    """A fresh binding record on ``image`` (:func:`cramcl.data.builtin.reading.new_binding`)."""
    return Record(rid, image, *new_binding(rng, spaced, tail))


def probe_sets(bench: Path, spaced: bool = False, tail: str = TAIL) -> dict[str, list[Record]]:
    """``tail``: the text after the options, as the corpus writes it (the study's unless given; the built-in
    stream's corpus ends its multiple choices with ``questions.CHOICE_TAIL``)."""
    root = (bench / "images").resolve()
    rng = np.random.default_rng(99)
    colour, bind = [], []
    stem, pattern, pool = ATTRIBUTES[0]
    for r in caption_records(bench):
        found = pattern.search(r["answer"])
        if found and len(colour) < PROBE_SIZE:
            opts, letter = options(rng, found.group(1), pool)
            colour.append(Record(f"c{len(colour)}", root / r["image"], options_question(stem, opts, tail), letter))
        if len(bind) < PROBE_SIZE:
            bind.append(binding_record(rng, f"b{len(bind)}", root / r["image"], spaced, tail))
    sets = {"colour": colour, "bind": bind}
    for task in sorted(p.name for p in bench.iterdir() if p.name.startswith("mc-") and (p / "test.jsonl").exists()):
        rows = [json.loads(line) for line in open(bench / task / "test.jsonl")]
        sets[task] = [Record(r["id"], root / r["image"], r["question"], r["answer"]) for r in rows]
    return sets


def reshuffled(rng: np.random.Generator, record: Record, tail: str = TAIL) -> Record:
    """An attribute multiple choice of the corpus with a new draw of its options (same image and answer
    word); any other record unchanged."""
    for stem, _, pool in ATTRIBUTES:
        if record.question.startswith(stem + " Options: "):
            words = record.question[len(stem) + len(" Options: "):].rsplit(" " + tail, 1)[0].split(" ")
            correct = dict(zip(words[0::2], words[1::2]))[record.answer]
            opts, letter = options(rng, correct, pool)
            return Record(record.id, record.image, options_question(stem, opts, tail), letter)
    return record


def accuracy(backbone, records: list[Record]) -> float:
    hits = 0
    for i in range(0, len(records), 100):
        chunk = records[i:i + 100]
        preds = backbone.generate(backbone.model, backbone.collate(chunk, train=False))
        hits += sum(p.strip() == r.answer for p, r in zip(preds, chunk))
    return round(100 * hits / len(records), 1)


def install_probes(bench: Path, log_path: Path, every: int, spaced: bool = False,
                   init_from: Path | None = None, image_fresh: bool = False, tail: str = TAIL) -> None:
    """Wrap the base stage's trainer so that it probes the model every ``every`` optimizer steps (one count
    over the first stage, when ``backbone.base_first_steps`` runs one, and the base stage proper), and after
    each stage (the first stage's end logged as step ``-steps``).

    ``init_from``: a cached base's safetensors to start from (a longer main stage without retraining it).
    ``image_fresh``: in the base stage proper, every attribute multiple choice gets a new draw of its options
    each time it is in a batch (no letter to memorise per record). With either, the result is cached under
    the plain run's key although it is not what a plain run makes: use a cache of its own (CRAMCL_CACHE)."""
    train_base, train = tiny_backbone.TinyBackbone._train_base, base_stage._train

    def probed_train_base(self, corpus, first, seed, log):
        sets = probe_sets(bench, spaced, tail)
        for records in sets.values():
            self.prepare(records)
        stages = ["first", "main"] if self.cfg.base_first_steps and first else ["main"]
        calls = {"n": 0}

        @torch.no_grad()
        def probe(step: int) -> None:
            was_training = self.model.training
            self.model.eval()
            row = {"step": step, **{name: accuracy(self, rs) for name, rs in sets.items()}, "time": time.time()}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print("PROBE", row, flush=True)
            self.model.train(was_training)

        def counted(make):  # the trainer builds one batch per optimizer step, just before it
            def make_counted(idx):
                if calls["n"] and calls["n"] % every == 0:
                    probe(calls["n"])
                calls["n"] += 1
                return make(idx)
            return make_counted

        def train_with_probes(model, make_batch, n_records, steps, batch_size, lr, seed_, warmup=None):
            stage = stages.pop(0)
            if init_from is not None and calls["n"] == 0:  # continue a cached base instead of random init
                model.load_state_dict(load_file(str(init_from)), strict=True)
                probe(0)
            if stage == "main" and image_fresh:
                rng_fresh = np.random.default_rng(seed_ + 2)
                make_batch = lambda idx: self.collate(  # noqa: E731
                    [reshuffled(rng_fresh, corpus[i], tail) for i in idx], train=True, tensors_only=True)
            train(model, counted(make_batch), n_records, steps, batch_size, lr, seed_, warmup)
            probe(-steps if stage == "first" else steps)

        base_stage._train = train_with_probes
        try:
            train_base(self, corpus, first, seed, log)
        finally:
            base_stage._train = train

    tiny_backbone.TinyBackbone._train_base = probed_train_base


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        description="cramcl run with the base stage probed every N steps",
        usage="%(prog)s --bench B --log F [options] -- run [cramcl run arguments]")
    parser.add_argument("--bench", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--spaced", action="store_true", help="binding probes as mc_attribute_base --spaced")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start the base stage from these cached base weights (use a cache of its own)")
    parser.add_argument("--image-fresh", action="store_true",
                        help="the base stage proper redraws the options of its attribute multiple choices every step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (part of the base's cache key)")
    parser.add_argument("--tail", default=TAIL, help="the corpus's text after the options (the built-in stream: "
                        "'Reply with the letter of the correct option.')")
    args = parser.parse_args(argv[:split])
    if split == len(argv):
        parser.error("give the cramcl command after '--' (e.g. -- run --benchmark B/benchmark.yaml ...)")
    torch.set_num_threads(args.threads)
    install_probes(args.bench, args.log, args.every, args.spaced, args.init_from, args.image_fresh, args.tail)
    from cramcl.cli import main as cramcl_main

    return cramcl_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
