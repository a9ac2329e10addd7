"""Batches of a real MLLM, built from image files by the model's own processor: the CPU-heavy half of the data
path, kept in a small picklable object so that DataLoader workers can run it (the model never travels).

``HFCollator(records, train)`` returns the processor's tensors (``pixel_values``, ``image_grid_thw``, ...
whatever the architecture takes), ``input_ids`` with the chat template's prompt (+ answer and end-of-turn,
``labels`` on those only, when ``train``), ``image_mask`` (B, L) at the image-token positions, and ``records``.
Training rows are right-padded (positions as in an unpadded forward), prompt rows left-padded (generation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cramcl.backbones.hf.chat import IGNORE, ChatFormat, pad_rows, split_rows
from cramcl.data.records import Record, open_rgb

TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")  # per-token processor outputs some models take


@dataclass
class HFCollator:
    processor: object
    chat: ChatFormat
    forward_keys: frozenset[str]  # what the model's forward accepts
    pad_token_id: int
    image_token_id: int
    dtype: torch.dtype  # floating processor outputs (pixel values) are cast to the model's dtype here
    max_length: int
    processor_kwargs: dict

    def encode_prompts(self, records: list[Record]) -> dict:
        images = [open_rgb(r.image) for r in records]
        prompts = [self.chat.prompt(r.question) for r in records]
        kwargs = dict(self.processor_kwargs)
        if all(self.chat.writes_bos(p) for p in prompts):
            kwargs.setdefault("add_special_tokens", False)
        return self.processor(text=prompts, images=[[im] for im in images], padding=True, return_tensors="pt",
                              **kwargs)

    def __call__(self, records: list[Record], train: bool) -> dict:
        enc = self.encode_prompts(records)
        token_keys = ["input_ids", *(k for k in TOKEN_KEYS if k in enc and k in self.forward_keys)]
        rows = split_rows(enc, token_keys)
        if train:
            for row, r in zip(rows, records):
                target = self.chat.completion_ids(r.question, r.answer)
                target = target[:max(1, self.max_length - len(row["input_ids"]))]
                row["labels"] = [IGNORE] * len(row["input_ids"]) + target
                row["input_ids"] = row["input_ids"] + target
                for k in token_keys[1:]:
                    row[k] = row[k] + [0] * len(target)
        pads = {"input_ids": self.pad_token_id, **{k: 0 for k in token_keys[1:]}}
        if train:
            pads["labels"] = IGNORE
        batch = pad_rows(rows, pads, left=not train)
        for k, v in enc.items():
            if k in token_keys or k == "attention_mask" or k not in self.forward_keys or not torch.is_tensor(v):
                continue
            batch[k] = v.to(self.dtype) if v.is_floating_point() else v
        batch["image_mask"] = batch["input_ids"] == self.image_token_id
        batch["records"] = records
        return batch
