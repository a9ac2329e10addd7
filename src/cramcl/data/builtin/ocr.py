"""The ``ocr`` task: a printed digit (0-9) at a random place in random contrasting colours.

One digit, not two: the tiny embedded model sees an image as 3x3 EfficientNet tokens, which do not resolve
two small glyphs (its base stage could not read 10-99). The answers are the same as the handwritten
``digits`` task's, in another visual domain: the case CRAM's level-2 routing exists for.

Text is drawn with Pillow's built-in font (``ImageFont.load_default(size=N)``), so nothing is downloaded.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cramcl.data.builtin import questions
from cramcl.data.builtin._common import Sample, split_rng, unique_samples

QUESTION = questions.NUMBER
CAPTION = "a printed number {}"  # the base reads; the task teaches the answer format


@functools.lru_cache(maxsize=4)
def _font(image_size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # About 60% of the image height: one glyph fills a good part of the 3x3 feature grid.
    return ImageFont.load_default(size=max(8, round(image_size * 0.6)))


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(background, ink): one light and one dark, at random, so the ink always stands out."""
    light = tuple(int(v) for v in rng.integers(170, 256, size=3))
    dark = tuple(int(v) for v in rng.integers(0, 90, size=3))
    return (light, dark) if rng.random() < 0.5 else (dark, light)


def _number_image(rng: np.random.Generator, image_size: int) -> Sample:
    number = str(int(rng.integers(0, 10)))
    background, ink = _colours(rng)
    im = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(im)
    font = _font(image_size)
    left, top, right, bottom = draw.textbbox((0, 0), number, font=font)
    # Random offset that keeps the whole text box (plus a 1 px margin) inside the image.
    x = int(rng.integers(1 - left, max(2 - left, image_size - right - 1)))
    y = int(rng.integers(1 - top, max(2 - top, image_size - bottom - 1)))
    draw.text((x, y), number, font=font, fill=ink)
    return Sample(QUESTION, number, CAPTION.format(number), image=im)


def make_ocr(split: str, n: int, task_seed: tuple[int, int], image_size: int,
             exclude: set[str]) -> list[Sample]:
    """Printed-digit records; the answer is the digit ("0".."9")."""
    return unique_samples(lambda rng: _number_image(rng, image_size), n, split_rng(task_seed, split),
                          exclude)
