"""The related-skills built-in stream (``data.builtin_stream: related``): its tasks, the overlaps it promises
(the same images, a subset of the answers, the same skill on other images, a control sharing nothing), its
MiniLM groups, and that a run selects it by name."""
from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from PIL import Image

from cramcl.data.benchmark import load_benchmark
from cramcl.data.builtin import BUILTIN_STREAMS, RELATED_TASK_INFO, generate_builtin, questions, related
from cramcl.errors import BadInputError

ORDER = ["digits", "colour", "corner", "colour-three", "corner-where", "shape-colour", "count"]
FORMATS = {"digits": "number", "count": "number", "colour": "name", "colour-three": "name", "shape-colour": "name",
           "corner": "corner", "corner-where": "corner"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return load_benchmark(generate_builtin(tmp_path_factory.mktemp("related") / "b", stream="related", n_train=60,
                                           n_test=30))


def _task(bench, name):
    return next(t for t in bench.tasks if t.name == name)


def _pixels(record) -> str:
    return hashlib.sha256(Image.open(record.image).convert("RGB").tobytes()).hexdigest()


def test_seven_tasks_in_order_without_a_corpus(bench):
    assert bench.task_names() == ORDER
    assert bench.pretrain_file is None  # the shipped base sees its domains; none of its own
    assert [t.format for t in RELATED_TASK_INFO] == [FORMATS[n] for n in ORDER]


def test_corner_where_asks_about_corners_very_images_in_other_words(bench):
    corner, where = _task(bench, "corner"), _task(bench, "corner-where")
    for split in ("train", "test"):
        a, b = getattr(corner, split), getattr(where, split)
        assert [_pixels(r) for r in a] == [_pixels(r) for r in b]
        assert [r.answer for r in a] == [r.answer for r in b]
    assert {r.question for r in where.test} == {related.CORNER_REPHRASED} != {r.question for r in corner.test}


def test_colour_three_answers_a_subset_of_colours_on_the_same_kind_of_image(bench):
    colour, three = _task(bench, "colour"), _task(bench, "colour-three")
    assert set(Counter(r.answer for r in three.train)) == set(related.THREE_COLOURS)
    assert set(related.THREE_COLOURS) < {r.answer for r in colour.train}
    assert {r.question for r in three.test} == {r.question for r in colour.test}
    assert not {_pixels(r) for r in three.test} & {_pixels(r) for r in colour.train}


def test_shape_colour_shares_colours_answers_not_its_images(bench):
    colour, shapes = _task(bench, "colour"), _task(bench, "shape-colour")
    assert {r.answer for r in shapes.train} == {r.answer for r in colour.train}
    # a light canvas (the corner format's) instead of grey noise: the corner pixel is the canvas colour
    assert all(Image.open(r.image).convert("RGB").getpixel((0, 0)) == (240, 240, 240) for r in shapes.test)


def test_the_control_shares_neither_answers_nor_images_with_digits(bench):
    digits, count = _task(bench, "digits"), _task(bench, "count")
    assert {r.answer for r in count.train} == {"1", "2", "3", "4"}
    assert {r.question for r in count.test} == {r.question for r in digits.test} == {questions.NUMBER}
    assert not {_pixels(r) for r in count.train} & {_pixels(r) for r in digits.train}


def test_no_test_image_in_its_tasks_train_split(bench):
    for task in bench.tasks:
        assert not {_pixels(r) for r in task.test} & {_pixels(r) for r in task.train}, task.name


def test_minilm_groups_the_stream_by_format():
    """With the default profile's level-1 settings: three groups, the rephrased corner question joins corner's."""
    from cramcl.config import resolve_config
    from cramcl.encoders import TextEncoder
    from cramcl.methods.cram import CramConfig
    from cramcl.methods.cram.groups import InstructionGroups

    method = CramConfig(**resolve_config(method="cram", profile="default").method_args)
    groups = InstructionGroups(method.join_threshold, method.theta, method.max_groups)
    encoder = TextEncoder("minilm")
    group_of = {}
    for task in RELATED_TASK_INFO:
        t = encoder.encode([task.make("test", 1, (0, 0), 64, set())[0].question])[0]
        group_of[task.name], _ = groups.decide(t)
        groups.update(group_of[task.name], t[None])
    for a in ORDER:
        for b in ORDER:
            assert (group_of[a] == group_of[b]) == (FORMATS[a] == FORMATS[b]), (a, b, group_of)


def test_a_run_selects_the_stream_by_name_and_refuses_an_unknown_one(tmp_path, monkeypatch):
    from cramcl.config import resolve_config
    from cramcl.data.stream import load_stream

    monkeypatch.setenv("CRAMCL_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config(method="mtl", profile="quick", overrides=["data.builtin_stream=related",
                                                                  "data.builtin_n_train=8", "data.builtin_n_test=4"])
    assert load_stream(cfg.data).task_names() == ORDER
    with pytest.raises(BadInputError, match="data.builtin_stream: 'nearby' is not one of main, related"):
        resolve_config(method="mtl", profile="quick", overrides=["data.builtin_stream=nearby"])
    assert set(BUILTIN_STREAMS) == {"main", "related"}
