"""Shared plumbing of the scorers: reference lists, input checks, best-over-references averaging."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from cramcl.errors import BadInputError

Reference = str | Sequence[str]


def ref_list(ref: Reference) -> list[str]:
    """One reference or a list of them, as a list of strings."""
    return [ref] if isinstance(ref, str) else [str(r) for r in ref]


def check_inputs(name: str, predictions: list[str], references: list[Reference],
                 questions: list[str] | None = None) -> None:
    """Raise :class:`BadInputError` on mismatched lengths, no records or an empty reference list."""
    if len(predictions) != len(references):
        raise BadInputError(f"scorer '{name}': {len(predictions)} predictions but "
                            f"{len(references)} references")
    if questions is not None and len(questions) != len(predictions):
        raise BadInputError(f"scorer '{name}': {len(predictions)} predictions but "
                            f"{len(questions)} questions")
    if not predictions:
        raise BadInputError(f"scorer '{name}': no records to score")
    for k, ref in enumerate(references):
        if not isinstance(ref, str) and len(ref) == 0:
            raise BadInputError(f"scorer '{name}': record {k}: empty list of references")


def per_record(name: str, record_fn: Callable[[str, str], float], predictions: list[str],
               references: list[Reference]) -> tuple[float, list[float]]:
    """Best-over-references per record (each 0-100), task score = their mean."""
    check_inputs(name, predictions, references)
    per = [max(record_fn(str(p), r) for r in ref_list(refs)) for p, refs in zip(predictions, references)]
    return sum(per) / len(per), per
