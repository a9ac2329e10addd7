"""Scorers: hand-computed cases (the arithmetic is in the comments)."""
import math

import pytest

from cramcl.errors import BadInputError
from cramcl.eval import caption_metrics as cm
from cramcl.eval.scorers import (SCORER_NAMES, SCORERS, anls, bbox_iou, box_iou, caption,
                                 caption_metrics, exact, get_scorer, levenshtein, normalize_answer,
                                 number, parse_number, relaxed, score_task)


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
    # as the toolkit's PTB tokenizer: clitics split, hyphenated words whole, brackets kept as -lrb- / -rrb-
    assert cm.tokenize("The dog's ball isn't red!") == ["the", "dog", "'s", "ball", "is", "n't", "red"]
    assert cm.tokenize("A black-and-white cat (quietly).") == ["a", "black-and-white", "cat", "-lrb-",
                                                               "quietly", "-rrb-"]
    assert cm.tokenize("I cannot see the U.S. flag; 3.5 m...") == ["i", "can", "not", "see", "the", "u.s.",
                                                                  "flag", "3.5", "m"]


def test_identical_captions_score_full():
    m = caption_metrics(CAPS, CAPS)
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert m[k] == pytest.approx(100.0)
    # every record's tf-idf vector equals its reference's: cosine 1 per order, no length penalty
    # -> 10 per record (x10 in CIDEr-D) -> x100 = 1000
    assert m["CIDEr"] == pytest.approx(1000.0)
    # METEOR 1.5 counts a hypothesis equal to its reference as 0 chunks: no penalty, 1 (the toolkit gives 100)
    assert m["METEOR"] == pytest.approx(100.0)
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
    # no trigram matches: the toolkit's guard p_n = (0 + 1e-15) / (guess + 1e-9) leaves a tiny positive number
    p = [4 / 4, 2 / 3, 1e-15 / 2, 1e-15 / 1]
    assert m["BLEU-3"] == pytest.approx(100 * bp * (p[0] * p[1] * p[2]) ** (1 / 3), rel=1e-6)  # 4.2e-4
    assert m["BLEU-4"] == pytest.approx(100 * bp * (p[0] * p[1] * p[2] * p[3]) ** (1 / 4), rel=1e-6)
    assert 0 < m["BLEU-4"] < 1e-3
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
    # METEOR 1.5 (alpha 0.85, beta 0.2, gamma 0.6, delta 0.75), exact matches; each value below is also
    # what the COCO toolkit's Java METEOR gives (tests/test_caption_toolkit.py)
    t = cm.tokenize
    # same words, 3 chunks: P = R = 1 -> F = 1; penalty 0.6 * (3/3)^0.2 = 0.6 -> 0.4
    assert cm.meteor_single(t("cat the sat"), t("the cat sat")) == pytest.approx(0.4)
    # "the cat" vs "the cat sat down": P = 1; R weighs the function word "the" by 0.25 and content by 0.75:
    # R = (0.75 + 0.25) / (0.75 * 3 + 0.25 * 1) = 0.4; F = 0.4 / (0.85 + 0.15 * 0.4) = 0.43956;
    # one chunk over 2 matches: penalty 0.6 * 0.5^0.2 = 0.52233 -> 0.209965
    f = 0.4 / 0.91
    assert cm.meteor_single(t("the cat"), t("the cat sat down")) == pytest.approx(f * (1 - 0.6 * 0.5 ** 0.2))
    # "dog runs" vs "dog runs park" (content words only): R = 2/3, F = (2/3) / 0.95; penalty 0.6 * 0.5^0.2
    assert cm.meteor_single(t("dog runs"), t("dog runs park")) == pytest.approx(
        (2 / 3) / 0.95 * (1 - 0.6 * 0.5 ** 0.2))  # 0.335207
    # best over references
    assert cm.meteor(t("the cat the mat"), [t("xyz"), t("the cat sat on the mat")]) == pytest.approx(0.335207, abs=1e-6)
    assert cm.meteor_single(t("dog"), t("cat")) == 0.0


def test_meteor_corpus_pools_statistics():
    # the corpus score is the formula on summed statistics, not the mean of the records' scores:
    # "dog runs park" (equal: 3 matches, 0 chunks) + "dog runs" vs "dog runs park" (2 matches, 1 chunk)
    # P = 5/5, R = 5/6, F = (5/6) / (0.85 + 0.125) = 0.854701; penalty 0.6 * (1/5)^0.2 -> 0.483019
    # (the mean of the two records would be (1 + 0.335207) / 2 = 0.6676)
    t = cm.tokenize
    hyps, refs = [t("dog runs park"), t("dog runs")], [[t("dog runs park")], [t("dog runs park")]]
    assert cm.corpus_meteor(hyps, refs) == pytest.approx((5 / 6) / 0.975 * (1 - 0.6 * 0.2 ** 0.2))
    assert cm.corpus_meteor(hyps, refs) == pytest.approx(0.483019, abs=1e-6)  # the toolkit's value


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


# ---------------------------------------------------------------- exact never erases an answer
@pytest.mark.parametrize("letter", list("ABCDE"))
def test_exact_option_letters_score(letter):
    # before the fix "A" normalised to "" (an article) and every record answered "A" scored 0
    assert normalize_answer(letter) == letter.lower()
    assert exact([letter, letter.lower(), f"({letter})", f"{letter}."], [letter] * 4)[1] == [100.0] * 4
    other = "B" if letter == "A" else "A"
    assert exact([other], [letter])[1] == [0.0]


@pytest.mark.parametrize("answer", ["a", "an", "the", "A", "The", "AN", "a an"])
def test_exact_article_only_answers_are_kept(answer):
    assert normalize_answer(answer) == answer.lower()
    assert exact([answer.upper()], [answer])[1] == [100.0]
    assert exact(["", "   "], [answer, answer])[1] == [0.0, 0.0]  # saying nothing is still never right


def test_exact_article_like_answers():
    # articles beside another word are still dropped: "the end" and "end" agree, "the end" and "the" do not
    assert normalize_answer("The End") == "end"
    assert exact(["end", "the", "an end", "a"], ["the end", "the end", "the end", "the"])[1] == [
        100.0, 0.0, 100.0, 0.0]


# ---------------------------------------------------------------- contains
def test_contains_whole_words():
    preds = ["It is a Golden Retriever.", "a cathedral", "tabby cat", "cat", "", "golden"]
    refs = ["golden retriever", "cat", "cat", ["dog", "Cat"], "cat", "golden retriever"]
    # whole words only: "cathedral" does not contain "cat"; the reference must be there whole
    task, per = score_task("contains", preds, refs)
    assert per == [100.0, 0.0, 100.0, 100.0, 0.0, 0.0] and task == 50.0


# ---------------------------------------------------------------- vqa_soft
def test_vqa_normalize_official_steps():
    from cramcl.eval.scorers import vqa_normalize as v
    assert v("Two dogs!") == "2 dogs"            # number word -> digit, '!' beside nothing -> space, stripped
    assert v("none") == "0" and v("Ten") == "10"
    assert v("yes/no") == "yes no"               # '/' not beside a space -> a space
    assert v("yes / no") == "yes no"             # beside a space -> deleted (the spaces collapse)
    assert v("2,000 people") == "2000 people"    # a digit comma anywhere: every mark is deleted
    assert v("3.5 kg.") == "3.5 kg"              # a '.' before a digit is kept, the final one dropped
    assert v("The dog") == "dog" and v("a") == "a" and v("The") == "the"  # article-only answers kept
    assert v("dont") == "don't" and v("couldnt've") == "couldn't've" and v("Its") == "its"
    assert v("black-and-white") == "black and white"
    assert v("  hello,\tworld ") == "hello world"


def test_vqa_soft_counts_matching_answers():
    # 10 answers, k equal to the prediction: leave-one-out mean of min(matches / 3, 1)
    # k = 1: 9 subsets keep it (1/3), 1 drops it (0) -> 3/10 = 0.3; k = 2: (8 * 2/3 + 2 * 1/3) / 10 = 0.6
    # k = 3: (7 * 1 + 3 * 2/3) / 10 = 0.9; k >= 4: every subset keeps >= 3 -> 1
    expected = [0, 30, 60, 90, 100, 100, 100, 100, 100, 100, 100]
    for k in range(11):
        answers = ["two"] * k + ["three"] * (10 - k)
        assert score_task("vqa_soft", ["2"], [answers])[1][0] == pytest.approx(expected[k]), k
    # normalisation applies to both sides; a short answer list (here 1) falls back to exact match
    task, per = score_task("vqa_soft", ["The Red one.", "yes", "", "no"],
                           [["red one"] * 3 + ["blue"] * 7, ["Yes"], ["yes"] * 10, "no"])
    assert per == pytest.approx([90.0, 100.0, 0.0, 100.0]) and task == pytest.approx(72.5)


# ---------------------------------------------------------------- relaxed
def test_relaxed_chartqa():
    from cramcl.eval.scorers.text import parse_relaxed_number as n
    assert n("45%") == 45.0 and n("1,234.5") == 1234.5 and n("-3") == -3.0 and n("$12") == 12.0
    assert n("12 apples") is None and n("1,23") is None
    preds = ["10.4", "10.6", "10.5", "45%", "1,234", "0", "0.01", "Yes", "12 apples", "blue"]
    refs = ["10", "10", "10", "45", "1234", "0", "0", "yes", "12", "Blue."]
    # 4% and exactly 5% off are right, 6% wrong; '%' is a unit; thousands separators dropped;
    # a reference 0 needs 0; text is compared after normalisation; a number inside text is not a number
    task, per = relaxed(preds, refs)
    assert per == [100, 0, 100, 100, 100, 100, 0, 100, 0, 100]
    assert score_task("relaxed", ["10.6"], ["10"], params={"tolerance": 0.1})[1] == [100.0]


# ---------------------------------------------------------------- anls threshold
def test_anls_threshold_setting():
    # "abcdef" vs "abcxyz": s = 1 - 3/6 = 0.5: dropped at the official 0.5 (s must exceed it), kept at 0
    assert anls(["abcdef"], ["abcxyz"])[1] == [0.0]
    assert anls(["abcdef"], ["abcxyz"], threshold=0.0)[1] == [50.0]
    # "abcd" vs "wxyz": s = 0 -> 0 under any threshold; "cat" vs "cats": s = 0.75 kept at 0.7, dropped at 0.8
    assert anls(["abcd"], ["wxyz"], threshold=0.0)[1] == [0.0]
    assert score_task("anls", ["cat"], ["cats"], params={"threshold": 0.7})[1] == [75.0]
    assert score_task("anls", ["cat"], ["cats"], params={"threshold": 0.8})[1] == [0.0]


# ---------------------------------------------------------------- choice
Q = "Which animal is shown?\nA. cat\nB. dog\nC. dark red bird\nD. red fox"


@pytest.mark.parametrize("pred, want", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B. cat", "B"), ("B) dog", "B"), ("The answer is (B).", "B"),
    ("Answer: C", "C"), ("the answer is c", "C"), ("Option D", "D"), ("I think (A) fits", "A"),
    ("dog", "B"), ("It is a dog.", "B"), ("dark red bird", "C"), ("I think B", "B"),
    ("A", "A"), ("a", "A"), ("The answer is a dog", "B"), ("A cat sits there", "A"),
    ("E", None), ("none of them", None), ("I'd say (A) or (B)", None),
    ("(A) or (B)", "A"),  # an answer that starts with a marked letter gives that letter (rule 2)
])
def test_extract_choice_with_options(pred, want):
    from cramcl.eval.scorers import extract_choice
    assert extract_choice(pred, Q) == want


def test_parse_options_formats():
    from cramcl.eval.scorers import parse_options
    assert parse_options(Q) == {"A": "cat", "B": "dog", "C": "dark red bird", "D": "red fox"}
    assert parse_options("Context: x\nOptions: (A) cat (B) dog (C) a mouse\nAnswer with the letter.") == {
        "A": "cat", "B": "dog", "C": "a mouse"}
    assert parse_options("Is it red? A: yes, B: no") == {"A": "yes", "B": "no"}
    assert parse_options("What is shown in the picture?") == {}


def test_choice_scorer():
    from cramcl.eval.scorers import choice, extract_choice
    assert extract_choice("E") == "E" and extract_choice("I think B") == "B"  # no options: letters A-J
    preds = ["The answer is (B).", "dog", "C", "A", "a"]
    refs = ["B", "(B)", "B. dog", "A", "dog"]
    # B = B; "dog" maps to B through the question's options; C != B; A = A; "a" (A) != "dog" (B)
    task, per = choice(preds, refs, questions=[Q] * 5)
    assert per == [100.0, 100.0, 0.0, 100.0, 0.0] and task == 60.0
    with pytest.raises(BadInputError, match="record 1: reference 'cat' names no option letter"):
        choice(["A", "A"], ["A", "cat"])  # no options in the question: "cat" cannot be mapped


# ---------------------------------------------------------------- settings
def test_resolve_scorer_forms():
    from cramcl.eval.scorers import resolve_scorer, scorer_label
    assert resolve_scorer("exact") == ("exact", {}, [])
    assert resolve_scorer("anls") == ("anls", {"threshold": 0.5}, [])
    assert resolve_scorer({"name": "anls", "threshold": 0}) == ("anls", {"threshold": 0.0}, [])
    assert resolve_scorer({"name": "relaxed", "tolerance": 0.1})[1] == {"tolerance": 0.1}
    assert scorer_label("anls", {"threshold": 0.5}) == "anls(threshold=0.5)" and scorer_label("exact") == "exact"
    known = ", ".join(SCORER_NAMES)
    assert resolve_scorer("bleu")[2] == [f"unknown scorer 'bleu' (known: {known})"]
    assert resolve_scorer(None)[2] == [f"missing scorer (known: {known})"]
    assert resolve_scorer({"threshold": 0.5})[2][0].startswith("scorer mapping without 'name'")
    assert resolve_scorer({"name": "anls", "threshhold": 0.3})[2] == [
        "scorer 'anls': unknown setting 'threshhold' (did you mean 'threshold'?)"]
    assert resolve_scorer({"name": "exact", "threshold": 0.3})[2] == [
        "scorer 'exact': unknown setting 'threshold' (its settings: none)"]
    for bad in (1.0, -0.1, "high", True):
        assert "must be a number in [0.0, 1.0)" in resolve_scorer({"name": "anls", "threshold": bad})[2][0]
