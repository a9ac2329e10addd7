"""The tiny backbone's word tokenizer: answers with hyphens, apostrophes, decimals and single letters
round-trip, and a tiny model learns to write them and stop."""
from __future__ import annotations

import pytest
import torch

from cramcl.backbones.tiny.model import Encoder, TinyVLM
from cramcl.backbones.tiny.tokenizer import build_word_tokenizer, decode_words

KINDS = {"hyphen": "top-left", "apostrophe": "don't", "decimal": "3.5", "single letter": "B"}
QUESTIONS = {kind: f"Give the {kind} answer." for kind in KINDS}


@pytest.mark.parametrize("kind", list(KINDS))
def test_answer_round_trips(kind):
    tok = build_word_tokenizer(list(QUESTIONS.values()) + list(KINDS.values()) + ["top right", "a b c"])
    answer = KINDS[kind]
    ids = tok.encode(answer).ids
    assert len(ids) == 1 and ids[0] != tok.token_to_id("<unk>")  # one known word, not split up
    assert decode_words(tok, ids) == answer
    both = f"{answer} and {answer}"
    assert decode_words(build_word_tokenizer([both]), build_word_tokenizer([both]).encode(both).ids) == both


def test_a_tiny_model_learns_to_write_each_kind_and_stop():
    """Text-only mapping question -> answer: after a short training, greedy decoding gives every answer
    exactly (it ends with <eos>, no repeated punctuation)."""
    torch.manual_seed(0)
    tok = build_word_tokenizer(list(QUESTIONS.values()) + list(KINDS.values()))
    enc = Encoder(tok, n_image_tokens=1)
    model = TinyVLM(tok.get_vocab_size(), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    qs, answers = list(QUESTIONS.values()), list(KINDS.values())
    batch = enc.build(qs, answers)
    feats = torch.zeros(len(qs), 1, 1280)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(**batch, image_feats=feats).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    prompt = enc.build(qs, None)
    ids = model.greedy_generate(prompt["input_ids"], prompt["attention_mask"], feats, prompt["image_mask"],
                                max_new_tokens=6, eos_id=enc.eos_id)
    assert [decode_words(tok, row.tolist()) for row in ids] == answers
