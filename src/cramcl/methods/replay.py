"""`replay`: sequential LoRA (lora-ft) plus a small buffer of earlier tasks' training records (uses old data).

Source: the field's replay baseline as LAMDA-CL/Prism and MCITlib run it (their replay baseline: a fixed-size
buffer of earlier tasks' samples mixed into later tasks' training); no single original. Results depend
strongly on the buffer size (docs/peers.md, "Replay"), so the size is one setting and every report states it.

Buffer size: ``buffer``, either a fraction of the stream's training records or a number of records:
* a number in [0, 1), or a percentage such as ``"10%"``: that share of every task's training records summed
  (at least 1 record when > 0), fixed once at the first task. Default 0.02 (2%): 4 records for two
  quick-profile tasks (96 records each), 110 for the default profile's 11 built-in tasks (500 each);
* a whole number >= 1: that many records (``buffer=500``); 0 means no buffer.
A number >= 1 that is not whole (``1.5``) is refused: it is neither. ``buffer_size`` (records) and
``buffer_fraction`` are the older spelling, kept so that runs saved before ``buffer`` existed resume
unchanged; when either is set it decides (``buffer_size`` first) and ``buffer`` must stay at its default.
Prism keeps 180 records in all (``buffer=180``), far below 1% of a UCIT task.

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

Where we differ from Prism / MCITlib: their buffer policies (which records, how they are mixed) vary by port;
ours is the per-task equal quota above, the LoRA sits on q, k, v, o (the adapted set every method shares).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from cramcl.errors import BadInputError
from cramcl.methods.base import Services
from cramcl.methods.lora_ft import LoraFT, LoraFTConfig


DEFAULT_BUFFER = 0.02


def buffer_spec(value) -> tuple[str, float]:
    """``buffer`` -> ("fraction", f in [0, 1]) or ("records", n >= 0); ValueError with the reason otherwise.

    0.1 and "10%" are fractions of the stream; 500 is records; 1.5 is neither."""
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                pct = None
            if pct is not None and 0 <= pct <= 100:
                return "fraction", pct / 100.0
        raise ValueError(f"{value!r} is neither a fraction of the stream (0.1 or '10%') nor a number of records")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is neither a fraction of the stream (0.1 or '10%') nor a number of records")
    if value < 0:
        raise ValueError(f"{value!r} must be >= 0")
    if isinstance(value, int):
        return "records", value
    if value < 1:
        return "fraction", float(value)
    if value == int(value):
        raise ValueError(f"{value!r} is ambiguous: write {int(value)} for that many records or a fraction below 1")
    raise ValueError(f"{value!r} is neither a fraction of the stream below 1 nor a whole number of records")


@dataclass
class ReplayConfig(LoraFTConfig):
    buffer: int | float | str = DEFAULT_BUFFER  # a fraction of the stream (0.1, "10%") or records (500)
    buffer_size: int | None = None  # older spelling: records (decides when set)
    buffer_fraction: float | None = None  # older spelling: a fraction (decides when set and buffer_size is not)

    def buffer_in_effect(self) -> tuple[str, float]:
        """("records", n) or ("fraction", f): the older spelling when set, else ``buffer``."""
        if self.buffer_size is not None:
            return "records", self.buffer_size
        if self.buffer_fraction is not None:
            return "fraction", self.buffer_fraction
        return buffer_spec(self.buffer)

    def problems(self) -> list[str]:
        """Settings out of range, one line each (checked when the config is resolved)."""
        out = []
        try:
            buffer_spec(self.buffer)
        except ValueError as e:
            out.append(f"buffer: {e}")
        if self.buffer_size is not None and self.buffer_size < 0:
            out.append(f"buffer_size: {self.buffer_size!r} must be >= 0")
        if self.buffer_fraction is not None and not 0 <= self.buffer_fraction <= 1:
            out.append(f"buffer_fraction: {self.buffer_fraction!r} must be in [0, 1]")
        if (self.buffer_size is not None or self.buffer_fraction is not None) and self.buffer != DEFAULT_BUFFER:
            out.append(f"buffer: {self.buffer!r} and the older buffer_size / buffer_fraction are both set: "
                       "set only buffer")
        if not 0 <= self.dropout < 1:
            out.append(f"dropout: {self.dropout!r} must be in [0, 1)")
        return out


def equal_quotas(size: int, num_tasks: int) -> list[int]:
    """Slots per task when ``size`` slots are dealt round-robin over ``num_tasks`` tasks (earliest first)."""
    return [max(0, math.ceil((size - i) / num_tasks)) for i in range(num_tasks)]


def fraction_capacity(fraction: float, n_records: int) -> int:
    """Buffer records for ``fraction`` of ``n_records``: rounded, at least 1 unless the fraction is 0."""
    return 0 if fraction == 0 else max(1, round(fraction * n_records))


class Replay(LoraFT):
    name = "replay"

    def __init__(self, config: ReplayConfig):
        super().__init__(config)
        problems = config.problems()
        if problems:
            raise BadInputError([f"method.{p}" for p in problems])
        kind, amount = config.buffer_in_effect()
        self._fraction = amount if kind == "fraction" else None
        self.capacity: int | None = int(amount) if kind == "records" else None
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
            self.capacity = fraction_capacity(self._fraction, sum(len(t.train) for t in stream))
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
            self.capacity = fraction_capacity(self._fraction, len(task.train))
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
