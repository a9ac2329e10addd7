"""The multiple-choice letter format: its tasks, and the study tasks of docs/mc-study.md.

All tasks of the format ask one stem; the options after it differ per record, and the answer is the letter:

    "Which option matches the picture? Options: A triangle B circle C square Answer with the letter." -> "A"

(the study's :data:`STEM` and :data:`TAIL`; the built-in stream passes its own, ``questions.CHOICE`` and
``questions.CHOICE_TAIL``). Options are written ``LETTER word`` with the letter as its own whitespace word,
identical to the answer token (the tiny tokenizer keeps "A." and "A" apart, and "square." apart from
"square"), so a model that finds the matching option can copy the letter before it.

* ``mc-shape``: one palette shape (circle / square / triangle) anywhere on a pale tinted canvas; the three
  shapes are the options, shuffled.
* ``mc-digit``: a handwritten scikit-learn digit (the digits' test / train pools); the true digit and three
  other digits are the options, shuffled.
* ``mc-colour``: a colour blob on grey noise (the ``colour`` task's domain); its colour and three other
  palette colours are the options, shuffled.
* ``mc-corner``: the ``corner`` task's images (a shape in a quadrant); the four corners ("top-left", ...)
  are the options, shuffled.
* ``mc-corner-fixed``: as ``mc-corner`` with the corners always in one order (the letter is a class label).
* ``mc-colour3`` / ``mc-corner3``: ``mc-colour`` / ``mc-corner`` with three options.

In the built-in stream: ``mc-shape`` and ``mc-corner-fixed`` (the others stay near chance at the stream's
budget, docs/mc-study.md).

:func:`instruction_samples` turns base-corpus captions into generic instruction-following records
(multiple choice over captions and over colours, yes/no, left/right and top/bottom) on the same held-apart
images, for a base stage that knows how to read options before the stream starts.
"""
from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageDraw

from cramcl.data.builtin import corner, digits, patches, questions
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
    ``tail``: the study's unless given (the built-in stream passes its own, :data:`questions.CHOICE`)."""
    return unique_samples(lambda rng: _mc_shape(rng, image_size, stem, tail), n, split_rng(task_seed, split),
                          exclude)


def _as_choices(samples: list[Sample], rng: np.random.Generator, pool: list[str], k: int) -> list[Sample]:
    """Each sample as a multiple choice: its answer and ``k - 1`` other items of ``pool``, shuffled, under
    :data:`STEM`; the answer becomes the letter (image and caption kept)."""
    out = []
    for s in samples:
        options, letter = shuffled_options(rng, s.answer, pool, k)
        out.append(Sample(options_question(STEM, options), letter, s.caption, image=s.image))
    return out


def make_mc_digit(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                  exclude: set[str]) -> list[Sample]:
    """A handwritten digit; options: it and three other digits, shuffled; answer: the letter."""
    return _as_choices(digits.make_digits(split, n, task_seed, image_size, exclude), split_rng(task_seed, split),
                       [str(d) for d in range(10)], 4)


def make_mc_colour(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                   exclude: set[str]) -> list[Sample]:
    """A colour blob on grey noise (the ``colour`` task's images); options: its colour and three other palette
    colours, shuffled; answer: the letter."""
    return _as_choices(patches.make_colour(split, n, task_seed, image_size, exclude), split_rng(task_seed, split),
                       list(COLOUR_NAMES), 4)


def make_mc_corner(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                   exclude: set[str]) -> list[Sample]:
    """A shape in a quadrant (the ``corner`` task's images); options: the four corners, shuffled; answer: the
    letter."""
    return _as_choices(corner.make_corner(split, n, task_seed, image_size, exclude), split_rng(task_seed, split),
                       list(questions.CORNERS), len(questions.CORNERS))


def make_mc_colour3(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                    exclude: set[str]) -> list[Sample]:
    """As :func:`make_mc_colour` with three options (the study's option-count check)."""
    return _as_choices(patches.make_colour(split, n, task_seed, image_size, exclude), split_rng(task_seed, split),
                       list(COLOUR_NAMES), 3)


def make_mc_corner3(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                    exclude: set[str]) -> list[Sample]:
    """As :func:`make_mc_corner` with three of the four corners as options."""
    return _as_choices(corner.make_corner(split, n, task_seed, image_size, exclude), split_rng(task_seed, split),
                       list(questions.CORNERS), 3)


def make_mc_corner_fixed(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                         exclude: set[str], stem: str = STEM, tail: str = TAIL) -> list[Sample]:
    """As :func:`make_mc_corner` with the four corners always in the same order: the letter is a class label
    (no option reading needed), which means something else than in the shuffled tasks of the format."""
    out = []
    question = options_question(stem, list(questions.CORNERS), tail)
    for s in corner.make_corner(split, n, task_seed, image_size, exclude):
        out.append(Sample(question, LETTERS[questions.CORNERS.index(s.answer)], s.caption, image=s.image))
    return out


# ---------------------------------------------------------------- the base stage's instruction records
CAPTION_STEM = "Which caption fits the image?"
COLOUR_STEM = "What colour is it?"
COLOUR_WORDS = tuple(dict.fromkeys(COLOUR_NAMES + ("gray", "teal", "brown")))
_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOUR_WORDS) + r")\b")
_CORNER_RE = re.compile(r"\b(top|bottom)-(left|right) corner\b")
_SLOT_RE = re.compile(r"\b(" + "|".join(COLOUR_WORDS + tuple(SHAPES) + (
    "rectangle", "top", "bottom", "left", "right", "one", "two", "three", "four", "five")) + r"|\d+)\b")


def caption_domain(caption: str) -> str:
    """The caption with its colour, shape, number and position words blanked: captions sharing it come from
    the same domain ("a _ _", "a small handwritten _ in the _-_ corner", "_ dots", ...)."""
    return _SLOT_RE.sub("_", caption)


def instruction_samples(samples: list[Sample], seed: int, *, mc_heavy: bool = False) -> list[Sample]:
    """Generic instruction records over captioned base-corpus samples (their images reused):

    * every sample: a 3-option multiple choice over captions (distractors: other samples' captions) and a
      yes/no question "Is this <caption>?" (the true caption or another one, half each);
    * a caption naming a colour: a 4-option multiple choice over colour words;
    * a caption naming a corner: "left or right?" and "top or bottom?" (one-word answers).

    Stems, option wording and answer spaces differ from the stream's own questions.

    ``mc_heavy``: two caption multiple choices per sample with distractors from the same domain
    (:func:`caption_domain`; all captions where the domain has fewer than three), colour multiple choice and
    yes/no as above, and no left/right or top/bottom records.
    """
    rng = np.random.default_rng([seed, 7331])
    captions = sorted({s.caption for s in samples})
    out: list[Sample] = []

    def add(s: Sample, question: str, answer: str) -> None:
        out.append(Sample(question, answer, s.caption, image=s.image, source=s.source, key=s.key))

    by_domain: dict[str, list[str]] = {}
    for c in captions:
        by_domain.setdefault(caption_domain(c), []).append(c)
    for s in samples:
        if mc_heavy:
            pool = by_domain[caption_domain(s.caption)]
            pool = pool if len(pool) >= 3 else captions
            for _ in range(2):
                options, letter = shuffled_options(rng, s.caption, pool, 3)
                add(s, options_question(CAPTION_STEM, options), letter)
        else:
            options, letter = shuffled_options(rng, s.caption, captions, 3)
            add(s, options_question(CAPTION_STEM, options), letter)
        if rng.random() < 0.5:
            add(s, f"Is this {s.caption} ? Answer yes or no.", "yes")
        else:
            other = captions[int(rng.integers(len(captions)))]
            add(s, f"Is this {other} ? Answer yes or no.", "yes" if other == s.caption else "no")
        colour = _COLOUR_RE.search(s.caption)
        if colour:
            options, letter = shuffled_options(rng, colour.group(1), list(COLOUR_WORDS), 4)
            add(s, options_question(COLOUR_STEM, options), letter)
        corner = None if mc_heavy else _CORNER_RE.search(s.caption)
        if corner:
            if rng.random() < 0.5:
                add(s, "Is the object on the left or on the right?", corner.group(2))
            else:
                add(s, "Is the object at the top or at the bottom?", corner.group(1))
    return out
