"""The multiple-choice study's own tasks and base-corpus records (the built-in stream uses none of them).

Every task here is the format of :mod:`cramcl.data.builtin.choice` (``STEM Options: A x B y ... TAIL`` ->
the letter) under the study's stem and tail (:data:`~cramcl.data.builtin.choice.STEM`,
:data:`~cramcl.data.builtin.choice.TAIL`):

* ``mc-digit``: a handwritten scikit-learn digit (the digits' test / train pools); the true digit and three
  other digits are the options, shuffled.
* ``mc-colour``: a colour blob on grey noise (the ``colour`` task's domain); its colour and three other
  palette colours are the options, shuffled.
* ``mc-corner``: the ``corner`` task's images (a shape in a quadrant); the four corners ("top-left", ...)
  are the options, shuffled.
* ``mc-colour3`` / ``mc-corner3``: ``mc-colour`` / ``mc-corner`` with three options.

(``mc-shape`` and ``mc-corner-fixed`` are the built-in stream's and stay in the package.) They stay near chance
at the stream's budget (README.md of this folder).

:func:`instruction_samples` turns base-corpus captions into generic instruction-following records
(multiple choice over captions and over colours, yes/no, left/right and top/bottom) on the same held-apart
images, for a base stage that knows how to read options before the stream starts.
"""
from __future__ import annotations

import re

import numpy as np

from cramcl.data.builtin import corner, digits, patches, questions
from cramcl.data.builtin._common import COLOUR_NAMES, Sample, split_rng
from cramcl.data.builtin.choice import COLOUR_WORDS, STEM, options_question, shuffled_options
from cramcl.data.builtin.scenes import SHAPES


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


# ---------------------------------------------------------------- the base stage's instruction records
CAPTION_STEM = "Which caption fits the image?"
COLOUR_STEM = "What colour is it?"
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
