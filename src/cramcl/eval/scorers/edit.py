"""``anls``: Average Normalized Levenshtein Similarity (DocVQA, InfographicVQA), with its threshold as a
setting."""
from __future__ import annotations

from cramcl.eval.scorers._common import Reference, per_record

ANLS_THRESHOLD = 0.5


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


def anls_similarity(pred: str, ref: str, threshold: float = ANLS_THRESHOLD) -> float:
    """One answer's ANLS term (0-1): s = 1 - NL with NL = levenshtein(p, r) / max(len(p), len(r)) on
    lowercased, stripped, whitespace-collapsed strings; s counts only when s > threshold, i.e.
    NL < 1 - threshold (DocVQA: threshold 0.5 <=> NL < 0.5). threshold 0 keeps every s (plain
    1 - NL). An empty prediction scores 0."""
    p, r = " ".join(pred.lower().split()), " ".join(ref.lower().split())
    if not p:  # as for exact: saying nothing is never right
        return 0.0
    s = 1.0 - levenshtein(p, r) / max(len(p), len(r))
    return s if s > threshold else 0.0


def anls(predictions: list[str], references: list[Reference], *, threshold: float = ANLS_THRESHOLD,
         **_) -> tuple[float, list[float]]:
    """ANLS x100: per record the best :func:`anls_similarity` over the references, task = their mean.
    ``threshold`` 0.5 is DocVQA's official value; 0 gives the thresholdless 1 - NL some toolboxes report."""
    return per_record("anls", lambda p, r: 100.0 * anls_similarity(p, r, threshold), predictions, references)
