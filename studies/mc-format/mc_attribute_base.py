"""An attribute multiple-choice base corpus for the MC study (studies/mc-format/README.md, third round).

Reads an MC study benchmark (``python studies/mc-format/mc_study.py --mc-heavy SRC``), keeps its caption
records ("Describe the image.") and writes OUT: the same tasks and images (symlinked) with a new
``pretrain.jsonl`` holding, per captioned base image,

* the caption record itself;
* one multiple choice per attribute its caption names, single words as options (3 or 4, shuffled):
  colour ("What colour is it?"), shape ("What shape is it?"), digit ("Which number is it?"), corner
  ("Which corner is it in?");
* one *binding* record that names the target in the text ("Which option says red? Options: A blue B red
  ... Answer with the letter." -> "B"): the image does not matter, only reading the options does.

Option words and stems differ from the stream's MC tasks ("Which option matches the picture?"). The records
are :mod:`cramcl.data.builtin.reading`'s (the built-in stream's base corpus uses them too, with its own tail).

    python studies/mc-format/mc_attribute_base.py SRC OUT [--binding N] [--spaced]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from cramcl.data.builtin.reading import choice_records, is_binding


def caption_records(bench: Path) -> list[dict]:
    records = [json.loads(line) for line in open(bench / "pretrain.jsonl")]
    return [r for r in records if r["question"] == "Describe the image."]


def write(src: Path, out: Path, binding: int = 1, spaced: bool = False) -> int:
    """``binding``: binding records per captioned image; ``spaced``: see
    :func:`cramcl.data.builtin.reading.binding_question`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for p in src.iterdir():  # tasks and images shared; the YAML copied so that it reads OUT's pretrain.jsonl
        if p.name == "benchmark.yaml":
            shutil.copy(p, out / p.name)
        elif p.name != "pretrain.jsonl":
            os.symlink(p.resolve(), out / p.name)
    captions = caption_records(src)
    extra = choice_records([r["answer"] for r in captions], np.random.default_rng(11), binding=binding, spaced=spaced)
    by_caption: dict[int, list[dict]] = {}
    for i, question, letter in extra:
        by_caption.setdefault(i, []).append({"image": captions[i]["image"], "question": question, "answer": letter})
    records = [row for i, r in enumerate(captions) for row in (r, *by_caption.get(i, []))]
    order = np.random.default_rng(5).permutation(len(records))
    rows = [{**records[i], "id": f"pretrain-{j:05d}"} for j, i in enumerate(order)]
    with open(out / "pretrain.jsonl", "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    # the binding records again, in corpus order, as the base's first stage (pretrain_first + backbone.base_first_*)
    with open(out / "reading.jsonl", "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows if is_binding(row["question"])))
    yaml_text = (out / "benchmark.yaml").read_text()
    first = "\npretrain: pretrain.jsonl\npretrain_first: reading.jsonl\n"
    (out / "benchmark.yaml").write_text(yaml_text.replace("\npretrain: pretrain.jsonl\n", first))
    return len(records)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--binding", type=int, default=1, help="binding records per captioned image")
    parser.add_argument("--spaced", action="store_true", help='"says red ?" instead of "says red?"')
    args = parser.parse_args()
    n = write(args.src, args.out, args.binding, args.spaced)
    print(f"{sys.argv[2]}: {n} pretrain records")
