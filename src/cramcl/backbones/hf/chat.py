"""Prompts and training targets from the processor's own chat template.

One record = one user turn (an image and the question) and one assistant turn (the answer):

    prompt     = template([user], add_generation_prompt=True)           what generation sees
    completion = template([user, assistant])[len(prompt):]             the answer as the template writes it

Where the full conversation does not extend the prompt (LLaVA-OneVision's template opens the assistant turn
with "assistant \n" after a user turn but its generation prompt with "assistant\n"), the completion is the
answer as the template writes it to the end of the turn. It is cut after its first stop token (``<|im_end|>``,
``<end_of_utterance>``, ``<end_of_turn>``, ...), and the eos token is appended when the template writes none
(LLaVA-1.5's ends the answer with a space), so the labels are exactly "answer + end-of-turn". The completion is
tokenized jointly with the prompt text when that keeps the prompt's tokens unchanged (what a user's fine-tuning
sees), else on its own. A template that writes the bos itself (Gemma 3, Idefics3) has its prompts tokenized
without the tokenizer's special tokens (``writes_bos``), as transformers' own ``apply_chat_template`` does, so
that no second bos follows. Rows are right-padded for training and left-padded for generation.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from cramcl.errors import BadInputError

IGNORE = -100


def _user(question: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def _assistant(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


class ChatFormat:
    """Renders prompts and answer token ids for one processor; caches per question / (question, answer)."""

    def __init__(self, processor, stop_ids: list[int], eos_id: int, where: str):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.stop_ids = set(stop_ids)
        self.eos_id = eos_id
        template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise BadInputError(f"{where}: the processor has no chat template (chat_template.jinja); "
                                "cramcl builds prompts with the model's own template")
        self._apply = processor.apply_chat_template if getattr(processor, "chat_template", None) \
            else self.tokenizer.apply_chat_template
        self._prompts: dict[str, str] = {}

    def prompt(self, question: str) -> str:
        """The generation prompt (image placeholder included, not yet expanded) of one question."""
        if question not in self._prompts:
            self._prompts[question] = self._apply([_user(question)], add_generation_prompt=True, tokenize=False)
        return self._prompts[question]

    def completion_text(self, question: str, answer: str) -> str:
        """The assistant turn as the template writes it after the generation prompt (trailing space cut)."""
        prompt = self.prompt(question)
        full = self._apply([_user(question), _assistant(answer)], add_generation_prompt=False, tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):].rstrip()
        # the assistant turn's header differs from the generation prompt's: from the answer to the turn's end
        at = full.find(answer, len(os.path.commonprefix([prompt, full]))) if answer else -1
        return (full[at:] if at >= 0 else answer).rstrip()

    def writes_bos(self, prompt: str) -> bool:
        """Whether the template wrote the bos token at the start of ``prompt`` (then the tokenizer must not)."""
        bos = self.tokenizer.bos_token
        return bool(bos) and prompt.startswith(bos)

    def completion_ids(self, question: str, answer: str) -> list[int]:
        """Token ids of ``answer`` + one stop token (labels: exactly these)."""
        prompt, completion = self.prompt(question), self.completion_text(question, answer)
        enc = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        p_ids, joint = enc(prompt), enc(prompt + completion)
        ids = joint[len(p_ids):] if joint[:len(p_ids)] == p_ids else enc(completion)
        for k, tok in enumerate(ids):
            if tok in self.stop_ids:
                return ids[:k + 1]
        return ids + [self.eos_id]


def split_rows(enc: dict, keys: list[str]) -> list[dict[str, list[int]]]:
    """Per row, the unpadded values of the per-token ``keys`` of a padded processor batch."""
    mask = enc["attention_mask"].bool()
    return [{k: enc[k][i][mask[i]].tolist() for k in keys} for i in range(mask.shape[0])]


def pad_rows(rows: list[dict[str, list[int]]], pad_values: dict[str, int], left: bool) -> dict[str, Tensor]:
    """Stack variable-length rows into (B, L) tensors; ``attention_mask`` is 1 on real tokens."""
    B, L = len(rows), max(len(r["input_ids"]) for r in rows)
    out = {k: torch.full((B, L), v, dtype=torch.long) for k, v in pad_values.items()}
    out["attention_mask"] = torch.zeros((B, L), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        sl = slice(L - n, L) if left else slice(0, n)
        for k in pad_values:
            out[k][i, sl] = torch.tensor(row[k], dtype=torch.long)
        out["attention_mask"][i, sl] = 1
    return out
