"""The related-skills built-in stream (``data.builtin_stream: related``): seven tasks in three instruction
formats where each later task overlaps an earlier one of its format in a known, graded way (the same images,
a subset of the answers, the same skill on other images), and one task overlaps nothing. It is the stream on
which CRAM's second promise can show: a new expert sized by what the task adds to the group's earlier experts,
and earlier experts reused through routing (docs/cram.md, "The related-skills stream").

============  =======  =============================================  ==========================================
task          format   what it is                                     what an ideal method reuses
============  =======  =============================================  ==========================================
digits        number   handwritten digits, grey ink on black          (first of its format)
colour        name     the colour of a blob on grey noise, six        (first of its format)
                       colours
corner        corner   the corner a small shape sits in               (first of its format)
colour-three  name     a subset of ``colour``'s answer space: blobs   all of ``colour``'s expert: it already
                       of the same kind in three of its six colours   answers every record
corner-where  corner   ``corner``'s very images (same seed) under a   all of ``corner``'s expert but the new
                       rephrased instruction                          wording
shape-colour  name     ``colour``'s skill and answers on another      the colour-reading part of ``colour``'s
                       domain: the colour of a drawn shape on a       expert, not its domain
                       light canvas
count         number   the control: 1-4 dots, sharing neither images  nothing
                       nor answers with ``digits``
============  =======  =============================================  ==========================================

The formats' questions are the main stream's (:mod:`.questions`) except ``corner-where``'s, which words the
corner question anew within the shipped base's vocabulary. The stream has no base corpus of its own: its
images are the main stream's domains (``shape-colour``'s shapes are the corner format's, drawn larger), which the
shipped base (``backbone.base_path: builtin``) was trained to see, and a base trained from scratch uses the main
stream's corpus.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cramcl.data.builtin import corner, patches, questions
from cramcl.data.builtin._common import (BACKGROUND, COLOUR_NAMES, PALETTE, Sample, draw_shape, split_rng,
                                         unique_samples)
from cramcl.data.builtin.scenes import SHAPES

#: The rephrased corner question: other words, the same answers (every word is in the shipped base's vocabulary).
CORNER_REPHRASED = "Which corner is it in?"
#: ``colour-three``'s answer space: three of ``colour``'s six names.
THREE_COLOURS = ("red", "green", "blue")
def _coloured_shape(rng: np.random.Generator, image_size: int) -> Sample:
    """A palette shape (circle, square or triangle) of a third to half the image's side, somewhere on the light
    canvas of the corner format's images; answer its colour's name."""
    name = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    size = image_size * float(rng.uniform(0.33, 0.5))
    cx, cy = (float(v) for v in rng.uniform(size / 2 + 1, image_size - size / 2 - 1, size=2))
    im = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw_shape(ImageDraw.Draw(im), shape, cx, cy, size, PALETTE[name])
    return Sample(questions.NAME, name, f"a {name} {shape}", image=im)


def make_shape_colour(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                      exclude: set[str]) -> list[Sample]:
    """The colour of a drawn shape: ``colour``'s skill and answers on another domain."""
    return unique_samples(lambda rng: _coloured_shape(rng, image_size), n, split_rng(task_seed, split), exclude)


def make_colour_three(split: str, n: int, task_seed: tuple[int, int], image_size: int,
                      exclude: set[str]) -> list[Sample]:
    """``colour``'s blobs in :data:`THREE_COLOURS` only."""
    return patches.make_colour(split, n, task_seed, image_size, exclude, names=THREE_COLOURS)


def corner_where(corner_index: int):
    """``corner_index``'s ``corner`` images (its seed, so the very same images) under :data:`CORNER_REPHRASED`."""
    def make(split: str, n: int, task_seed: tuple[int, int], image_size: int, exclude: set[str]) -> list[Sample]:
        samples = corner.make_corner(split, n, (task_seed[0], corner_index), image_size, exclude)
        return [Sample(CORNER_REPHRASED, s.answer, s.caption, image=s.image) for s in samples]
    return make
