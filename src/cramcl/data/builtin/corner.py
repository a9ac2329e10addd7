"""The corner format: where is the one object? Answers ``top-left`` ... ``bottom-right`` (hyphenated).

* ``corner``: a small palette shape somewhere inside one quadrant of a light canvas.
* ``digit-corner``: a handwritten scikit-learn digit, shrunk, inside one quadrant of a black canvas; test
  records draw on the digits' test pool and train records on their train pool (the pools of
  :func:`cramcl.data.builtin.digits.pools`), so no digit glyph is both trained and tested on.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cramcl.data.builtin import digits, questions
from cramcl.data.builtin._common import BACKGROUND, COLOUR_NAMES, PALETTE, Sample, draw_shape, split_rng, unique_samples
from cramcl.data.builtin.scenes import SHAPES


def _spot(rng: np.random.Generator, image_size: int, size: float) -> tuple[str, float, float]:
    """(corner name, cx, cy): a uniform corner and a centre near it, in the outer third of the image along
    both axes (clear of the middle, where the 3x3 feature grid of a 96 px image is ambiguous), keeping
    the ``size`` box inside the image."""
    corner = questions.CORNERS[int(rng.integers(4))]
    s, h = float(image_size), size / 2
    # distance of the centre from the corner's two edges, per axis
    dx, dy = (float(v) for v in rng.uniform(h + 1, max(h + 1.5, s / 3), size=2))
    cx = s - dx if corner.endswith("right") else dx
    cy = s - dy if corner.startswith("bottom") else dy
    return corner, cx, cy


def _where(corner: str) -> str:
    """How a base caption says it: "in the top-left corner" (a phrase, not the task's one-word answer).

    The word itself must occur in the base corpus: the tiny LM's word embeddings are frozen with the
    base, so an answer word the base never saw would have a random output embedding for LoRA to fight
    (too much for a task's few steps)."""
    return f"in the {corner} corner"


def _shape_in_corner(rng: np.random.Generator, image_size: int) -> Sample:
    size = image_size * float(rng.uniform(0.15, 0.25))
    corner, cx, cy = _spot(rng, image_size, size)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    im = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw_shape(ImageDraw.Draw(im), shape, cx, cy, size, PALETTE[colour])
    return Sample(questions.CORNER, corner, f"a small {colour} {shape} {_where(corner)}", image=im)


def _digit_in_corner(rng: np.random.Generator, image_size: int, pool: list[int]) -> Sample:
    index = pool[int(rng.integers(len(pool)))]
    side = max(8, round(image_size * float(rng.uniform(0.25, 0.35))))
    corner, cx, cy = _spot(rng, image_size, side)
    glyph = digits.glyph(index).resize((side, side), Image.Resampling.BILINEAR).convert("RGB")
    im = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    im.paste(glyph, (round(cx - side / 2), round(cy - side / 2)))
    return Sample(questions.CORNER, corner, f"a small handwritten {digits.label_of(index)} {_where(corner)}", image=im)


def make_corner(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                exclude: set[str]) -> list[Sample]:
    """A shape in a quadrant; answer its corner."""
    return unique_samples(lambda rng: _shape_in_corner(rng, image_size), n, split_rng(task_seed, split),
                          exclude)


def make_digit_corner(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                      exclude: set[str]) -> list[Sample]:
    """A handwritten digit in a quadrant; answer its corner."""
    test_pool, train_pool = digits.pools(task_seed[0])
    pool = test_pool if split == "test" else train_pool
    return unique_samples(lambda rng: _digit_in_corner(rng, image_size, pool), n,
                          split_rng(task_seed, split), exclude)
