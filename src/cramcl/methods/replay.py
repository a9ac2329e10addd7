"""`replay`: sequential LoRA (lora-ft) plus a small buffer of earlier tasks' training records.

Buffer size: ``buffer_size`` records when set; by default (``buffer_size: null``) 2% of the stream's
training records (``buffer_fraction = 0.02``, at least 1), fixed once at the first task: 4 records for two
quick-profile tasks (96 records each), 70 for the default profile's 7 built-in tasks (500 each).

Policy: per-task equal quota. After task t the buffer holds, of each finished task i in 0..t, a random
subset of ceil((size - i) / (t + 1)) records (the slots dealt round-robin, so the earliest tasks get the
remainder; a task smaller than its quota keeps all of its records). A task's subset is a prefix of a
permutation of its record ids seeded by (run seed, task name), so the shares only shrink as tasks arrive
and every process (and a resumed run) picks the same records. The buffer never exceeds its size.

Mixing: task t (t > 0) trains on its own records plus every buffered record (of tasks < t only),
concatenated; the trainer's shuffled batches draw from that union, so replay takes about
size / (size + |task t|) of each batch. The buffer is method state: ``meta["replay"]`` stores its size and
[task name, [record ids]] per task; after a load the records are resolved lazily from the stream's tasks
at the next ``training_records`` call.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from cramcl.errors import BadInputError
from cramcl.methods.base import Services
from cramcl.methods.lora_ft import LoraFT, LoraFTConfig


@dataclass
class ReplayConfig(LoraFTConfig):
    buffer_size: int | None = None  # records; None: buffer_fraction of the stream's training records
    buffer_fraction: float = 0.02


def equal_quotas(size: int, num_tasks: int) -> list[int]:
    """Slots per task when ``size`` slots are dealt round-robin over ``num_tasks`` tasks (earliest first)."""
    return [max(0, math.ceil((size - i) / num_tasks)) for i in range(num_tasks)]


class Replay(LoraFT):
    name = "replay"

    def __init__(self, config: ReplayConfig):
        super().__init__(config)
        if config.buffer_size is not None and config.buffer_size < 0:
            raise BadInputError(f"method.buffer_size: must be >= 0, got {config.buffer_size}")
        if not 0.0 <= config.buffer_fraction <= 1.0:
            raise BadInputError(f"method.buffer_fraction: must be in [0, 1], got {config.buffer_fraction}")
        self.capacity: int | None = config.buffer_size
        self.buffer: dict[str, list[str]] = {}  # task name -> buffered record ids (tasks in stream order)
        self._records: dict[tuple[str, str], object] = {}  # (task name, record id) -> record
        self._task = None
        self._seed = 0

    def setup(self, services: Services) -> None:
        super().setup(services)
        self._seed = int(getattr(services.run_config, "seed", 0))

    def before_task(self, task_index: int, task) -> None:
        super().before_task(task_index, task)  # lora-ft: its one LoRA trains (also after a resume)
        self._task = task
        self._remember(task)

    def _remember(self, task) -> None:
        for record in task.train:
            self._records[(task.name, record.id)] = record

    def training_records(self, task_index: int, task, stream: list) -> list:
        if self.capacity is None:
            total = sum(len(t.train) for t in stream)
            self.capacity = max(1, round(self.cfg.buffer_fraction * total))
        for t in stream:
            if t.name in self.buffer:
                self._remember(t)
        return list(task.train) + self.buffer_records()

    def buffer_records(self) -> list:
        """The buffered records, task by task (resolved from the tasks seen or the stream)."""
        out = []
        for name, ids in self.buffer.items():
            for rid in ids:
                record = self._records.get((name, rid))
                if record is None:
                    raise BadInputError(f"replay buffer: record '{rid}' of task '{name}' is not in the stream "
                                        "(did the benchmark change since the checkpoint?)")
                out.append(record)
        return out

    def after_task(self, task_index: int) -> None:
        super().after_task(task_index)
        task, self._task = self._task, None
        self.current_task = None
        if task is None or task.name in self.buffer:
            return
        if self.capacity is None:  # training_records was not called: size from this task alone
            self.capacity = self.cfg.buffer_size if self.cfg.buffer_size is not None else \
                max(1, round(self.cfg.buffer_fraction * len(task.train)))
        ids = [r.id for r in task.train]
        random.Random(f"{self._seed}:{task.name}").shuffle(ids)
        self.buffer[task.name] = ids
        quotas = equal_quotas(self.capacity, len(self.buffer))
        for (name, kept), quota in zip(list(self.buffer.items()), quotas):
            self.buffer[name] = kept[:quota]  # shares only shrink: a prefix of the task's permutation

    def buffer_size_now(self) -> int:
        return sum(len(ids) for ids in self.buffer.values())

    # ---- state
    def state(self):
        tensors, meta = super().state()
        meta["replay"] = {"capacity": self.capacity, "seed": self._seed,
                          "buffer": [[name, list(ids)] for name, ids in self.buffer.items()]}
        return tensors, meta

    def load_state(self, tensors, meta) -> None:
        super().load_state(tensors, meta)
        info = meta["replay"]
        self.capacity = info["capacity"]
        self._seed = int(info.get("seed", self._seed))
        self.buffer = {name: list(ids) for name, ids in info["buffer"]}
        self._records = {}  # resolved from the stream at the next training_records call

    def report_sections(self) -> list[tuple[str, str]]:
        rows = ", ".join(f"{name}: {len(ids)}" for name, ids in self.buffer.items()) or "empty"
        return [("Replay buffer", f"size {self.capacity} records (per-task equal quota); now holds "
                 f"{self.buffer_size_now()}: {rows}.")]
