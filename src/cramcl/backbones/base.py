"""What the runner and the methods need from a backbone (the embedded `tiny` one or a real `hf` one)."""
from __future__ import annotations

from typing import Callable, Protocol

from torch import Tensor, nn

from cramcl.data.records import Record


class Backbone(Protocol):
    model: nn.Module  # forward(**tensors of a batch) -> output with .loss
    num_layers: int

    @property
    def language_model(self) -> nn.Module:
        """The LLM whose attention projections get adapters (never the vision side)."""

    def prepare(self, records: list[Record], desc: str = "") -> None:
        """Compute and cache whatever per-image work the batches need (e.g. vision features)."""

    def collate(self, records: list[Record], train: bool) -> dict:
        """Tensors of a batch (``input_ids``, ``attention_mask``, ``image_mask``, [``labels``], ...) plus
        ``records``. ``image_mask`` (B, L) marks image-token positions."""

    def generate(self, model: nn.Module, batch: dict, on_step: Callable[[], None] | None = None) -> list[str]:
        """Batched greedy decoding of the answers of a prompt batch (``train=False``)."""

    def pooled_image_features(self, records: list[Record]) -> Tensor:
        """(B, D) a frozen pooled image embedding (the embedded default's routing image features)."""

    def describe(self) -> dict:
        """Name, sizes and versions for env.json and ``cramcl inspect``."""
