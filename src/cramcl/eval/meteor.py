"""METEOR as the COCO caption toolkit computes it (METEOR 1.5, language "en"), exact-match module only.

Definition (Denkowski & Lavie 2014), on token lists:
- An alignment links hypothesis and reference tokens one to one; ``m`` links, ``ch`` chunks (runs of
  links contiguous and in the same order on both sides).
- Each token is a content or a function word. With delta = 0.75,
  P = (delta m_c + (1 - delta) m_f) / (delta h_c + (1 - delta) h_f) over the hypothesis' content (c) and
  function (f) words, R the same over the reference's.
- F = P R / (alpha P + (1 - alpha) R), fragmentation frag = ch / m, penalty = gamma frag^beta,
  METEOR = F (1 - penalty), with alpha = 0.85, beta = 0.2, gamma = 0.6 (METEOR 1.5's English defaults).
  A hypothesis equal to its reference counts 0 chunks, so it scores exactly 1.
- With several references, each record keeps its best-scoring one. The corpus score is not the mean
  of the records' scores: their statistics (lengths, matches, chunks) are summed and the formula is
  applied once to the sums, as the METEOR tool's aggregate that the toolkit reports.

What is approximated (so our METEOR is at most the toolkit's, and equal when no stem, synonym or
paraphrase match exists and our function-word list agrees with the tool's):
- Only exact matches. The tool also links words with equal Snowball stems (weight 0.6), WordNet
  synonyms (0.8) and paraphrase-table entries (0.6); those need data downloads we do not make.
- :data:`FUNCTION_WORDS` is a short list of the words the tool treats as function words, found by
  observing its scores; the tool's own list is longer, so rarer function words count as content here.
- The alignment is found by greedy tiling (the longest run of equal free tokens first): it always
  finds the most matches; the tool's search may find fewer chunks in rare ties.

Checked against the toolkit (pycocoevalcap 1.2, Java METEOR 1.5) on hand cases: tests/test_caption_toolkit.py.
"""
from __future__ import annotations

from dataclasses import dataclass

Tokens = list[str]

METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA, METEOR_DELTA = 0.85, 0.2, 0.6, 0.75

# Common words that METEOR 1.5's English list treats as function words. The tool's list is longer (it is
# frequency-based); these were picked from about 200 candidate words by observing how the tool scores
# "<word> zebra" against "<word> zebra giraffe" (a function word lowers recall less).
FUNCTION_WORDS = frozenset("""
a about all also an and are as at be been but by can could first for from had has have he her his i if
in into is it its last more new no not of on one or other out over people s said she so some than that
the their there they this time to two up was we were what when which who will with would year years you
""".split())


@dataclass(frozen=True)
class MeteorStats:
    """Sufficient statistics of one alignment (or a sum of them): hypothesis and reference lengths split
    into content / function words, matches split the same way, and chunks."""

    hyp_content: int = 0
    hyp_function: int = 0
    ref_content: int = 0
    ref_function: int = 0
    match_content: int = 0
    match_function: int = 0
    chunks: int = 0

    def __add__(self, other: "MeteorStats") -> "MeteorStats":
        return MeteorStats(*(a + b for a, b in zip(self._values(), other._values())))

    def _values(self) -> tuple[int, ...]:
        return (self.hyp_content, self.hyp_function, self.ref_content, self.ref_function,
                self.match_content, self.match_function, self.chunks)


def align(hyp: Tokens, ref: Tokens) -> list[tuple[int, int]]:
    """One-to-one exact alignment by greedy tiling: repeatedly link the longest run of equal, still
    unaligned tokens. Returns (hyp index, ref index) pairs sorted by hyp index."""
    free_h, free_r = [True] * len(hyp), [True] * len(ref)
    pairs: list[tuple[int, int]] = []
    while True:
        best = (0, 0, 0)  # (run length, hyp start, ref start)
        for i in range(len(hyp)):
            for j in range(len(ref)):
                k = 0
                while (i + k < len(hyp) and j + k < len(ref) and free_h[i + k] and free_r[j + k]
                       and hyp[i + k] == ref[j + k]):
                    k += 1
                if k > best[0]:
                    best = (k, i, j)
        k, i, j = best
        if k == 0:
            return sorted(pairs)
        for d in range(k):
            free_h[i + d] = free_r[j + d] = False
            pairs.append((i + d, j + d))


def count_chunks(pairs: list[tuple[int, int]]) -> int:
    """Number of runs that are contiguous and in the same order in both sentences."""
    chunks, prev = 0, None
    for h, r in pairs:
        if prev is None or h != prev[0] + 1 or r != prev[1] + 1:
            chunks += 1
        prev = (h, r)
    return chunks


def meteor_stats(hyp: Tokens, ref: Tokens) -> MeteorStats:
    """The :class:`MeteorStats` of one hypothesis against one reference (exact matches)."""
    pairs = align(hyp, ref)
    matched = [hyp[h] for h, _ in pairs]
    chunks = count_chunks(pairs)
    if len(pairs) == len(hyp) == len(ref) and chunks == 1:
        chunks = 0  # the hypothesis is the reference: no fragmentation at all
    m_f = sum(w in FUNCTION_WORDS for w in matched)
    h_f = sum(w in FUNCTION_WORDS for w in hyp)
    r_f = sum(w in FUNCTION_WORDS for w in ref)
    return MeteorStats(len(hyp) - h_f, h_f, len(ref) - r_f, r_f, len(matched) - m_f, m_f, chunks)


def meteor_from_stats(s: MeteorStats) -> float:
    """METEOR (0-1) from (summed) statistics: the formula of the module docstring."""
    d = METEOR_DELTA
    m = s.match_content + s.match_function
    if m == 0:
        return 0.0
    weighted_m = d * s.match_content + (1 - d) * s.match_function
    p = weighted_m / (d * s.hyp_content + (1 - d) * s.hyp_function)
    r = weighted_m / (d * s.ref_content + (1 - d) * s.ref_function)
    f_mean = p * r / (METEOR_ALPHA * p + (1 - METEOR_ALPHA) * r)
    penalty = METEOR_GAMMA * (s.chunks / m) ** METEOR_BETA
    return f_mean * (1 - penalty)


def meteor_single(hyp: Tokens, ref: Tokens) -> float:
    """METEOR (0-1) of one hypothesis against one reference."""
    return meteor_from_stats(meteor_stats(hyp, ref))


def best_reference_stats(hyp: Tokens, refs: list[Tokens]) -> MeteorStats:
    """The statistics against the reference that scores best (the first on ties)."""
    best, best_score = MeteorStats(hyp_function=0, hyp_content=len(hyp)), -1.0
    for ref in refs:
        stats = meteor_stats(hyp, ref)
        score = meteor_from_stats(stats)
        if score > best_score:
            best, best_score = stats, score
    return best


def meteor(hyp: Tokens, refs: list[Tokens]) -> float:
    """METEOR (0-1) of one record: the best over its references."""
    return max((meteor_single(hyp, r) for r in refs), default=0.0)


def corpus_meteor(hyps: list[Tokens], refs: list[list[Tokens]]) -> float:
    """Corpus METEOR (0-1): each record's best-reference statistics summed, then scored once."""
    total = MeteorStats()
    for hyp, rs in zip(hyps, refs):
        total = total + best_reference_stats(hyp, rs)
    return meteor_from_stats(total)
