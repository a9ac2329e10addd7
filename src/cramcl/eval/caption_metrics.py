"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) as the COCO caption toolkit defines them.

Our own implementation, with no external data and no Java: every function is pure and works on token lists.

What is exact and what is approximated (checked against pycocoevalcap 1.2 on hand cases in
tests/test_caption_toolkit.py; docs/scorers.md has the whole story):
- Tokenisation (:func:`tokenize`) imitates the toolkit's Stanford PTB tokenizer with its punctuation
  removal: lowercase; clitics split off ("dog's" -> dog 's, "isn't" -> is n't); hyphenated words kept
  whole; brackets become -lrb- / -rrb- tokens (the toolkit keeps them: its removal list is upper-case);
  . , ; : ! ? quotes and lone dashes dropped. A regular-expression imitation, not the Java tokenizer:
  rare inputs (abbreviations, URLs) may split differently.
- BLEU-1..4: exact (corpus-level; clipped counts and lengths pooled; one brevity penalty from the total
  hypothesis length and the sum of each record's closest reference length, ties to the shorter; the
  toolkit's 1e-15 / 1e-9 guards included, so an order without a match scores a tiny number, not 0).
- ROUGE-L: exact (LCS precision and recall each maxed over the references, F with beta = 1.2, mean over
  records).
- CIDEr-D: exact (n = 1..4, tf-idf with document frequencies from the test set's references, clipped
  cosine, gaussian length penalty with sigma = 6, x10, mean over references and records).
- METEOR: METEOR 1.5's formula and English parameters with the exact-match module only
  (:mod:`cramcl.eval.meteor`): no stem, synonym or paraphrase matches, our own function-word list. It is
  therefore at most the toolkit's METEOR (equal when no such match exists).

Every component is reported as ``100 x`` its usual 0-1 value. CIDEr-D is natively 0-10 (the toolkit
multiplies by 10), so ``CIDEr`` here lies on a 0-1000 scale: the number papers print as "CIDEr 115.2".
"""
from __future__ import annotations

import math
import re
from collections import Counter

from cramcl.eval.meteor import corpus_meteor, meteor, meteor_single  # noqa: F401  (re-exported)

Tokens = list[str]

ROUGE_BETA = 1.2
BLEU_TINY, BLEU_SMALL = 1e-15, 1e-9
CIDER_N, CIDER_SIGMA = 4, 6.0

_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_BRACKET_TABLE = str.maketrans(_BRACKETS)
# symbols that stand as tokens of their own ("$5" -> $ 5, "50%" -> 50 %)
_SYMBOLS = re.compile(r"([$%#&@*+=<>|~^])")
# clitics split off the end of a word; "cannot" -> can not
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_ABBREVIATION = re.compile(r"(?:[a-z]\.){2,}")
_EDGE_PUNCT = ".,;:!?'`\""
# tokens the toolkit removes after tokenising (its list, lower-cased; the bracket names stay)
DROPPED_TOKENS = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})


def _split_word(word: str) -> Tokens:
    """One whitespace-separated chunk -> PTB-style tokens: leading and trailing punctuation off, clitic
    off, internal periods (3.5, u.s.) and hyphens kept."""
    lead, trail = [], []
    while word and word[0] in _EDGE_PUNCT:
        lead.append(word[0])
        word = word[1:]
    while word and word[-1] in _EDGE_PUNCT:
        if _ABBREVIATION.fullmatch(word):  # u.s. keeps its final period
            break
        trail.insert(0, word[-1])
        word = word[:-1]
    core: Tokens = []
    if word == "cannot":
        core = ["can", "not"]
    elif word:
        m = _CLITIC.match(word)
        core = [m.group(1), m.group(2)] if m else [word]
    return lead + core + trail


def tokenize(text: str) -> Tokens:
    """PTB-style tokens of a caption, lower-cased, with the toolkit's punctuation tokens removed.
    ``tokenize("The dog's ball isn't red!") == ["the", "dog", "'s", "ball", "is", "n't", "red"]``."""
    text = _SYMBOLS.sub(r" \1 ", str(text).lower().translate(_BRACKET_TABLE).replace('"', " "))
    return [t for chunk in text.split() for t in _split_word(chunk) if t not in DROPPED_TOKENS]


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
    """Corpus BLEU-1..max_n (0-1) as the COCO toolkit computes it: clipped matches and lengths pooled over
    the corpus; precision p_n = (correct_n + 1e-15) / (guess_n + 1e-9) (the toolkit's guards against
    log 0, so an order with no match gives a tiny positive score, not 0); BLEU-n = (p_1 ... p_n)^(1/n)
    times one brevity penalty exp(1 - 1/ratio) when ratio = (hyp_len + 1e-15) / (ref_len + 1e-9) < 1,
    with ref_len the sum of each record's closest reference length."""
    correct, guess = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, refs):
        hyp_len += len(hyp)
        ref_len += _closest_ref_len(len(hyp), [len(r) for r in rs])
        for n in range(1, max_n + 1):
            c, g = _clipped_matches(hyp, rs, n)
            correct[n - 1] += c
            guess[n - 1] += g
    ratio = (hyp_len + BLEU_TINY) / (ref_len + BLEU_SMALL)
    bp = math.exp(1.0 - 1.0 / ratio) if ratio < 1.0 else 1.0
    scores, product = [], 1.0
    for n in range(1, max_n + 1):
        product *= (correct[n - 1] + BLEU_TINY) / (guess[n - 1] + BLEU_SMALL)
        scores.append(bp * product ** (1.0 / n))
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
    out["METEOR"] = 100.0 * corpus_meteor(hyps, ref_toks)
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
