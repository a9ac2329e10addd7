"""The multiple-choice letter format of the built-in stream: its two tasks and the option helpers.

All tasks of the format ask one stem; the options after it differ per record, and the answer is the letter:

    "Which option matches the picture? Options: A triangle B circle C square Answer with the letter." -> "A"

(:data:`STEM` and :data:`TAIL` are the defaults; the built-in stream passes its own, ``questions.CHOICE`` and
``questions.CHOICE_TAIL``). Options are written ``LETTER word`` with the letter as its own whitespace word,
identical to the answer token (the tiny tokenizer keeps "A." and "A" apart, and "square." apart from
"square"), so a model that finds the matching option can copy the letter before it.

* ``mc-shape``: one palette shape (circle / square / triangle) anywhere on a pale tinted canvas; the three
  shapes are the options, shuffled.
* ``mc-corner-fixed``: the ``corner`` task's images (a shape in a quadrant) with the four corners as options,
  always in one order (the letter is a class label).

:func:`options_question`, :func:`shuffled_options` and :data:`COLOUR_WORDS` also write the base corpus's
multiple choices (:mod:`.reading`). The other multiple-choice tasks of the format's study (shuffled digits,
colours and corners, three-option variants) and its instruction records live with the study, in
studies/mc-format/ of the repository.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cramcl.data.builtin import corner, questions
from cramcl.data.builtin._common import COLOUR_NAMES, PALETTE, Sample, draw_shape, split_rng, unique_samples
from cramcl.data.builtin.scenes import SHAPES

LETTERS = ("A", "B", "C", "D", "E")
STEM = "Which option matches the picture?"
TAIL = "Answer with the letter."


def options_question(stem: str, options: list[str], tail: str = TAIL) -> str:
    """``stem Options: A x B y ... tail`` (tail: ``Answer with the letter.`` unless given)."""
    listed = " ".join(f"{LETTERS[i]} {o}" for i, o in enumerate(options))
    return f"{stem} Options: {listed} {tail}"


def shuffled_options(rng: np.random.Generator, correct: str, others: list[str], k: int) -> tuple[list[str], str]:
    """(options, letter): ``correct`` and ``k - 1`` distinct items of ``others`` (not equal to it) in a
    random order; the letter names where ``correct`` landed."""
    pool = [o for o in dict.fromkeys(others) if o != correct]
    picked = [pool[int(i)] for i in rng.permutation(len(pool))[: k - 1]]
    options = [correct, *picked]
    order = rng.permutation(len(options))
    options = [options[int(i)] for i in order]
    return options, LETTERS[options.index(correct)]


def _tint(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(215, 256, size=3))


def _shape_on_tint(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, str, str]:
    s = float(image_size)
    size = s * float(rng.uniform(0.3, 0.5))
    h = size / 2
    cx, cy = (float(v) for v in rng.uniform(h + 1, s - h - 1, size=2))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    im = Image.new("RGB", (image_size, image_size), _tint(rng))
    draw_shape(ImageDraw.Draw(im), shape, cx, cy, size, PALETTE[colour])
    return im, shape, colour


def _mc_shape(rng: np.random.Generator, image_size: int, stem: str, tail: str) -> Sample:
    im, shape, colour = _shape_on_tint(rng, image_size)
    options, letter = shuffled_options(rng, shape, list(SHAPES), len(SHAPES))
    return Sample(options_question(stem, options, tail), letter, f"a {colour} {shape}", image=im)


def make_mc_shape(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                  exclude: set[str], stem: str = STEM, tail: str = TAIL) -> list[Sample]:
    """A shape on a tinted canvas; options: the three shapes, shuffled; answer: the letter. ``stem`` and
    ``tail``: :data:`STEM` / :data:`TAIL` unless given (the built-in stream passes its own, :data:`questions.CHOICE`)."""
    return unique_samples(lambda rng: _mc_shape(rng, image_size, stem, tail), n, split_rng(task_seed, split),
                          exclude)


def make_mc_corner_fixed(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                         exclude: set[str], stem: str = STEM, tail: str = TAIL) -> list[Sample]:
    """A shape in a quadrant (the ``corner`` task's images); options: the four corners, always in the same
    order, so the letter is a class label (no option reading needed), which means something else than in the
    shuffled ``mc-shape``; answer: the letter."""
    out = []
    question = options_question(stem, list(questions.CORNERS), tail)
    for s in corner.make_corner(split, n, task_seed, image_size, exclude):
        out.append(Sample(question, LETTERS[questions.CORNERS.index(s.answer)], s.caption, image=s.image))
    return out


#: Colour words the base corpus's colour multiple choices offer (the palette's and three more).
COLOUR_WORDS = tuple(dict.fromkeys(COLOUR_NAMES + ("gray", "teal", "brown")))
