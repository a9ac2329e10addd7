"""The multiple-choice study tasks: options shuffled per record, the letter names the right one."""
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


def test_mc_digit_has_four_distinct_digits_and_the_true_one():
    samples = choice.make_mc_digit("test", 80, (0, 10), 64, set())
    for s in samples:
        opts = _options(s.question)
        assert len(opts) == 4 and len(set(opts.values())) == 4
        assert opts[s.answer] == s.caption.split()[-1]  # caption "a handwritten 7"
    assert {s.answer for s in samples} == {"A", "B", "C", "D"}


def test_mc_colour_options_are_palette_colours_with_the_blobs_own():
    samples = choice.make_mc_colour("test", 80, (0, 11), 64, set())
    for s in samples:
        opts = _options(s.question)
        assert len(opts) == 4 and set(opts.values()) <= set(PALETTE)
        assert opts[s.answer] == s.caption.split()[1]  # caption "a red blob"
    assert {s.answer for s in samples} == {"A", "B", "C", "D"}


def test_mc_corner_options_are_the_four_corners_and_the_letter_names_the_shapes_corner():
    from cramcl.data.builtin import questions

    samples = choice.make_mc_corner("test", 80, (0, 12), 64, set())
    orders = set()
    for s in samples:
        opts = _options(s.question)
        assert sorted(opts.values()) == sorted(questions.CORNERS)
        assert s.caption.endswith(f" {opts[s.answer]} corner")  # caption "a small red square in the top-left corner"
        orders.add(tuple(opts.values()))
    assert len(orders) > 12
    assert {s.answer for s in samples} == {"A", "B", "C", "D"}


def test_three_option_variants_keep_the_true_answer_among_three_distinct_options():
    from cramcl.data.builtin import questions

    colour = choice.make_mc_colour3("test", 80, (0, 13), 64, set())
    corner = choice.make_mc_corner3("test", 80, (0, 14), 64, set())
    for samples, pool, truth in ((colour, set(PALETTE), lambda s: s.caption.split()[1]),
                                 (corner, set(questions.CORNERS), lambda s: s.caption.split()[-2])):
        for s in samples:
            opts = _options(s.question)
            assert len(opts) == 3 and len(set(opts.values())) == 3 and set(opts.values()) <= pool
            assert opts[s.answer] == truth(s)
        assert {s.answer for s in samples} == {"A", "B", "C"}


def test_fixed_order_corner_choice_keeps_one_option_order_and_names_the_shapes_corner():
    from cramcl.data.builtin import questions

    samples = choice.make_mc_corner_fixed("test", 80, (0, 16), 64, set())
    assert len({s.question for s in samples}) == 1
    for s in samples:
        assert list(_options(s.question).values()) == list(questions.CORNERS)
        assert s.caption.endswith(f" {_options(s.question)[s.answer]} corner")
    assert {s.answer for s in samples} == {"A", "B", "C", "D"}


def test_instruction_samples_reuse_images_and_answer_correctly():
    base = choice.make_mc_shape("pretrain", 20, (0, 9), 64, set())
    out = choice.instruction_samples(base, seed=0)
    assert all(s.image is not None for s in out)
    mc = [s for s in out if s.question.startswith(choice.CAPTION_STEM)]
    assert len(mc) == 20
    for s in mc:
        listed = s.question.split(" Options: ", 1)[1]
        assert f"{s.answer} {s.caption}" in listed


def test_mc_heavy_records_draw_distractors_from_the_same_domain_and_skip_spatial_questions():
    from cramcl.data.builtin import corner

    base = (choice.make_mc_shape("pretrain", 20, (0, 9), 64, set())
            + corner.make_corner("pretrain", 20, (0, 2), 64, set()))
    out = choice.instruction_samples(base, seed=0, mc_heavy=True)
    mc = [s for s in out if s.question.startswith(choice.CAPTION_STEM)]
    assert len(mc) == 2 * len(base)
    for s in mc:
        opts = _caption_options(s.question)
        assert opts[s.answer] == s.caption
        assert {choice.caption_domain(c) for c in opts.values()} == {choice.caption_domain(s.caption)}
    assert not any("left or on the right" in s.question or "top or at the bottom" in s.question for s in out)
    plain = choice.instruction_samples(base, seed=0)
    assert any("left or on the right" in s.question or "top or at the bottom" in s.question for s in plain)


def _caption_options(question: str) -> dict[str, str]:
    """Letter -> caption of a caption multiple choice (captions hold spaces; letters are single capitals)."""
    listed = question.split(" Options: ", 1)[1].rsplit(" " + choice.TAIL, 1)[0]
    parts = re.split(r"(?:^| )([A-E]) ", listed)[1:]
    return dict(zip(parts[::2], parts[1::2]))
