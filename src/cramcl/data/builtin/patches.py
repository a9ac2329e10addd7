"""Colour-patch domains: ``colour`` (name format: the colour of an irregular blob on grey noise) and
``stripes`` (caption format: two colours in horizontal or vertical stripes).

Images come from a seeded numpy stream per split; ``unique_samples`` keeps test images out of train.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cramcl.data.builtin import questions
from cramcl.data.builtin._common import COLOUR_NAMES, PALETTE, Sample, split_rng, unique_samples


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int = 20) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _noise(rng: np.random.Generator, image_size: int, low: int, high: int) -> Image.Image:
    """Grey per-pixel noise in [low, high): (image_size, image_size) RGB."""
    grey = rng.integers(low, high, size=(image_size, image_size), dtype=np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")


def _blob(rng: np.random.Generator, image_size: int, names: tuple[str, ...] = COLOUR_NAMES) -> Sample:
    """An irregular 7-gon of one of ``names``' palette colours (jittered) on grey noise; answer: the colour's
    name."""
    name = names[int(rng.integers(len(names)))]
    s = float(image_size)
    im = _noise(rng, image_size, 140, 230)
    cx, cy = (float(v) for v in rng.uniform(0.35 * s, 0.65 * s, size=2))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=7))
    radii = rng.uniform(0.18 * s, 0.32 * s, size=7)
    points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]
    ImageDraw.Draw(im).polygon(points, fill=_jitter(rng, PALETTE[name]))
    return Sample(questions.NAME, name, f"a {name} blob", image=im)


def _stripes(rng: np.random.Generator, image_size: int) -> Sample:
    """2-6 stripes alternating two distinct palette colours; caption "red and blue vertical stripes"
    (the first colour is the top / left stripe's)."""
    first, second = (COLOUR_NAMES[int(i)] for i in rng.choice(len(COLOUR_NAMES), size=2, replace=False))
    vertical = bool(rng.random() < 0.5)
    n = int(rng.integers(2, 7))
    cuts = np.sort(rng.uniform(0.1, 0.9, size=n - 1)) * image_size
    edges = [0.0, *cuts.tolist(), float(image_size)]
    im = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(im)
    for k in range(n):
        colour = _jitter(rng, PALETTE[first if k % 2 == 0 else second], 10)
        a, b = edges[k], edges[k + 1]
        box = (a, 0, b, image_size) if vertical else (0, a, image_size, b)
        draw.rectangle(box, fill=colour)
    orientation = "vertical" if vertical else "horizontal"
    return Sample(questions.CAPTION, f"{first} and {second} {orientation} stripes", "some stripes", image=im)


def make_colour(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                exclude: set[str], names: tuple[str, ...] = COLOUR_NAMES) -> list[Sample]:
    """Colour-naming records; answer one of ``names`` (default: the six palette names)."""
    return unique_samples(lambda rng: _blob(rng, image_size, names), n, split_rng(task_seed, split), exclude)


def make_stripes(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                 exclude: set[str]) -> list[Sample]:
    """Stripe-caption records (scorer ``caption``)."""
    return unique_samples(lambda rng: _stripes(rng, image_size), n, split_rng(task_seed, split), exclude)
