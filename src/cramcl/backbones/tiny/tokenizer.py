"""A word-level tokenizer (HF ``tokenizers``) built from the text of the stream and the base corpus."""
from __future__ import annotations

import hashlib

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

PAD, BOS, EOS, UNK, IMAGE, SEP = "<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<sep>"
SPECIALS = [PAD, BOS, EOS, UNK, IMAGE, SEP]


def build_word_tokenizer(texts: list[str]) -> Tokenizer:
    """Lower-cased words and punctuation; every word of ``texts`` gets an id (min frequency 1)."""
    tok = Tokenizer(WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=False)])
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
