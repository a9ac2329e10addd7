"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) in the style of the COCO caption evaluation.

Our own implementation, with no external data: every function is pure and works on token lists.

Conventions
- Tokenisation (:func:`tokenize`): lowercase, every punctuation character becomes a separator (so
  punctuation is split off and dropped, as COCO's PTB tokenizer drops it), whitespace split.
- Every component is reported as ``100 x`` its usual 0-1 value. CIDEr-D is natively 0-10 (the COCO code
  multiplies by 10), so ``CIDEr`` here lies on a 0-1000 scale: the number papers print as "CIDEr 115.2".
- METEOR implements only the *exact-match* module (unigram P/R F-mean with alpha = 0.9, fragmentation
  penalty gamma * (chunks / matches) ** beta with gamma = 0.5, beta = 3). The stemming, synonym and
  paraphrase modules are omitted because they need WordNet / paraphrase-table downloads; our METEOR is
  therefore a lower bound of the official one. The alignment is found by greedy tiling (longest common
  run first), which attains the maximum number of matches and few chunks. The corpus METEOR is the mean of
  per-record scores (best over references), not the Java tool's pooled statistics.
"""
from __future__ import annotations

import math
import string
from collections import Counter

Tokens = list[str]

_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})
METEOR_ALPHA, METEOR_GAMMA, METEOR_BETA = 0.9, 0.5, 3.0
ROUGE_BETA = 1.2
CIDER_N, CIDER_SIGMA = 4, 6.0


def tokenize(text: str) -> Tokens:
    """Lowercase, split punctuation off (and drop it), split on whitespace."""
    return str(text).lower().translate(_PUNCT_TABLE).split()


def ngrams(tokens: Tokens, n: int) -> Counter:
    """Counter of the n-grams (as tuples) of ``tokens``."""
    return Counter(tuple(tokens[k:k + n]) for k in range(len(tokens) - n + 1))


# ---------------------------------------------------------------- BLEU
def _closest_ref_len(hyp_len: int, ref_lens: list[int]) -> int:
    """Reference length closest to the hypothesis length; ties go to the shorter (COCO "closest")."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def _clipped_matches(hyp: Tokens, refs: list[Tokens], n: int) -> tuple[int, int]:
    """(clipped n-gram matches, n-gram count of hyp): each hyp n-gram counts at most max-over-refs times."""
    hyp_counts = ngrams(hyp, n)
    max_ref: Counter = Counter()
    for ref in refs:
        max_ref |= ngrams(ref, n)  # `|` keeps the max count per n-gram
    correct = sum(min(c, max_ref[g]) for g, c in hyp_counts.items())
    return correct, max(0, len(hyp) - n + 1)


def _brevity_penalty(hyp_len: int, ref_len: int) -> float:
    if hyp_len == 0:
        return 0.0
    return 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)


def corpus_bleu(hyps: list[Tokens], refs: list[list[Tokens]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n (0-1): clipped matches and lengths are pooled over the corpus, one brevity
    penalty from the summed hypothesis and closest-reference lengths (as in the COCO evaluation)."""
    correct, guess = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, refs):
        hyp_len += len(hyp)
        ref_len += _closest_ref_len(len(hyp), [len(r) for r in rs])
        for n in range(1, max_n + 1):
            c, g = _clipped_matches(hyp, rs, n)
            correct[n - 1] += c
            guess[n - 1] += g
    bp = _brevity_penalty(hyp_len, ref_len)
    scores, log_sum = [], 0.0
    for n in range(1, max_n + 1):
        if correct[n - 1] == 0:
            # a zero precision makes this and every higher order zero (COCO gives ~1e-15 here)
            scores.extend([0.0] * (max_n - n + 1))
            break
        log_sum += math.log(correct[n - 1] / guess[n - 1])
        scores.append(bp * math.exp(log_sum / n))
    return scores


def sentence_bleu(hyp: Tokens, refs: list[Tokens], max_n: int = 4) -> float:
    """Smoothed sentence BLEU-max_n (0-1): add-one smoothing on orders >= 2 (Lin & Och), so a short but
    right caption is not zeroed by a missing 4-gram."""
    if not hyp:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        c, g = _clipped_matches(hyp, refs, n)
        if n == 1:
            if c == 0:
                return 0.0
            log_sum += math.log(c / g)
        else:
            log_sum += math.log((c + 1) / (g + 1))
    bp = _brevity_penalty(len(hyp), _closest_ref_len(len(hyp), [len(r) for r in refs]))
    return bp * math.exp(log_sum / max_n)


# ---------------------------------------------------------------- ROUGE-L
def lcs_length(a: Tokens, b: Tokens) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) dynamic programme, one row kept)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: Tokens, refs: list[Tokens], beta: float = ROUGE_BETA) -> float:
    """ROUGE-L (0-1) as in COCO: P and R are each maxed over the references, then
    F = (1 + beta^2) P R / (R + beta^2 P)."""
    if not hyp:
        return 0.0
    precs, recs = [0.0], [0.0]
    for ref in refs:
        lcs = lcs_length(hyp, ref)
        precs.append(lcs / len(hyp))
        recs.append(lcs / len(ref) if ref else 0.0)
    p, r = max(precs), max(recs)
    if p == 0.0 or r == 0.0:
        return 0.0
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


# ---------------------------------------------------------------- METEOR (exact module)
def _align(hyp: Tokens, ref: Tokens) -> list[tuple[int, int]]:
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


def _chunks(pairs: list[tuple[int, int]]) -> int:
    """Number of runs that are contiguous and in the same order in both sentences."""
    chunks, prev = 0, None
    for h, r in pairs:
        if prev is None or h != prev[0] + 1 or r != prev[1] + 1:
            chunks += 1
        prev = (h, r)
    return chunks


def meteor_single(hyp: Tokens, ref: Tokens) -> float:
    """METEOR (0-1) of one hypothesis against one reference, exact matches only."""
    pairs = _align(hyp, ref)
    m = len(pairs)
    if m == 0:
        return 0.0
    p, r = m / len(hyp), m / len(ref)
    f_mean = p * r / (METEOR_ALPHA * p + (1 - METEOR_ALPHA) * r)
    penalty = METEOR_GAMMA * (_chunks(pairs) / m) ** METEOR_BETA
    return f_mean * (1 - penalty)


def meteor(hyp: Tokens, refs: list[Tokens]) -> float:
    """Best METEOR over the references (as the METEOR tool scores multiple references)."""
    return max((meteor_single(hyp, r) for r in refs), default=0.0)


# ---------------------------------------------------------------- CIDEr-D
def _document_frequency(refs: list[list[Tokens]]) -> Counter:
    """For each n-gram (n = 1..4): in how many records' reference sets it appears."""
    df: Counter = Counter()
    for rs in refs:
        seen = set()
        for ref in rs:
            for n in range(1, CIDER_N + 1):
                seen.update(ngrams(ref, n))
        df.update(seen)
    return df


def _tfidf(tokens: Tokens, df: Counter, log_n: float) -> tuple[list[dict], list[float]]:
    """Per order n: {n-gram: tf * idf} with idf = log(N) - log(max(1, df)), and the vector's L2 norm."""
    vecs, norms = [], []
    for n in range(1, CIDER_N + 1):
        vec = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in ngrams(tokens, n).items()}
        vecs.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    return vecs, norms


def _cider_pair(hyp: tuple, ref: tuple, len_h: int, len_r: int) -> float:
    """CIDEr-D similarity of one hyp/ref pair (0-1 before the x10): clipped cosine per order,
    a gaussian penalty on the length difference, averaged over orders."""
    (vh, nh), (vr, nr) = hyp, ref
    penalty = math.exp(-((len_h - len_r) ** 2) / (2 * CIDER_SIGMA ** 2))
    total = 0.0
    for n in range(CIDER_N):
        # clipping min(h, r) stops a caption from gaining by repeating a frequent n-gram
        dot = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vh[n].items())
        if nh[n] > 0 and nr[n] > 0:
            total += dot / (nh[n] * nr[n]) * penalty
    return total / CIDER_N


def cider_d(hyps: list[Tokens], refs: list[list[Tokens]]) -> list[float]:
    """Per-record CIDEr-D (0-10, i.e. already x10 as in COCO). Document frequencies come from the
    references of the whole corpus, so a one-record corpus scores 0 (every idf is log 1 = 0)."""
    df = _document_frequency(refs)
    log_n = math.log(max(1, len(refs)))
    out = []
    for hyp, rs in zip(hyps, refs):
        h = _tfidf(hyp, df, log_n)
        sims = [_cider_pair(h, _tfidf(r, df, log_n), len(hyp), len(r)) for r in rs]
        out.append(10.0 * sum(sims) / len(sims))
    return out


# ---------------------------------------------------------------- all together
COMPONENTS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def _tokenize_all(preds: list[str], refs: list) -> tuple[list[Tokens], list[list[Tokens]]]:
    hyps = [tokenize(p) for p in preds]
    ref_toks = [[tokenize(r) for r in ([rs] if isinstance(rs, str) else rs)] for rs in refs]
    return hyps, ref_toks


def caption_metrics(preds: list[str], refs: list) -> dict[str, float]:
    """All caption components (keys :data:`COMPONENTS`) of a corpus, each x100 (CIDEr: 0-1000 scale).

    ``refs[k]`` is one reference caption or a list of them for prediction ``k``.
    """
    hyps, ref_toks = _tokenize_all(preds, refs)
    bleu = corpus_bleu(hyps, ref_toks)
    n = len(hyps)
    out = {f"BLEU-{k + 1}": 100.0 * b for k, b in enumerate(bleu)}
    out["METEOR"] = 100.0 * sum(meteor(h, r) for h, r in zip(hyps, ref_toks)) / n
    out["ROUGE-L"] = 100.0 * sum(rouge_l(h, r) for h, r in zip(hyps, ref_toks)) / n
    out["CIDEr"] = 100.0 * sum(cider_d(hyps, ref_toks)) / n
    return out


def caption_record_scores(preds: list[str], refs: list) -> list[float]:
    """Per-record caption score (0-100): mean of smoothed sentence BLEU-4 x100, ROUGE-L x100 and
    CIDEr-D x10 (CIDEr-D is at most 10, so x10 keeps the per-record score within 0-100)."""
    hyps, ref_toks = _tokenize_all(preds, refs)
    ciders = cider_d(hyps, ref_toks)
    return [(100.0 * sentence_bleu(h, r) + 100.0 * rouge_l(h, r) + 10.0 * c) / 3.0
            for h, r, c in zip(hyps, ref_toks, ciders)]
