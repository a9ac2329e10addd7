"""``caption``: the COCO caption metrics folded into one 0-100 task score (UCIT's caption scoring)."""
from __future__ import annotations

from cramcl.eval.caption_metrics import caption_metrics, caption_record_scores
from cramcl.eval.scorers._common import Reference, check_inputs


def caption(predictions: list[str], references: list[Reference], **_) -> tuple[float, list[float]]:
    """Caption score (0-100): the mean of the corpus-level BLEU-1..4, METEOR, ROUGE-L (each x100) and
    CIDEr-D x10 (CIDEr-D is at most 10, so every term lies in 0-100 and the contract's 0-100 scale holds;
    the components, with CIDEr on the 0-1000 scale papers print, come from :func:`caption_metrics`).
    BLEU, ROUGE-L and CIDEr-D follow the COCO caption toolkit's definitions; METEOR is its exact-match
    module only (no stemming, synonyms or paraphrases), a lower bound of the toolkit's METEOR 1.5; see
    :mod:`cramcl.eval.caption_metrics` and docs/scorers.md.
    Per-record scores (0-100) are the mean of smoothed sentence BLEU-4, ROUGE-L and CIDEr-D x10 of each
    record, for inspection only (they do not average to the task score).
    """
    check_inputs("caption", predictions, references)
    comps = caption_metrics([str(p) for p in predictions], list(references))
    terms = [v / 10.0 if k == "CIDEr" else v for k, v in comps.items()]
    return sum(terms) / len(terms), caption_record_scores([str(p) for p in predictions], list(references))
