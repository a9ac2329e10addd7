"""The ``shape`` task (name format) over easy-VQA images (one coloured shape on a white 64x64 canvas;
MIT-licensed wheel), and the easy-VQA part of the base stage's captions.

Train records use easy-VQA's train images and test records its test images; the two sets share no
image (checked by hash in tests), so no test image leaks into training. Images are copied verbatim.
An image's shape and colour are read off easy-VQA's own questions about it.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import easy_vqa

from cramcl.data.builtin import questions
from cramcl.data.builtin._common import Sample, choose, split_rng

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
_WORD = re.compile(r"\b(" + "|".join(SHAPES + COLOURS) + r")\b")
_NEGATED = re.compile(r"\b(not|no)\b")


@functools.lru_cache(maxsize=2)
def _split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, Path], dict[int, dict[str, str]]]:
    """(questions, image paths, known attributes per image id) of easy-VQA's test split, or else train.

    Attributes come from every question about an image: wh-answers name the shape or colour directly,
    and a yes/no answer that asserts presence names the word the question mentions.
    """
    if split == "test":
        texts, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        texts, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    attrs: dict[int, dict[str, str]] = {}
    for text, answer, image_id in zip(texts, answers, ids):
        found = attrs.setdefault(image_id, {})
        if answer in SHAPES:
            found["shape"] = answer
        elif answer in COLOURS:
            found["colour"] = answer
        elif answer in ("yes", "no"):
            word = _WORD.search(text)
            present = (answer == "yes") != bool(_NEGATED.search(text))
            if word and present:
                found["shape" if word.group(1) in SHAPES else "colour"] = word.group(1)
    questions = list(zip(texts, answers, ids))
    return questions, {k: Path(v) for k, v in paths.items()}, attrs


def _attribute_task(split: str, n: int, task_seed: tuple[int, int], attr: str, question: str
                    ) -> list[Sample]:
    _, paths, attrs = _split(split)
    pool = sorted(i for i, a in attrs.items() if attr in a and i in paths)
    picked = choose(split_rng(task_seed, split), pool, n)
    return [Sample(question, attrs[i][attr], _caption(attrs[i]), source=paths[i], key=str(i))
            for i in picked]


def _caption(attrs: dict[str, str]) -> str:
    return f"a {attrs.get('colour', '')} {attrs.get('shape', 'shape')}".replace("  ", " ")


def make_shape(split: str, n: int, task_seed: tuple[int, int], image_size: int,
               exclude: set[str]) -> list[Sample]:
    """Name-format records whose answer is the shape: circle / rectangle / triangle (64 px images)."""
    return _attribute_task(split, n, task_seed, "shape", questions.NAME)


def make_pretrain(n: int, task_seed: tuple[int, int]) -> list[Sample]:
    """Train images captioned "a <colour> <shape>" (only images whose both attributes are known)."""
    _, paths, attrs = _split("train")
    pool = sorted(i for i, a in attrs.items() if "shape" in a and "colour" in a and i in paths)
    picked = choose(split_rng(task_seed, "pretrain"), pool, n)
    return [Sample("", "", _caption(attrs[i]), source=paths[i], key=f"easyvqa{i}") for i in picked]
