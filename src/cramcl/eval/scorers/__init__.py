"""Task scorers: predictions vs references -> (task score, per-record scores), both on a 0-100 scale.

Every scorer has the signature ``(predictions: list[str], references: list[str | list[str]])
-> tuple[float, list[float]]``. A reference may be one string or a list of acceptable answers; a record
scores its best over them. The task score is the mean of the per-record scores, except for ``caption``,
whose task score is corpus-level (see :func:`caption`).

Registered names (:data:`SCORER_NAMES`): exact, number, anls, caption, bbox_iou.
"""
from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence

from cramcl.errors import BadInputError
from cramcl.eval.caption_metrics import COMPONENTS, caption_metrics, caption_record_scores

Reference = str | Sequence[str]
ScoreFn = Callable[[list[str], list[Reference]], tuple[float, list[float]]]

__all__ = ["normalize_answer", "parse_number", "levenshtein", "parse_box", "box_iou",
           "exact", "number", "anls", "caption", "bbox_iou", "caption_metrics", "CAPTION_COMPONENTS",
           "SCORERS", "SCORER_NAMES", "get_scorer", "score_task"]

CAPTION_COMPONENTS = COMPONENTS
ANLS_THRESHOLD = 0.5
BOX_IOU_THRESHOLD = 0.5


# ---------------------------------------------------------------- helpers
def _ref_list(ref: Reference) -> list[str]:
    return [ref] if isinstance(ref, str) else [str(r) for r in ref]


def _check(name: str, predictions: list[str], references: list[Reference]) -> None:
    if len(predictions) != len(references):
        raise BadInputError(f"scorer '{name}': {len(predictions)} predictions but "
                            f"{len(references)} references")
    if not predictions:
        raise BadInputError(f"scorer '{name}': no records to score")
    for k, ref in enumerate(references):
        if not isinstance(ref, str) and len(ref) == 0:
            raise BadInputError(f"scorer '{name}': record {k}: empty list of references")


def _per_record(name: str, record_fn: Callable[[str, str], float], predictions: list[str],
                references: list[Reference]) -> tuple[float, list[float]]:
    """Best-over-references per record (each 0-100), task score = their mean."""
    _check(name, predictions, references)
    per = [max(record_fn(str(p), r) for r in _ref_list(refs)) for p, refs in zip(predictions, references)]
    return sum(per) / len(per), per


# ---------------------------------------------------------------- exact
# Punctuation that separates words ("black-and-white", "yes/no") becomes a space; the rest is dropped.
_SEPARATORS = "-/_"
_DROP = "".join(c for c in string.punctuation if c not in _SEPARATORS + ".")
_DROP_TABLE = str.maketrans({**{c: None for c in _DROP}, **{c: " " for c in _SEPARATORS}})
_NON_DECIMAL_DOT = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a '.' not between two digits
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """VQA-style answer normalisation: lowercase, strip, drop punctuation (hyphens and slashes become
    spaces; a decimal point between digits is kept, so "3.5" stays "3.5"), drop the articles a/an/the,
    collapse whitespace. ``normalize_answer("The Cat!") == "cat"``."""
    text = str(text).lower().strip().translate(_DROP_TABLE)
    text = _NON_DECIMAL_DOT.sub("", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _exact_record(pred: str, ref: str) -> float:
    p = normalize_answer(pred)
    # an empty answer is never right, so a model that says nothing cannot score on blank references
    return 100.0 if p and p == normalize_answer(ref) else 0.0


def exact(predictions: list[str], references: list[Reference]) -> tuple[float, list[float]]:
    """Normalised exact match (:func:`normalize_answer`); 100 or 0 per record."""
    return _per_record("exact", _exact_record, predictions, references)


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


def number(predictions: list[str], references: list[Reference]) -> tuple[float, list[float]]:
    """First-number match: right if equal within 1e-6 relative; non-numeric references fall back to
    :func:`exact`. 100 or 0 per record."""
    return _per_record("number", _number_record, predictions, references)


# ---------------------------------------------------------------- anls
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_record(pred: str, ref: str) -> float:
    p, r = " ".join(pred.lower().split()), " ".join(ref.lower().split())
    if not p:  # as for exact: saying nothing is never right
        return 0.0
    nl = levenshtein(p, r) / max(len(p), len(r))
    return 100.0 * (1.0 - nl) if nl < ANLS_THRESHOLD else 0.0


def anls(predictions: list[str], references: list[Reference]) -> tuple[float, list[float]]:
    """Average Normalized Levenshtein Similarity (threshold 0.5), x100. Per record: max over references
    of 1 - NL if NL < 0.5 else 0, with NL = levenshtein(p, r) / max(len(p), len(r)) on lowercased,
    whitespace-collapsed strings. An empty prediction scores 0."""
    return _per_record("anls", _anls_record, predictions, references)


# ---------------------------------------------------------------- caption
def caption(predictions: list[str], references: list[Reference]) -> tuple[float, list[float]]:
    """Caption score (0-100): the mean of the corpus-level BLEU-1..4, METEOR, ROUGE-L (each x100) and CIDEr-D
    x10 (CIDEr-D is at most 10, so every term lies in 0-100 and the contract's 0-100 scale holds; the
    components, with CIDEr on the 0-1000 scale papers print, come from :func:`caption_metrics`).
    Per-record scores (0-100) are the mean of smoothed sentence BLEU-4, ROUGE-L and CIDEr-D x10 of each
    record, for inspection only (they do not average to the task score).
    """
    _check("caption", predictions, references)
    comps = caption_metrics([str(p) for p in predictions], list(references))
    terms = [v / 10.0 if k == "CIDEr" else v for k, v in comps.items()]
    task = sum(terms) / len(terms)
    return task, caption_record_scores([str(p) for p in predictions], list(references))


# ---------------------------------------------------------------- bbox_iou
_FLOAT_RE = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first four numbers of ``text`` as (x1, y1, x2, y2), e.g. "[0.1, 0.2, 0.5, 0.6]"; None if fewer."""
    nums = _FLOAT_RE.findall(str(text))
    if len(nums) < 4:
        return None
    x1, y1, x2, y2 = (float(v) for v in nums[:4])
    return x1, y1, x2, y2


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; corners are sorted first, so a box given
    as (x2, y2, x1, y1) means the same box. Zero-area union -> 0."""
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def bbox_iou(predictions: list[str], references: list[Reference]) -> tuple[float, list[float]]:
    """Box grounding: 100 if IoU(pred, ref) >= 0.5 else 0; an unparsable prediction scores 0.
    An unparsable reference is bad data and raises :class:`BadInputError` naming the record."""
    _check("bbox_iou", predictions, references)
    per = []
    for k, (pred, refs) in enumerate(zip(predictions, references)):
        ref_boxes = []
        for r in _ref_list(refs):
            box = parse_box(r)
            if box is None:
                raise BadInputError(f"scorer 'bbox_iou': record {k}: reference {r!r} is not a box "
                                    "'[x1, y1, x2, y2]'")
            ref_boxes.append(box)
        p = parse_box(pred)
        ok = p is not None and any(box_iou(p, b) >= BOX_IOU_THRESHOLD for b in ref_boxes)
        per.append(100.0 if ok else 0.0)
    return sum(per) / len(per), per


# ---------------------------------------------------------------- registry
SCORERS: dict[str, ScoreFn] = {
    "exact": exact,
    "number": number,
    "anls": anls,
    "caption": caption,
    "bbox_iou": bbox_iou,
}
SCORER_NAMES: tuple[str, ...] = tuple(SCORERS)


def get_scorer(name: str) -> ScoreFn:
    """The scorer registered as ``name``; unknown names raise :class:`BadInputError`."""
    try:
        return SCORERS[name]
    except KeyError:
        raise BadInputError(f"unknown scorer '{name}' (known: {', '.join(SCORER_NAMES)})") from None


def score_task(scorer: str, predictions: list[str],
               references: list[Reference]) -> tuple[float, list[float]]:
    """Score one task's predictions with the scorer named ``scorer``: (task score, per-record scores)."""
    return get_scorer(scorer)(list(predictions), list(references))
