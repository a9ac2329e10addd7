"""Continual metrics over the accuracy matrix (pure, NaN-aware).

``scores[t][i]`` (shape T x T) is the score (0-100) on task i after training through task t; ``None``
(or NaN) means "not evaluated". With A = scores and L the *last evaluated row* (see below):

- MFT (mean fine-tuned)  = mean_i A[i][i]
- MFN (mean final, "Last") = mean_{i<=L} A[L][i]
- MAA (mean average, "Avg") = mean_{t<=L} mean_{i<=t} A[t][i]
- BWT (backward transfer) = mean_{i<L} (A[L][i] - A[i][i])
- forgetting = mean_{i<L} max_{i<=l<L} (A[l][i] - A[L][i])   (rows before i have not trained on i)

For a finished stream L = T - 1, and these are the usual definitions over the whole matrix.

Conventions
- Unevaluated cells are skipped: every mean runs over the available cells only (a BWT term needs both of
  its cells; a forgetting term needs A[L][i] and at least one A[l][i] with i <= l < L). A metric with no
  available cell is NaN.
- Last evaluated row: L is the last row holding any value. A partially run stream (rows after the k-th all
  None, or fewer than T rows) is thus measured after its k-th task, on the tasks it has seen (i <= L).
- With a single evaluated row (T = 1, or only the first task run) BWT and forgetting are NaN: no task has
  been trained on and then followed by another.
- Matrices may be ragged in rows (fewer rows than tasks) but each row must have T entries.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from cramcl.errors import BadInputError

Matrix = Sequence[Sequence[float | None]]
METRIC_NAMES = ("MFT", "MFN", "MAA", "BWT", "forgetting")
NAN = float("nan")


def _cell(scores: Matrix, t: int, i: int) -> float | None:
    """A[t][i] as a float, or None when the row is absent, the cell is None or NaN."""
    if t >= len(scores):
        return None
    v = scores[t][i]
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else NAN


def num_tasks(scores: Matrix) -> int:
    """T, the number of tasks (columns); checks the shape (rows <= T, every row of length T)."""
    if not scores:
        return 0
    t = len(scores[0])
    if len(scores) > t or any(len(row) != t for row in scores):
        shape = [len(row) for row in scores]
        raise BadInputError(f"accuracy matrix must be T x T (tasks x tasks); got row lengths {shape}")
    return t


def last_evaluated_row(scores: Matrix) -> int | None:
    """Index of the last row with any evaluated cell, or None if nothing was evaluated."""
    n = num_tasks(scores)
    for t in range(len(scores) - 1, -1, -1):
        if any(_cell(scores, t, i) is not None for i in range(n)):
            return t
    return None


def mft(scores: Matrix) -> float:
    """Mean fine-tuned score: mean_i A[i][i] over the available diagonal cells."""
    n = num_tasks(scores)
    return _mean([v for i in range(n) if (v := _cell(scores, i, i)) is not None])


def mfn(scores: Matrix) -> float:
    """Mean final score ("Last"): mean_{i<=L} A[L][i] on the last evaluated row L."""
    last = last_evaluated_row(scores)
    if last is None:
        return NAN
    return _mean([v for i in range(last + 1) if (v := _cell(scores, last, i)) is not None])


def maa(scores: Matrix) -> float:
    """Mean average score ("Avg"): mean over rows t of mean_{i<=t} A[t][i]; rows with no available
    cell in i <= t are skipped."""
    n = num_tasks(scores)
    row_means = []
    for t in range(min(len(scores), n)):
        vals = [v for i in range(t + 1) if (v := _cell(scores, t, i)) is not None]
        if vals:
            row_means.append(_mean(vals))
    return _mean(row_means)


def bwt(scores: Matrix) -> float:
    """Backward transfer: mean_{i<L} (A[L][i] - A[i][i]); negative means forgetting. NaN if L = 0."""
    last = last_evaluated_row(scores)
    if last is None:
        return NAN
    diffs = []
    for i in range(last):
        final, learned = _cell(scores, last, i), _cell(scores, i, i)
        if final is not None and learned is not None:
            diffs.append(final - learned)
    return _mean(diffs)


def forgetting(scores: Matrix) -> float:
    """Average forgetting: mean_{i<L} max_{i<=l<L} (A[l][i] - A[L][i]). NaN if L = 0."""
    last = last_evaluated_row(scores)
    if last is None:
        return NAN
    drops = []
    for i in range(last):
        final = _cell(scores, last, i)
        past = [v for l in range(i, last) if (v := _cell(scores, l, i)) is not None]
        if final is not None and past:
            drops.append(max(past) - final)
    return _mean(drops)


def continual_metrics(scores: Matrix) -> dict[str, float]:
    """All five metrics: {"MFT", "MFN", "MAA", "BWT", "forgetting"} -> float (NaN where undefined).
    Use :func:`json_safe` before writing them to JSON."""
    return {"MFT": mft(scores), "MFN": mfn(scores), "MAA": maa(scores),
            "BWT": bwt(scores), "forgetting": forgetting(scores)}


def gap_to_reference(scores: Matrix, reference: Sequence[float | None]) -> dict[str, float]:
    """Split a method's shortfall against a reference final row (e.g. ``mtl``'s) into the part the method
    never learned and the part it learned and lost.

    Per task i on the last evaluated row L: ``plasticity_i = ref_i - A[i][i]`` (short of the reference
    right after training on i), ``forgetting_i = A[i][i] - A[L][i]`` (lost since), so
    ``ref_i - A[L][i] = plasticity_i + forgetting_i`` exactly. Means run over the tasks where all three cells
    exist; ``{"gap", "plasticity", "forgetting"}`` (gap = plasticity + forgetting; NaN with no such task).
    reference: (T,) scores, None / NaN where missing."""
    last = last_evaluated_row(scores)
    terms = []
    for i in range(len(reference)):
        ref = reference[i]
        if last is None or i > last or ref is None or math.isnan(float(ref)):
            continue
        learned, final = _cell(scores, i, i), _cell(scores, last, i)
        if learned is not None and final is not None:
            terms.append((float(ref) - learned, learned - final))
    plasticity, forget = _mean([p for p, _ in terms]), _mean([f for _, f in terms])
    return {"gap": plasticity + forget, "plasticity": plasticity, "forgetting": forget}


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts / lists / tuples) with NaN and infinities replaced by None, since
    JSON has no NaN.
    """
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):
        f = float(obj)  # also turns numpy floats into plain, JSON-serialisable floats
        return f if math.isfinite(f) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
