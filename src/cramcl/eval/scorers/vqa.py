"""``vqa_soft``: the VQA accuracy of VQAv2, TextVQA and VizWiz, with the official answer normalisation.

Written from the published definition of the VQA evaluation (Antol et al. 2015; the challenge's
evaluation code describes the same steps), in our own code:

1. newlines and tabs become spaces; strip.
2. Punctuation. For each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: if it stands next to a space
   in the answer, or the answer holds a comma between two digits anywhere, the mark is deleted, otherwise
   it becomes a space ("yes/no" -> "yes no", "2,000" -> "2000"). Then every '.' not followed by a digit is
   deleted ("3.5" keeps its point). Apostrophes and colons are kept.
3. Lowercase and split into words; number words ``none zero one ... ten`` become digits (``none`` -> 0);
   the articles a/an/the are dropped; a contraction written without its apostrophe becomes the
   apostrophe form ("dont" -> "don't", "couldnt've" -> "couldn't've").
4. Accuracy of a prediction against n human answers: the mean over the n ways of leaving one answer out
   of min(#(remaining answers equal to the prediction) / 3, 1). With 10 answers, 1, 2, 3 and >= 4
   matching answers give 0.3, 0.6, 0.9 and 1.

Deliberate differences, each only ever in the prediction's favour on rare inputs:
- The official script normalises only when the ten answers are not all the same string; we always
  normalise (the answers are normalised already in the released files, a model's output is not).
- An answer made only of articles ("a" as a letter) keeps them instead of becoming the empty string,
  which in the official code matches any other empty answer.
- The official contraction table also has keys that can never match after lowercasing ("Im", "Ive",
  "Id've"); those are left out here, which is the same behaviour.
- A record with fewer than 4 answers cannot reach 3 matches when one is left out; such records
  (a test file that kept one answer) score by normalised exact match against any of them.
"""
from __future__ import annotations

import re
from itertools import combinations

from cramcl.eval.scorers._common import Reference, check_inputs, ref_list
from cramcl.eval.scorers.text import drop_articles

VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                   "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
DIGIT_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}

# The contractions the official table recognises, in their apostrophe form. A key is the form with one
# apostrophe left out ("couldn't've" -> "couldnt've", "couldn'tve"); a one-apostrophe form drops it.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't
must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas
wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've
who'll who's who've won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've
""".split()


def _contraction_table(forms: list[str]) -> dict[str, str]:
    """{spelling with one apostrophe missing: apostrophe form} for every form."""
    table = {}
    for form in forms:
        marks = [i for i, c in enumerate(form) if c == "'"]
        for i in marks:
            table[form[:i] + form[i + 1:]] = form
    return table


CONTRACTIONS = _contraction_table(_CONTRACTED)


def vqa_punctuation(text: str) -> str:
    """Step 2 of the module docstring: punctuation deleted or turned into spaces, then periods."""
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        beside_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if (beside_space or delete_all) else " ")
    return _PERIOD.sub("", out)


def vqa_normalize(text: str) -> str:
    """The VQA answer normalisation (module docstring, steps 1-3).
    ``vqa_normalize("Two dogs!") == "2 dogs"``, ``vqa_normalize("dont") == "don't"``."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    words = [DIGIT_WORDS.get(w, w) for w in vqa_punctuation(text).lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in drop_articles(words))


def vqa_accuracy(pred: str, answers: list[str]) -> float:
    """VQA accuracy (0-1) of one prediction against the human answers (step 4 of the module docstring):
    the mean over the leave-one-out subsets of min(matches / 3, 1). Fewer than 4 answers: 1 if the
    prediction equals any of them, else 0. Strings are compared after :func:`vqa_normalize`; an empty
    prediction is never right."""
    p = vqa_normalize(pred)
    refs = [vqa_normalize(a) for a in answers]
    if not p:
        return 0.0
    if len(refs) < 4:
        return float(p in refs)
    n = len(refs)
    subsets = list(combinations(range(n), n - 1))
    return sum(min(sum(refs[i] == p for i in s) / 3.0, 1.0) for s in subsets) / len(subsets)


def vqa_soft(predictions: list[str], references: list[Reference], **_) -> tuple[float, list[float]]:
    """VQA soft accuracy x100 per record (:func:`vqa_accuracy`; ``references[k]`` is the list of the
    record's human answers, repeats included), task = the mean. One matching answer out of ten scores
    30, two 60, three 90, four or more 100."""
    check_inputs("vqa_soft", predictions, references)
    per = [100.0 * vqa_accuracy(str(p), ref_list(r)) for p, r in zip(predictions, references)]
    return sum(per) / len(per), per
