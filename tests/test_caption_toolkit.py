"""Our caption metrics against the COCO caption toolkit itself.

The expected numbers were produced once by pycocoevalcap 1.2 (the toolkit's PyPI release: Stanford PTB
tokenizer 3.4.1 and METEOR 1.5 on Java 17) on the captions below, and are frozen here; the tests need
neither the toolkit nor Java. BLEU-1..4, ROUGE-L and CIDEr-D must agree to 1e-6 (they are exact
re-implementations), the tokens must be the toolkit's, and METEOR -- exact matches only here -- must
agree wherever no stem/synonym/paraphrase match exists and stay at or below the toolkit's otherwise.
"""
import pytest

from cramcl.eval import caption_metrics as cm

CASES = {
    "corpus": (
        ["A man is riding a horse on the beach.", "Two dogs play in the grass.", "a red bus parked on a street",
         "A woman cuts a cake."],
        [["A man rides a horse along the beach.", "A person on a horse at the seaside.", "Man riding horse on sand."],
         ["Two dogs are playing in the green grass.", "Dogs playing on a lawn.", "Two puppies run through grass."],
         ["A red double-decker bus on the street.", "A red bus is parked by the road.", "The bus is red."],
         ["A woman is cutting a birthday cake.", "A lady slices a cake at a party.", "Someone cuts the cake."]]),
    "punct": (
        ["The dog's ball isn't red, it's blue!", "A black-and-white cat sits (quietly) on a mat."],
        [["The dog's ball is blue, not red."], ["A black and white cat is sitting on the mat."]]),
    "exact": (
        ["a man rides a horse", "two dogs play in grass", "a red bus on the street"],
        [["a man rides a horse"], ["two dogs play in grass"], ["a red bus on the street"]]),
}
TOOLKIT = {  # pycocoevalcap 1.2 x 100 (CIDEr-D on the 0-1000 scale)
    "corpus": {"BLEU-1": 88.8888888855967, "BLEU-2": 62.16698721351823, "BLEU-3": 27.297445872340898,
               "BLEU-4": 0.0034124688473153495, "METEOR": 39.272869528288055, "ROUGE-L": 69.93103849386326,
               "CIDEr": 171.62665773339555},
    "punct": {"BLEU-1": 54.99999999725, "BLEU-2": 34.96029493715993, "BLEU-3": 28.404282012721094,
              "BLEU-4": 23.920119882701606, "METEOR": 44.08779876905978, "ROUGE-L": 54.014869888475836,
              "CIDEr": 278.12329979621506},
    "exact": {"BLEU-1": 99.9999999875, "BLEU-2": 99.99999998677886, "BLEU-3": 99.99999998576924,
              "BLEU-4": 99.999999984193, "METEOR": 100.0, "ROUGE-L": 100.0, "CIDEr": 1000.0},
}
TOOLKIT_TOKENS = {
    "punct": ["the dog 's ball is n't red it 's blue", "a black-and-white cat sits -lrb- quietly -rrb- on a mat",
              "the dog 's ball is blue not red", "a black and white cat is sitting on the mat"],
    "corpus": ["a man is riding a horse on the beach", "a red double-decker bus on the street"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bleu_rouge_cider_equal_the_toolkit(case):
    preds, refs = CASES[case]
    ours = cm.caption_metrics(preds, refs)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert ours[key] == pytest.approx(TOOLKIT[case][key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("case", sorted(CASES))
def test_meteor_is_the_toolkits_exact_module(case):
    preds, refs = CASES[case]
    ours = cm.caption_metrics(preds, refs)["METEOR"]
    if case == "exact":
        assert ours == pytest.approx(TOOLKIT[case]["METEOR"])
    else:  # stems (riding/rides, sits/sitting), synonyms and paraphrases add matches we do not make
        assert ours <= TOOLKIT[case]["METEOR"]


def test_tokens_equal_the_toolkits():
    preds, refs = CASES["punct"]
    assert [" ".join(cm.tokenize(c)) for c in preds + [r[0] for r in refs]] == TOOLKIT_TOKENS["punct"]
    preds, refs = CASES["corpus"]
    assert [" ".join(cm.tokenize(c)) for c in (preds[0], refs[2][0])] == TOOLKIT_TOKENS["corpus"]


@pytest.mark.parametrize("hyps, refs, toolkit", [
    (["cat the sat"], [["the cat sat"]], 40.0),
    (["the cat"], [["the cat sat down"]], 20.9965),
    (["the cat the mat"], [["xyz", "the cat sat on the mat"]], 33.5207),
    (["dog runs park", "dog runs"], [["dog runs park"], ["dog runs park"]], 48.3019),
    (["a red bus on the street", "two dogs play in grass", "a green tree in a park"],
     [["a red bus on the street"], ["two dogs play in grass"], ["a man rides a horse"]], 42.9987),
])
def test_meteor_equals_the_toolkit_without_stems_or_synonyms(hyps, refs, toolkit):
    # corpus METEOR (pooled statistics) as the toolkit printed it, to 4 decimals
    tok = [cm.tokenize(h) for h in hyps]
    ref_tok = [[cm.tokenize(r) for r in rs] for rs in refs]
    assert 100 * cm.corpus_meteor(tok, ref_tok) == pytest.approx(toolkit, abs=1e-4)
