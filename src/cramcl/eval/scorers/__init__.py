"""Task scorers: predictions vs references -> (task score, per-record scores), both on a 0-100 scale.

Every scorer has the signature ``(predictions: list[str], references: list[str | list[str]], *,
questions=None, **params) -> tuple[float, list[float]]``. A reference may be one string or a list of
acceptable answers; a record scores its best over them (``vqa_soft`` instead counts how many of the
human answers agree). ``questions`` (one per record) reach the scorers that read them (``choice``).
The task score is the mean of the per-record scores, except for ``caption`` (corpus-level).

A benchmark names a scorer per task either as a plain name (``scorer: exact``) or as a mapping with its
settings (``scorer: {name: anls, threshold: 0.5}``); :func:`resolve_scorer` checks either form.
Definitions, hand examples and what is exact or approximated: docs/scorers.md.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from cramcl.errors import BadInputError
from cramcl.eval.caption_metrics import COMPONENTS, caption_metrics
from cramcl.eval.scorers._common import Reference
from cramcl.eval.scorers.boxes import BOX_IOU_THRESHOLD, bbox_iou, box_iou, check_box_reference, parse_box
from cramcl.eval.scorers.caption import caption
from cramcl.eval.scorers.choice import check_choice_reference, choice, extract_choice, parse_options
from cramcl.eval.scorers.edit import ANLS_THRESHOLD, anls, levenshtein
from cramcl.eval.scorers.text import (RELAXED_TOLERANCE, contains, exact, normalize_answer, number,
                                      parse_number, relaxed)
from cramcl.eval.scorers.vqa import vqa_normalize, vqa_soft

ScoreFn = Callable[..., tuple[float, list[float]]]

__all__ = ["normalize_answer", "parse_number", "levenshtein", "parse_box", "box_iou", "vqa_normalize",
           "extract_choice", "parse_options",
           "exact", "number", "anls", "caption", "bbox_iou", "vqa_soft", "relaxed", "choice", "contains",
           "caption_metrics", "CAPTION_COMPONENTS", "SCORERS", "SCORER_NAMES", "SCORER_PARAMS",
           "get_scorer", "resolve_scorer", "scorer_label", "check_reference", "score_task"]

CAPTION_COMPONENTS = COMPONENTS

SCORERS: dict[str, ScoreFn] = {
    "exact": exact,
    "number": number,
    "anls": anls,
    "caption": caption,
    "bbox_iou": bbox_iou,
    "vqa_soft": vqa_soft,
    "relaxed": relaxed,
    "choice": choice,
    "contains": contains,
}
SCORER_NAMES: tuple[str, ...] = tuple(SCORERS)

# Each scorer's settings with their defaults: (default, lowest allowed, highest allowed, upper bound open).
SCORER_PARAMS: dict[str, dict[str, tuple[float, float, float, bool]]] = {
    "anls": {"threshold": (ANLS_THRESHOLD, 0.0, 1.0, True)},
    "relaxed": {"tolerance": (RELAXED_TOLERANCE, 0.0, 1.0, False)},
    "bbox_iou": {"threshold": (BOX_IOU_THRESHOLD, 0.0, 1.0, False)},
}
# Scorers whose references must have a given shape, checked per record by `cramcl validate`.
_REFERENCE_CHECKS = {"bbox_iou": check_box_reference, "choice": check_choice_reference}


def get_scorer(name: str) -> ScoreFn:
    """The scorer registered as ``name``; unknown names raise :class:`BadInputError`."""
    try:
        return SCORERS[name]
    except KeyError:
        raise BadInputError(f"unknown scorer '{name}' (known: {', '.join(SCORER_NAMES)})") from None


def resolve_scorer(raw: Any) -> tuple[str | None, dict[str, float], list[str]]:
    """Read a benchmark task's ``scorer`` value: a name (``"anls"``) or a mapping with ``name`` and the
    scorer's settings (``{"name": "anls", "threshold": 0.5}``). Returns (name, settings with every
    default filled in, problems); problems are phrases such as "unknown scorer 'bleu' (known: ...)"."""
    if isinstance(raw, Mapping):
        name, given = raw.get("name"), {k: v for k, v in raw.items() if k != "name"}
        if name is None:
            return None, {}, [f"scorer mapping without 'name' (known: {', '.join(SCORER_NAMES)})"]
    else:
        name, given = raw, {}
    if name is None:
        return None, {}, [f"missing scorer (known: {', '.join(SCORER_NAMES)})"]
    if not isinstance(name, str) or name not in SCORERS:
        return None, {}, [f"unknown scorer '{name}' (known: {', '.join(SCORER_NAMES)})"]
    spec = SCORER_PARAMS.get(name, {})
    params = {key: default for key, (default, _, _, _) in spec.items()}
    problems = []
    for key, value in given.items():
        if key not in spec:
            allowed = ", ".join(spec) or "none"
            close = difflib.get_close_matches(str(key), list(spec), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"its settings: {allowed}"
            problems.append(f"scorer '{name}': unknown setting '{key}' ({hint})")
            continue
        _, low, high, open_high = spec[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not (low <= value < high if open_high else low <= value <= high):
            ok = False
        if not ok:
            bound = f"[{low}, {high})" if open_high else f"[{low}, {high}]"
            problems.append(f"scorer '{name}': '{key}' must be a number in {bound} (got {value!r})")
            continue
        params[key] = float(value)
    return name, params, problems


def scorer_label(name: str, params: Mapping[str, float] | None = None) -> str:
    """How a scorer with its settings is shown: ``"exact"``, ``"anls(threshold=0.5)"``."""
    if not params:
        return name
    return f"{name}(" + ", ".join(f"{k}={v:g}" for k, v in params.items()) + ")"


def check_reference(name: str, reference: Reference, question: str = "") -> list[str]:
    """Why a test record's references cannot be scored by ``name`` (e.g. a ``choice`` reference with no
    option letter, a ``bbox_iou`` reference that is not a box); [] when they can."""
    check = _REFERENCE_CHECKS.get(name)
    if check is None:
        return []
    refs = [reference] if isinstance(reference, str) else list(reference)
    return [why for r in refs if (why := check(str(r), question))]


def score_task(scorer: str, predictions: list[str], references: list[Reference], *,
               questions: list[str] | None = None,
               params: Mapping[str, float] | None = None) -> tuple[float, list[float]]:
    """Score one task's predictions with the scorer named ``scorer`` and its settings ``params``
    (defaults where absent): (task score, per-record scores)."""
    fn = get_scorer(scorer)
    kwargs = dict(params or {})
    if questions is not None:
        kwargs["questions"] = list(questions)
    return fn(list(predictions), list(references), **kwargs)
