"""Text scorers: ``exact``, ``contains``, ``number`` and ChartQA's ``relaxed`` accuracy.

All of them share :func:`normalize_answer`. Normalisation never erases an answer: the articles a/an/the
are dropped only when some other word remains, so the option letter "A" stays "a" and "The" stays "the".
"""
from __future__ import annotations

import math
import re
import string

from cramcl.eval.scorers._common import Reference, per_record

# Punctuation that separates words ("black-and-white", "yes/no") becomes a space; the rest is dropped.
_SEPARATORS = "-/_"
_DROP = "".join(c for c in string.punctuation if c not in _SEPARATORS + ".")
_DROP_TABLE = str.maketrans({**{c: None for c in _DROP}, **{c: " " for c in _SEPARATORS}})
_NON_DECIMAL_DOT = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a '.' not between two digits
ARTICLES = frozenset({"a", "an", "the"})


def drop_articles(words: list[str]) -> list[str]:
    """``words`` without a/an/the, unless that would leave nothing: an answer made only of articles
    ("A", "the", "a an") is kept whole, so no answer is ever erased. ``["the", "end"] -> ["end"]``."""
    kept = [w for w in words if w not in ARTICLES]
    return kept if kept else list(words)


def normalize_answer(text: str) -> str:
    """Answer normalisation: lowercase, strip, drop punctuation (hyphens, slashes and underscores become
    spaces; a decimal point between digits is kept, so "3.5" stays "3.5"), drop the articles a/an/the
    unless the answer is nothing but articles (:func:`drop_articles`), collapse whitespace.

    ``normalize_answer("The Cat!") == "cat"``; ``normalize_answer("A") == "a"`` (an option letter survives).
    """
    text = str(text).lower().strip().translate(_DROP_TABLE)
    text = _NON_DECIMAL_DOT.sub("", text)
    return " ".join(drop_articles(text.split()))


def _exact_record(pred: str, ref: str) -> float:
    p = normalize_answer(pred)
    # an empty answer is never right, so a model that says nothing cannot score on blank references
    return 100.0 if p and p == normalize_answer(ref) else 0.0


def exact(predictions: list[str], references: list[Reference], **_) -> tuple[float, list[float]]:
    """Normalised exact match (:func:`normalize_answer`); 100 or 0 per record, best over references.
    ``exact(["(A)"], ["A"]) == (100.0, [100.0])``."""
    return per_record("exact", _exact_record, predictions, references)


# ---------------------------------------------------------------- contains
def _contains_record(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred), normalize_answer(ref)
    return 100.0 if r and f" {r} " in f" {p} " else 0.0


def contains(predictions: list[str], references: list[Reference], **_) -> tuple[float, list[float]]:
    """Whole-word containment: 100 if the normalised reference occurs in the normalised prediction as a
    run of whole words, else 0 (CoIN's ImageNet scoring). "a golden retriever" contains "golden
    retriever"; "cathedral" does not contain "cat". An empty reference never matches."""
    return per_record("contains", _contains_record, predictions, references)


# ---------------------------------------------------------------- number
_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                 "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\d])"  # 1,234.5 / 12 / .5
    r"|\b(" + "|".join(_NUMBER_WORDS) + r")\b",
    re.IGNORECASE)


def parse_number(text: str) -> float | None:
    """The first number in ``text`` (digits with optional sign, thousands commas and decimals, or an
    English number word zero..twenty), or None. ``parse_number("12 apples") == 12.0``."""
    m = _NUMBER_RE.search(str(text))
    if m is None:
        return None
    if m.group(1):
        return float(_NUMBER_WORDS.index(m.group(1).lower()))
    return float(m.group(0).replace(",", ""))


def _number_record(pred: str, ref: str) -> float:
    r = parse_number(ref)
    if r is None:  # a non-numeric reference ("none", "many") is compared as text
        return _exact_record(pred, ref)
    p = parse_number(pred)
    return 100.0 if p is not None and math.isclose(p, r, rel_tol=1e-6, abs_tol=0.0) else 0.0


def number(predictions: list[str], references: list[Reference], **_) -> tuple[float, list[float]]:
    """First-number match: right if equal within 1e-6 relative; non-numeric references fall back to
    :func:`exact`. 100 or 0 per record."""
    return per_record("number", _number_record, predictions, references)


# ---------------------------------------------------------------- relaxed (ChartQA)
RELAXED_TOLERANCE = 0.05
# a whole answer that is one number: sign, thousands separators, decimals, then an optional '%'
_WHOLE_NUMBER = re.compile(r"^\s*([-+]?)\$?\s*(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)\s*%?\s*\.?\s*$")


def parse_relaxed_number(text: str) -> float | None:
    """``text`` as a number when the whole answer is one number, else None. Thousands separators are
    dropped ("1,234" -> 1234) and a trailing "%" or leading "$" is a unit, not a factor ("45%" -> 45),
    so "45%" and "45" agree. ``parse_relaxed_number("12 apples") is None``."""
    m = _WHOLE_NUMBER.match(str(text))
    if m is None:
        return None
    value = float(m.group(2).replace(",", ""))
    return -value if m.group(1) == "-" else value


def relaxed_match(pred: str, ref: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA relaxed correctness of one answer: when the reference is a number, the prediction must be
    a number within ``tolerance`` relative error (|p - r| <= tolerance * |r|; a reference of 0 needs 0);
    otherwise normalised exact match (:func:`normalize_answer`)."""
    r = parse_relaxed_number(ref)
    if r is None:
        return _exact_record(pred, ref) > 0
    p = parse_relaxed_number(pred)
    if p is None:
        return False
    return abs(p - r) <= tolerance * abs(r)


def relaxed(predictions: list[str], references: list[Reference], *, tolerance: float = RELAXED_TOLERANCE,
            **_) -> tuple[float, list[float]]:
    """ChartQA relaxed accuracy (:func:`relaxed_match`, 5% by default); 100 or 0 per record.
    ``relaxed(["10.4"], ["10"])`` is right (4% off), ``relaxed(["10.6"], ["10"])`` is wrong (6%)."""
    return per_record("relaxed", lambda p, r: 100.0 * relaxed_match(p, r, tolerance), predictions, references)
