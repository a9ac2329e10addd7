"""Procedural scenes: ``count`` (1-4 dots, number format) and ``caption`` (one or two placed shapes).

Both draw each image from a seeded numpy stream per split; ``unique_samples`` rejects any image
already drawn for the test split, so train never contains a test image.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cramcl.data.builtin import questions
from cramcl.data.builtin._common import BACKGROUND, COLOUR_NAMES, PALETTE, Sample, draw_shape, split_rng, unique_samples

MAX_DOTS = 4
SHAPES = ("circle", "square", "triangle")
MIN_SIZE, MAX_SIZE = 0.22, 0.32  # a shape's size, as a share of the image side
ACROSS_JITTER = 0.06  # the most two related shapes' centres differ across the relation axis (share of the side)
#: The caption's relation -> the base corpus's generic caption of the same image (words of its own).
ARRANGEMENT = {"left of": "two shapes side by side", "above": "two shapes one above the other"}


def _dot_scene(rng: np.random.Generator, image_size: int) -> Sample:
    """1..4 filled dots of random palette colours at random non-overlapping positions."""
    n = int(rng.integers(1, MAX_DOTS + 1))
    r = max(2, round(image_size * 0.09))
    gap = 2 * r + max(2, image_size // 32)  # centre distance that leaves a visible gap between dots
    im = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(im)
    centres: list[tuple[int, int]] = []
    while len(centres) < n:  # rejection sampling; 4 dots of this size always fit, so this ends fast
        x, y = (int(v) for v in rng.integers(r + 1, image_size - r - 1, size=2))
        if all((x - cx) ** 2 + (y - cy) ** 2 >= gap * gap for cx, cy in centres):
            centres.append((x, y))
    for x, y in centres:
        colour = PALETTE[COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]]
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return Sample(questions.NUMBER, str(n), f"{n} dots", image=im)


def _shape_scene(rng: np.random.Generator, image_size: int) -> Sample:
    """One shape (a third of scenes) or two of distinct colours, side by side or one above the other.

    The caption names the left (or upper) shape first: "a red circle left of a blue square",
    "a red circle above a blue square", or just "a red circle". Two shapes lie along one axis: their centres
    differ across it by at most ``ACROSS_JITTER`` of the image, along it by more than ``MIN_SIZE`` of it, so
    the image fits one relation only (with both coordinates free, many pairs would lie both left of and above
    each other). The generic caption (the base corpus's) names the arrangement (``ARRANGEMENT``)."""
    s = float(image_size)
    im = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(im)
    count = 1 if rng.random() < 1 / 3 else 2
    colours = [COLOUR_NAMES[int(i)] for i in rng.choice(len(COLOUR_NAMES), size=count, replace=False)]
    shapes = [SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=count)]
    sizes = [s * float(rng.uniform(MIN_SIZE, MAX_SIZE)) for _ in range(count)]
    names = [f"a {c} {sh}" for c, sh in zip(colours, shapes)]
    if count == 1:
        h = sizes[0] / 2
        cx, cy = (float(rng.uniform(h + 1, s - h - 1)) for _ in range(2))
        draw_shape(draw, shapes[0], cx, cy, sizes[0], PALETTE[colours[0]])
        return Sample(questions.CAPTION, names[0], "one shape", image=im)

    horizontal = rng.random() < 0.5
    # One line across the relation axis for both shapes (room for the largest shape), each jittered off it.
    line = float(rng.uniform(s * (MAX_SIZE / 2 + ACROSS_JITTER), s * (1 - MAX_SIZE / 2 - ACROSS_JITTER)))
    for k in range(2):
        h = sizes[k] / 2
        # Along the relation axis, shape k stays in its own half.
        along = float(rng.uniform(k * s / 2 + h + 1, (k + 1) * s / 2 - h - 1))
        across = line + float(rng.uniform(-ACROSS_JITTER, ACROSS_JITTER)) * s / 2
        cx, cy = (along, across) if horizontal else (across, along)
        draw_shape(draw, shapes[k], cx, cy, sizes[k], PALETTE[colours[k]])
    relation = "left of" if horizontal else "above"
    return Sample(questions.CAPTION, f"{names[0]} {relation} {names[1]}", ARRANGEMENT[relation], image=im)


def make_count(split: str, n: int, task_seed: tuple[int, int], image_size: int,
               exclude: set[str]) -> list[Sample]:
    """Dot-counting records (number format); answer "1".."4" (uniform)."""
    return unique_samples(lambda rng: _dot_scene(rng, image_size), n, split_rng(task_seed, split),
                          exclude)


def make_caption(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                 exclude: set[str]) -> list[Sample]:
    """Scene-description records; the answer is a short free-text caption (scorer ``caption``)."""
    return unique_samples(lambda rng: _shape_scene(rng, image_size), n, split_rng(task_seed, split),
                          exclude)
