"""Scorers: hand-computed cases (the arithmetic is in the comments)."""
import math

import pytest

from cramcl.errors import BadInputError
from cramcl.eval import caption_metrics as cm
from cramcl.eval.scorers import (SCORER_NAMES, SCORERS, anls, bbox_iou, box_iou, caption,
                                 caption_metrics, exact, get_scorer, levenshtein, normalize_answer,
                                 number, parse_number, score_task)


# ---------------------------------------------------------------- exact
def test_normalize_answer():
    assert normalize_answer("  The Cat! ") == "cat"
    assert normalize_answer("An apple,  3.5 kg.") == "apple 3.5 kg"  # decimal point kept, final '.' dropped
    assert normalize_answer("Black-and-White") == "black and white"  # hyphen separates words
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    # an answer made only of articles is kept (it was erased to "" before, which made the option
    # letter "A" unscorable); see test_exact_never_erases_an_answer
    assert normalize_answer("The.") == "the"


def test_exact_punctuation_articles_case_and_lists():
    preds = ["The Dog.", "a red car", "yes", "blue", "green"]
    refs = ["dog", "Red car!", "no", ["red", "BLUE"], ["red", "blue"]]
    # 100, 100, 0, 100 (second ref), 0  -> mean 300 / 5 = 60
    task, per = exact(preds, refs)
    assert per == [100.0, 100.0, 0.0, 100.0, 0.0]
    assert task == 60.0


def test_exact_empty_prediction_never_correct():
    # "" and "the ." both normalise to "" -- equal to the empty reference, yet scored 0
    task, per = exact(["", "the .", "   "], ["", "", ["", "a"]])
    assert per == [0.0, 0.0, 0.0] and task == 0.0


# ---------------------------------------------------------------- number
def test_parse_number():
    assert parse_number("12 apples") == 12.0
    assert parse_number("there are twelve") == 12.0
    assert parse_number("Twenty") == 20.0
    assert parse_number("-3.25 degrees") == -3.25
    assert parse_number("1,234.5") == 1234.5
    assert parse_number("3 or 4") == 3.0  # the first number
    assert parse_number("someone") is None  # 'one' only as a whole word
    assert parse_number("no number") is None


def test_number_scorer():
    preds = ["12 apples", "twelve", "3.50", "3.6", "-2", "2", "None.", "", "1000000"]
    refs = ["12", "12", "3.5", "3.5", "-2", "-2", "none", "0", "1000000.5"]
    # 12==12; twelve==12; 3.50==3.5; 3.6!=3.5; -2==-2; 2!=-2; non-numeric ref -> exact match;
    # empty pred -> 0; |1e6 - 1000000.5| / 1000000.5 = 5e-7 <= 1e-6 -> equal
    task, per = number(preds, refs)
    assert per == [100.0, 100.0, 100.0, 0.0, 100.0, 0.0, 100.0, 0.0, 100.0]
    assert task == pytest.approx(600 / 9)
    # 1e6 vs 1000002: relative difference 2e-6 > 1e-6 -> wrong; a list of refs takes the best
    assert number(["1000000", "7"], ["1000002", ["six", "seven"]])[1] == [0.0, 100.0]


# ---------------------------------------------------------------- anls
def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls_threshold_edges():
    # "abcdef" vs "abcxyz": 3 edits / 6 = 0.5, not < 0.5 -> 0
    # "abcdefg" vs "abcdxyz": 3 / 7 = 0.428571 < 0.5 -> 1 - 3/7 = 0.571429 -> 57.1429
    # "Hello World" vs "hello  world": equal after lower / whitespace collapse -> 100
    # "" vs "" -> an empty prediction scores 0
    task, per = anls(["abcdef", "abcdefg", "Hello World", ""], ["abcxyz", "abcdxyz", "hello  world", ""])
    assert per[0] == 0.0
    assert per[1] == pytest.approx(100 * 4 / 7)
    assert per[2] == 100.0 and per[3] == 0.0
    assert task == pytest.approx((400 / 7 + 100) / 4)


def test_anls_best_over_references():
    # "cat" vs "cats": 1/4 = 0.25 -> 75; vs "dog": 3/3 -> 0; best 75
    assert anls(["cat"], [["dog", "cats"]])[1] == [75.0]


# ---------------------------------------------------------------- caption
CAPS = ["a red bus on the street", "two dogs play in grass", "a man rides a horse"]


def test_tokenize():
    assert cm.tokenize("A dog, running!  Fast.") == ["a", "dog", "running", "fast"]


def test_identical_captions_score_full():
    m = caption_metrics(CAPS, CAPS)
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert m[k] == pytest.approx(100.0)
    # every record's tf-idf vector equals its reference's: cosine 1 per order, no length penalty
    # -> 10 per record (x10 in CIDEr-D) -> x100 = 1000
    assert m["CIDEr"] == pytest.approx(1000.0)
    # METEOR: one chunk, penalty 0.5 * (1/m)^3 with m = 6, 5, 5 tokens
    expected = (1 - 0.5 / 216 + 2 * (1 - 0.5 / 125)) / 3
    assert m["METEOR"] == pytest.approx(100 * expected)
    task, per = caption(CAPS, CAPS)
    # the task score keeps the contract's 0-100 scale: CIDEr enters the mean x10, not x100
    assert task == pytest.approx((sum(m.values()) - m["CIDEr"] + m["CIDEr"] / 10) / 7)
    assert task <= 100.0
    assert per == pytest.approx([100.0, 100.0, 100.0])


def test_bleu_hand_case_with_brevity_penalty():
    # hyp "the cat the mat" (4 tokens), ref "the cat sat on the mat" (6 tokens)
    # unigrams: the x2 (ref has 2), cat, mat -> 4/4; bigrams: "the cat" ok, "cat the" no, "the mat" ok -> 2/3
    # BP = exp(1 - 6/4) = exp(-0.5); BLEU-1 = BP; BLEU-2 = BP * sqrt(1 * 2/3); trigrams: none match -> 0
    m = caption_metrics(["the cat the mat"], ["the cat sat on the mat"])
    bp = math.exp(-0.5)
    assert m["BLEU-1"] == pytest.approx(100 * bp)  # 60.65
    assert m["BLEU-2"] == pytest.approx(100 * bp * math.sqrt(2 / 3))  # 49.52
    assert m["BLEU-3"] == 0.0 and m["BLEU-4"] == 0.0
    # a one-record corpus: every idf is log(1) - log(1) = 0 -> CIDEr-D 0
    assert m["CIDEr"] == 0.0


def test_bleu_closest_reference_length():
    # refs of length 2 and 5 for a 4-token hyp: closest is 5 (|4-5| = 1 < |4-2| = 2) -> BP = exp(1 - 5/4)
    hyp, refs = cm.tokenize("a b c d"), [cm.tokenize("a b"), cm.tokenize("a b c d e")]
    b1 = cm.corpus_bleu([hyp], [refs], max_n=1)[0]
    assert b1 == pytest.approx(math.exp(1 - 5 / 4))


def test_rouge_l_hand_case():
    # hyp "the cat sat down" (4), ref "the dog sat down here" (5): LCS = the sat down = 3
    # P = 3/4, R = 3/5; F = (1 + 1.44) P R / (R + 1.44 P) = 2.44 * 0.45 / (0.6 + 1.08) = 1.098 / 1.68
    r = cm.rouge_l(cm.tokenize("the cat sat down"), [cm.tokenize("the dog sat down here")])
    assert r == pytest.approx(1.098 / 1.68)  # 0.653571
    assert cm.lcs_length(list("abcbdab"), list("bdcaba")) == 4


def test_meteor_hand_cases():
    t = cm.tokenize
    # same words, 3 chunks: P = R = 1 -> F = 1; penalty 0.5 * (3/3)^3 = 0.5 -> 0.5
    assert cm.meteor_single(t("cat the sat"), t("the cat sat")) == pytest.approx(0.5)
    # m = 2, P = 1, R = 0.5: F = 0.5 / (0.9 * 1 + 0.1 * 0.5) = 0.526316; 1 chunk: penalty 0.5 / 8
    assert cm.meteor_single(t("the cat"), t("the cat sat down")) == pytest.approx(0.5 / 0.95 * (1 - 0.0625))
    # "the cat the mat" vs "the cat sat on the mat": m = 4, P = 1, R = 4/6, 2 chunks ("the cat", "the mat")
    # F = (2/3) / (0.9 + 0.1 * 2/3) = 0.689655; penalty 0.5 * (2/4)^3 = 0.0625 -> 0.646552
    f = (2 / 3) / (0.9 + 0.2 / 3)
    assert cm.meteor(t("the cat the mat"), [t("xyz"), t("the cat sat on the mat")]) == pytest.approx(f * 0.9375)
    assert cm.meteor_single(t("dog"), t("cat")) == 0.0


def test_cider_right_caption_beats_wrong_one():
    right = caption_metrics(CAPS, CAPS)["CIDEr"]
    wrong_preds = ["a green tree in a park", CAPS[1], CAPS[2]]
    wrong = caption_metrics(wrong_preds, CAPS)["CIDEr"]
    assert right > wrong
    per_right = cm.cider_d([cm.tokenize(c) for c in CAPS], [[cm.tokenize(c)] for c in CAPS])
    per_wrong = cm.cider_d([cm.tokenize(c) for c in wrong_preds], [[cm.tokenize(c)] for c in CAPS])
    assert per_right[0] == pytest.approx(10.0)
    assert 0.0 <= per_wrong[0] < 1.0  # only "a" (unigram) is shared
    assert per_wrong[1:] == pytest.approx(per_right[1:])


def test_cider_length_penalty():
    # same tf-idf vectors (cosine 1 for every order), lengths 5 vs 8: gaussian exp(-(3^2) / (2 * 6^2))
    hyp = cm.tokenize("a red bus on the street")
    vec = cm._tfidf(hyp, cm._document_frequency([[hyp], [["x"]]]), math.log(2))
    assert cm._cider_pair(vec, vec, 5, 8) == pytest.approx(math.exp(-9 / 72))
    assert cm._cider_pair(vec, vec, 6, 6) == pytest.approx(1.0)


def test_caption_empty_prediction():
    task, per = caption(["", CAPS[1], CAPS[2]], CAPS)
    assert per[0] == 0.0 and per[1] == pytest.approx(100.0)


# ---------------------------------------------------------------- bbox_iou
def test_box_iou_and_scorer():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 20)) == pytest.approx(0.5)  # 100 / 200
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    preds = ["[0, 0, 10, 10]", "[0, 0, 10, 10]", "no box here", "[0.5, 0.5, 1.0, 1.0]"]
    refs = ["[0, 0, 10, 20]", "[5, 0, 15, 10]", "[0, 0, 1, 1]", ["[0, 0, 0.2, 0.2]", "[0.5, 0.5, 1, 1]"]]
    # IoU 0.5 (>= 0.5) -> 100; 1/3 -> 0; unparsable -> 0; best ref IoU 1 -> 100
    task, per = bbox_iou(preds, refs)
    assert per == [100.0, 0.0, 0.0, 100.0] and task == 50.0


def test_bbox_bad_reference_is_bad_input():
    with pytest.raises(BadInputError, match="record 1"):
        bbox_iou(["[0,0,1,1]", "[0,0,1,1]"], ["[0,0,1,1]", "oops"])


# ---------------------------------------------------------------- registry
def test_registry():
    assert SCORER_NAMES == ("exact", "number", "anls", "caption", "bbox_iou", "vqa_soft", "relaxed",
                            "choice", "contains")
    assert SCORER_NAMES == tuple(SCORERS)
    assert get_scorer("anls") is anls
    assert score_task("exact", ["Yes"], ["yes."]) == (100.0, [100.0])
    with pytest.raises(BadInputError, match=r"unknown scorer 'bleu' \(known: exact, number"):
        get_scorer("bleu")


def test_length_mismatch_and_empty_inputs():
    with pytest.raises(BadInputError, match="2 predictions but 1 references"):
        exact(["a", "b"], ["a"])
    with pytest.raises(BadInputError, match="no records"):
        number([], [])
    with pytest.raises(BadInputError, match="record 0: empty list"):
        anls(["a"], [[]])
