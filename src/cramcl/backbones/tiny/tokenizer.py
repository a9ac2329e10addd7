"""A word-level tokenizer (HF ``tokenizers``) built from the text of the stream and the base corpus.

Words are whitespace-separated chunks, kept whole and case-sensitive: "top-left", "don't", "3.5" and "A"
are one token each, so every answer round-trips (``decode_words(encode(x)) == x`` up to runs of
whitespace) and a model learns it as one token followed by ``<eos>``. Splitting punctuation off would
turn "top-left" into "top - left", which a greedy decoder can loop on.
"""
from __future__ import annotations

import hashlib

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

PAD, BOS, EOS, UNK, IMAGE, SEP = "<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<sep>"
SPECIALS = [PAD, BOS, EOS, UNK, IMAGE, SEP]


def build_word_tokenizer(texts: list[str]) -> Tokenizer:
    """Whitespace-separated words (NFKC-normalised, case and punctuation kept); every word of ``texts``
    gets an id (min frequency 1)."""
    tok = Tokenizer(WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1, show_progress=False)
    # sorted unique texts: the vocabulary (and so the cache key of the base stage) is order-independent
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    return tok


def tokenizer_digest(tok: Tokenizer) -> str:
    return hashlib.sha1(tok.to_str().encode()).hexdigest()[:16]


def decode_words(tok: Tokenizer, ids: list[int]) -> str:
    """Ids -> text, stopping at <eos>, joining words with spaces."""
    eos = tok.token_to_id(EOS)
    out = []
    for i in ids:
        if i == eos:
            break
        out.append(i)
    return tok.decode(out, skip_special_tokens=True).strip()
