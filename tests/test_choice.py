"""The built-in stream's multiple-choice tasks: the letter names the right option."""
from __future__ import annotations

import re

from cramcl.data.builtin import choice, scenes
from cramcl.data.builtin._common import PALETTE

_OPTION = re.compile(r"\b([A-E]) (\S+)")


def _options(question: str) -> dict[str, str]:
    listed = question.split(" Options: ", 1)[1].rsplit(" " + choice.TAIL, 1)[0]
    return dict(_OPTION.findall(listed))


def test_mc_shape_letters_name_the_drawn_shape_and_vary():
    samples = choice.make_mc_shape("test", 60, (0, 9), 64, set())
    orders = set()
    for s in samples:
        opts = _options(s.question)
        assert sorted(opts.values()) == sorted(scenes.SHAPES)
        assert opts[s.answer] == s.caption.split()[-1]  # caption "a red circle"
        orders.add(tuple(opts.values()))
    assert len(orders) == 6  # every permutation of the three shapes occurs
    assert {s.answer for s in samples} == {"A", "B", "C"}


def test_fixed_order_corner_choice_keeps_one_option_order_and_names_the_shapes_corner():
    from cramcl.data.builtin import questions

    samples = choice.make_mc_corner_fixed("test", 80, (0, 16), 64, set())
    assert len({s.question for s in samples}) == 1
    for s in samples:
        assert list(_options(s.question).values()) == list(questions.CORNERS)
        assert s.caption.endswith(f" {_options(s.question)[s.answer]} corner")
    assert {s.answer for s in samples} == {"A", "B", "C", "D"}
