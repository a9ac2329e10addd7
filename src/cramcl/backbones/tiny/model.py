"""The embedded MLLM: cached EfficientNet tokens -> MLP projector -> a transformers ``LlamaForCausalLM``.

Sequence layout (left-padded, LLaVA-style image placeholders):
    <pad>* <image> x n_img  <bos> question <sep> answer <eos>
Labels cover the answer and its <eos> only.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from cramcl.backbones.tiny.tokenizer import BOS, EOS, IMAGE, PAD, SEP
from cramcl.backbones.tiny.vision import FEATURE_DIM


def make_projector(hidden_size: int = 256) -> nn.Module:
    """The MLP from EfficientNet tokens to LM embeddings: (..., FEATURE_DIM) -> (..., hidden_size)."""
    return nn.Sequential(nn.Linear(FEATURE_DIM, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


class TinyVLM(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
                 intermediate_size: int = 1024, max_positions: int = 256):
        super().__init__()
        self.projector = make_projector(hidden_size)
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, num_key_value_heads=num_heads,
                             intermediate_size=intermediate_size, max_position_embeddings=max_positions,
                             tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        self.lm = LlamaForCausalLM(config)

    @property
    def language_model(self) -> nn.Module:
        return self.lm

    def embed(self, input_ids: Tensor, image_feats: Tensor, image_mask: Tensor) -> Tensor:
        """input_ids: (B, L); image_feats: (B, n_img, 1280); image_mask: (B, L) bool with n_img Trues per row."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, L, H)
        projected = self.projector(image_feats.to(embeds.dtype))  # (B, n_img, H)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), projected.reshape(-1, projected.shape[-1]))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image_feats: Tensor, image_mask: Tensor,
                labels: Tensor | None = None):
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.lm(inputs_embeds=self.embed(input_ids, image_feats, image_mask), attention_mask=attention_mask,
                       position_ids=position_ids, labels=labels, use_cache=False)

    @torch.no_grad()
    def greedy_generate(self, input_ids: Tensor, attention_mask: Tensor, image_feats: Tensor, image_mask: Tensor,
                        max_new_tokens: int, eos_id: int, on_step=None) -> Tensor:
        """Batched greedy decoding on left-padded prompts with a KV cache; returns (B, <= max_new_tokens) ids.

        ``on_step`` is called before every forward (methods may refresh routing state there)."""
        B = input_ids.shape[0]
        embeds = self.embed(input_ids, image_feats, image_mask)
        mask = attention_mask.clone()
        out = torch.full((B, max_new_tokens), eos_id, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        past = None
        for step in range(max_new_tokens):
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            if past is not None:
                position_ids = position_ids[:, -1:]
            result = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                             past_key_values=past, use_cache=True)
            past = result.past_key_values
            next_ids = result.logits[:, -1].argmax(-1)
            next_ids = torch.where(done, torch.full_like(next_ids, eos_id), next_ids)
            out[:, step] = next_ids
            done |= next_ids == eos_id
            if bool(done.all()):
                return out[:, : step + 1]
            embeds = self.lm.get_input_embeddings()(next_ids).unsqueeze(1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        return out


class Encoder:
    """Text <-> ids for TinyVLM: builds left-padded training and prompt batches."""

    def __init__(self, tokenizer: Tokenizer, n_image_tokens: int, max_text_len: int = 48):
        self.tok = tokenizer
        self.n_image_tokens = n_image_tokens
        self.max_text_len = max_text_len
        ids = {name: tokenizer.token_to_id(name) for name in (PAD, BOS, EOS, IMAGE, SEP)}
        self.pad_id, self.bos_id, self.eos_id, self.image_id, self.sep_id = (
            ids[PAD], ids[BOS], ids[EOS], ids[IMAGE], ids[SEP])

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text).ids[: self.max_text_len]

    def build(self, questions: list[str], answers: list[str] | None) -> dict[str, Tensor]:
        """Left-padded batch. With answers: labels on the answer + <eos>; without: prompts for generation."""
        rows, label_rows = [], []
        for i, q in enumerate(questions):
            prompt = [self.image_id] * self.n_image_tokens + [self.bos_id] + self._ids(q) + [self.sep_id]
            if answers is None:
                rows.append(prompt)
                continue
            target = self._ids(answers[i]) + [self.eos_id]
            rows.append(prompt + target)
            label_rows.append([-100] * len(prompt) + target)
        L = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), L), dtype=torch.long)
        labels = torch.full((len(rows), L), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, L - len(r):] = torch.tensor(r)
            attention[i, L - len(r):] = 1
            if answers is not None:
                labels[i, L - len(r):] = torch.tensor(label_rows[i])
        batch = {"input_ids": input_ids, "attention_mask": attention, "image_mask": input_ids == self.image_id}
        if answers is not None:
            batch["labels"] = labels
        return batch
