"""`zero-shot`: the frozen base, no training (a floor for every table).

Source: the field's zero-shot row (``config/methods/zeroshot.py`` in LAMDA-CL/Prism and its CRAM fork;
docs/peers.md, "Bounds: MTL, oracle-LoRA, LoRA-FT, zero-shot"). Nothing differs: the base is evaluated after
every task exactly as the trained methods are.
"""
from __future__ import annotations

from dataclasses import dataclass

from cramcl.methods.base import Method, Phase


@dataclass
class ZeroShotConfig:
    pass


class ZeroShot(Method):
    name = "zero-shot"

    def phases(self, task_index: int, total_steps: int) -> list[Phase]:
        return []  # nothing trains
