"""`zero-shot`: the frozen base, no training (a floor for every table)."""
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
