"""An attribute multiple-choice base corpus for the MC study (docs/mc-study.md, third round).

Reads an MC study benchmark (``python -m cramcl.data.builtin.mc_study --mc-heavy SRC``), keeps its caption
records ("Describe the image.") and writes OUT: the same tasks and images (symlinked) with a new
``pretrain.jsonl`` holding, per captioned base image,

* the caption record itself;
* one multiple choice per attribute its caption names, single words as options (3 or 4, shuffled):
  colour ("What colour is it?"), shape ("What shape is it?"), digit ("Which number is it?"), corner
  ("Which corner is it in?");
* one *binding* record that names the target in the text ("Which option says red? Options: A blue B red
  ... Answer with the letter." -> "B"): the image does not matter, only reading the options does.

Option words and stems differ from the stream's MC tasks ("Which option matches the picture?").

    PYTHONPATH=src python bench/mc_attribute_base.py SRC OUT [--binding N] [--spaced]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from cramcl.data.builtin import questions
from cramcl.data.builtin.choice import COLOUR_WORDS, options_question, shuffled_options

SHAPES = ("circle", "square", "triangle", "rectangle", "blob")
DIGITS = tuple(str(d) for d in range(10))
ATTRIBUTES = (  # (stem, the caption word it asks about, the option pool)
    ("What colour is it?", re.compile(r"\b(" + "|".join(COLOUR_WORDS) + r")\b"), COLOUR_WORDS),
    ("What shape is it?", re.compile(r"\b(" + "|".join(SHAPES) + r")\b"), SHAPES),
    ("Which number is it?", re.compile(r"\b(\d)\b"), DIGITS),
    ("Which corner is it in?", re.compile(r"\b((?:top|bottom)-(?:left|right))\b"), questions.CORNERS),
)


def options(rng: np.random.Generator, correct: str, pool) -> tuple[list[str], str]:
    """(options, letter of ``correct``): 3 or 4 options from ``pool``, ``correct`` among them, shuffled."""
    return shuffled_options(rng, correct, list(pool), int(rng.integers(3, 5)))


def binding_question(word: str, opts: list[str], spaced: bool = False) -> str:
    """``spaced``: "says red ?" so that the word is the option's token (the tokenizer splits on whitespace
    only, and "red?" is another token than "red")."""
    return options_question(f"Which option says {word}{' ' if spaced else ''}?", opts)


def new_binding(rng: np.random.Generator, spaced: bool = False) -> tuple[str, str]:
    """(question, letter) of a new binding record: a random attribute word among 3-4 shuffled options of its
    pool."""
    _, _, pool = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
    word = pool[int(rng.integers(len(pool)))]
    opts, letter = options(rng, word, pool)
    return binding_question(word, opts, spaced), letter


def caption_records(bench: Path) -> list[dict]:
    records = [json.loads(line) for line in open(bench / "pretrain.jsonl")]
    return [r for r in records if r["question"] == "Describe the image."]


def write(src: Path, out: Path, binding: int = 1, spaced: bool = False) -> int:
    """``binding``: binding records per captioned image; ``spaced``: see :func:`binding_question`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for p in src.iterdir():  # tasks and images shared; the YAML copied so that it reads OUT's pretrain.jsonl
        if p.name == "benchmark.yaml":
            shutil.copy(p, out / p.name)
        elif p.name != "pretrain.jsonl":
            os.symlink(p.resolve(), out / p.name)
    rng = np.random.default_rng(11)
    records = []
    for r in caption_records(src):
        records.append(r)
        for stem, pattern, pool in ATTRIBUTES:
            found = pattern.search(r["answer"])
            if found:
                opts, letter = options(rng, found.group(1), pool)
                records.append({"image": r["image"], "question": options_question(stem, opts), "answer": letter})
        for _ in range(binding):
            question, letter = new_binding(rng, spaced)
            records.append({"image": r["image"], "question": question, "answer": letter})
    order = np.random.default_rng(5).permutation(len(records))
    rows = [{**records[i], "id": f"pretrain-{j:05d}"} for j, i in enumerate(order)]
    with open(out / "pretrain.jsonl", "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    # the binding records again, in corpus order, as the base's first stage (pretrain_first + backbone.base_first_*)
    with open(out / "reading.jsonl", "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows if row["question"].startswith("Which option says")))
    yaml_text = (out / "benchmark.yaml").read_text()
    (out / "benchmark.yaml").write_text(yaml_text.replace("\npretrain: pretrain.jsonl\n",
                                                          "\npretrain: pretrain.jsonl\npretrain_first: reading.jsonl\n"))
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
