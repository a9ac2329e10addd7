"""Shared pieces of the built-in task generators: the sample type, seeding, colours, uniqueness."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

# Each split draws from its own random stream, so the test set does not change when n_train does.
SPLIT_CODES = {"test": 0, "train": 1, "pretrain": 2}

# Named colours for generated scenes: far apart in RGB so a small vision tower tells them apart.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(PALETTE)  # the palette's names in a fixed order, for seeded draws

BACKGROUND = (240, 240, 240)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float,
               colour: tuple[int, int, int]) -> None:
    """Fill a circle, square or upward triangle of side/diameter ``size`` centred at (cx, cy)."""
    h = size / 2
    if shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=colour)
    else:  # an upward triangle
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=colour)


@dataclass
class Sample:
    """One generated (or copied) image with its task question/answer and a generic caption.

    Exactly one of ``image`` (pixels to save as PNG) and ``source`` (a file to copy verbatim) is set.
    ``key`` names the image file; samples sharing a ``source`` share one copied file.
    """

    question: str
    answer: str
    caption: str
    image: Image.Image | None = None
    source: Path | None = None
    key: str = ""


def split_rng(task_seed: tuple[int, int], split: str) -> np.random.Generator:
    """The random stream of one split of one task: seeded by (seed, task index, split)."""
    return np.random.default_rng([*task_seed, SPLIT_CODES[split]])


def pixel_hash(image: Image.Image) -> str:
    """Hash of the decoded pixels (PNG encoding is deterministic, so equal pixels = equal files)."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def unique_samples(
    make_one: Callable[[np.random.Generator], Sample],
    n: int,
    rng: np.random.Generator,
    exclude: set[str],
) -> list[Sample]:
    """Draw ``n`` samples whose images are pairwise distinct and not in ``exclude`` (test hashes).

    This is what guarantees that no test image reappears in its task's train split.
    """
    seen = set(exclude)
    out: list[Sample] = []
    misses = 0
    while len(out) < n:
        sample = make_one(rng)
        digest = pixel_hash(sample.image)
        if digest in seen:
            misses += 1
            if misses > 1000 + 10 * n:  # the generator's space is too small for n distinct images
                raise RuntimeError(f"could only draw {len(out)} distinct images of the {n} asked")
            continue
        seen.add(digest)
        out.append(sample)
    return out


def choose(rng: np.random.Generator, pool: list, n: int) -> list:
    """``n`` items of ``pool`` without replacement (all of it, shuffled, when it is smaller)."""
    idx = rng.permutation(len(pool))[: min(n, len(pool))]
    return [pool[i] for i in idx]
