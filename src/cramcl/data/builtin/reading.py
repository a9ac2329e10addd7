"""The base corpus's multiple-choice records: what an instruction-tuned MLLM knows of answering with a letter.

Per captioned base image (never a test image), :func:`choice_records` gives

* one *attribute* multiple choice per attribute its caption names, single words as options (3 or 4, shuffled):
  colour ("What colour is it?"), shape ("What shape is it?"), digit ("Which number is it?"), corner ("Which
  corner is it in?");
* *binding* records that name the target in the text ("Which option says red ? Options: A blue B red ...")
  -> "B": the image does not matter, only reading the options does.

The binding records are also the base's first stage (``pretrain_first``): trained alone, at a low learning
rate with a long warm-up, they teach the tiny LM to find an option by its content and copy its letter, which
it does not learn inside the mixed corpus (docs/profiles.md, "default: base_path"). Stems and option pools differ from
the stream's multiple-choice tasks; only the tail after the options is shared, as real instruction data
shares one ("Answer with the option's letter from the given choices directly.").
"""
from __future__ import annotations

import re

import numpy as np

from cramcl.data.builtin import questions
from cramcl.data.builtin.choice import COLOUR_WORDS, TAIL, options_question, shuffled_options

SHAPES = ("circle", "square", "triangle", "rectangle", "blob")
DIGITS = tuple(str(d) for d in range(10))
ATTRIBUTES = (  # (stem, the caption word it asks about, the option pool)
    ("What colour is it?", re.compile(r"\b(" + "|".join(COLOUR_WORDS) + r")\b"), COLOUR_WORDS),
    ("What shape is it?", re.compile(r"\b(" + "|".join(SHAPES) + r")\b"), SHAPES),
    ("Which number is it?", re.compile(r"\b(\d)\b"), DIGITS),
    ("Which corner is it in?", re.compile(r"\b((?:top|bottom)-(?:left|right))\b"), questions.CORNERS),
)
BINDING_STEM = "Which option says"


def some_options(rng: np.random.Generator, correct: str, pool) -> tuple[list[str], str]:
    """(options, letter of ``correct``): 3 or 4 options from ``pool``, ``correct`` among them, shuffled."""
    return shuffled_options(rng, correct, list(pool), int(rng.integers(3, 5)))


def binding_question(word: str, opts: list[str], spaced: bool = False, tail: str = TAIL) -> str:
    """``spaced``: "says red ?" so that the word is the option's token (the tokenizer splits on whitespace
    only, and "red?" is another token than "red")."""
    return options_question(f"{BINDING_STEM} {word}{' ' if spaced else ''}?", opts, tail)


def new_binding(rng: np.random.Generator, spaced: bool = False, tail: str = TAIL) -> tuple[str, str]:
    """(question, letter) of a new binding record: a random attribute word among 3-4 shuffled options of its
    pool."""
    _, _, pool = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
    word = pool[int(rng.integers(len(pool)))]
    opts, letter = some_options(rng, word, pool)
    return binding_question(word, opts, spaced, tail), letter


def attribute_choices(rng: np.random.Generator, caption: str, tail: str = TAIL) -> list[tuple[str, str]]:
    """(question, letter) per attribute the caption names, in :data:`ATTRIBUTES`' order."""
    out = []
    for stem, pattern, pool in ATTRIBUTES:
        found = pattern.search(caption)
        if found:
            opts, letter = some_options(rng, found.group(1), pool)
            out.append((options_question(stem, opts, tail), letter))
    return out


def choice_records(captions: list[str], rng: np.random.Generator, *, binding: int, spaced: bool,
                   tail: str = TAIL) -> list[tuple[int, str, str]]:
    """(caption index, question, letter) for every caption in order: its attribute multiple choices, then
    ``binding`` binding records (drawn from ``rng`` in that order)."""
    out = []
    for i, caption in enumerate(captions):
        out += [(i, q, a) for q, a in attribute_choices(rng, caption, tail)]
        out += [(i, *new_binding(rng, spaced, tail)) for _ in range(binding)]
    return out


def is_binding(question: str) -> bool:
    return question.startswith(BINDING_STEM)
