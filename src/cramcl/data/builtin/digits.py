"""The ``digits`` task (number format): scikit-learn's 1,797 handwritten 8x8 digits, upscaled, grey ink
on black.

The digits are split once per seed into a fixed test pool (the first 20% of a seeded permutation) and
a train pool (the rest), so train and test never share a digit image whatever n_train and n_test are;
test takes a prefix of its pool, so it does not change when n_train does. Pretraining captions draw on
the train pool only.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from cramcl.data.builtin import questions
from cramcl.data.builtin._common import Sample, choose, pixel_hash, split_rng

QUESTION = questions.NUMBER
CAPTION = "a handwritten {}"  # the base knows the concept; the task teaches the answer format
TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images as uint8 (N, 8, 8) with ink 0..255, labels (N,)); ships inside scikit-learn."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    return images, data.target


def pools(seed: int) -> tuple[list[int], list[int]]:
    """(test pool, train pool) of digit indices for a stream seed, shared by every task drawing on the
    digits (``digits``, ``digit-corner``), so no task trains on a digit another task tests on."""
    images, _ = _digits()
    perm = np.random.default_rng([seed, 99]).permutation(len(images)).tolist()
    n_test = int(len(perm) * TEST_FRACTION)
    return perm[:n_test], perm[n_test:]


def glyph(index: int) -> Image.Image:
    """The 8x8 grey digit image number ``index`` ("L" mode, ink bright on black)."""
    return Image.fromarray(_digits()[0][index], mode="L")


def _render(index: int, image_size: int) -> Image.Image:
    # Bilinear upscaling: smooth strokes rather than 8x8 blocks; RGB like every other task's images.
    return glyph(index).resize((image_size, image_size), Image.Resampling.BILINEAR).convert("RGB")


def label_of(index: int) -> int:
    return int(_digits()[1][index])


def make_digits(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                exclude: set[str]) -> list[Sample]:
    """``n`` digit records (capped by the pool: 359 test, 1,438 train); answer "0".."9"."""
    test_pool, train_pool = pools(task_seed[0])
    if split == "test":
        picked = test_pool[:n]
    elif split == "train":
        picked = train_pool[:n]
    else:
        picked = choose(split_rng(task_seed, split), train_pool, n)
    samples = [Sample(QUESTION, str(label_of(i)), CAPTION.format(label_of(i)), image=_render(i, image_size))
               for i in picked]
    # Distinct 8x8 digits stay distinct when upscaled, but check: a test image must never be trained on.
    return [s for s in samples if pixel_hash(s.image) not in exclude]
