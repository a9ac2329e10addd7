"""The run's record as it grows task by task: the accuracy matrix so far, times, parameter counts, steps.

It is saved as ``runner.json`` in every task checkpoint and read back on resume; results/matrix.json and
results/metrics.json are made from it (engine/results.py). :meth:`RunRecord.to_json` writes the keys in a
fixed order; the last three are left out while unset, as checkpoints without them were written, and
:meth:`RunRecord.from_json` reads such a checkpoint with them unset.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunRecord:
    """Per-task lists are indexed by task; ``scores[t][i]``: task ``i``'s score after training task ``t``
    (None where not evaluated yet)."""

    tasks: list[str]
    scores: list[list[float | None]]
    time_train: list[float | None]  # seconds of training per task
    time_eval: list[float | None]  # seconds of the evaluation after each task
    trainable_per_task: list[int | None]  # distinct parameters that trained during each task
    global_step: int  # optimizer steps of every task so far
    scorers: dict[str, str]  # task name -> its scorer's label
    global_batch_size: int | None = None  # records per optimizer step
    steps_per_task: list[int | None] | None = None  # optimizer steps each task ran
    skipped_steps: list[int] | None = None  # per task: steps dropped for a non-finite value (train.nonfinite=skip)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept and written back

    _OPTIONAL = ("global_batch_size", "steps_per_task", "skipped_steps")
    _REQUIRED = ("tasks", "scores", "time_train", "time_eval", "trainable_per_task", "global_step", "scorers")

    @classmethod
    def start(cls, tasks) -> RunRecord:
        """The record of a run over ``tasks`` (objects with ``name`` and ``scorer_label``) before any task."""
        n = len(tasks)
        return cls(tasks=[t.name for t in tasks], scores=[[None] * n for _ in range(n)], time_train=[None] * n,
                   time_eval=[None] * n, trainable_per_task=[None] * n, global_step=0,
                   scorers={t.name: t.scorer_label for t in tasks})

    def record_training(self, t: int, steps: int, seconds: float, trained_params: int, skipped: int) -> None:
        """What training task ``t`` did (engine/trainer.py's TaskTrainResult)."""
        n = len(self.tasks)
        self.global_step += steps
        self.time_train[t] = seconds
        if self.steps_per_task is None:
            self.steps_per_task = [None] * n
        self.steps_per_task[t] = steps
        self.trainable_per_task[t] = trained_params
        if self.skipped_steps is None:
            self.skipped_steps = [0] * n
        self.skipped_steps[t] = skipped

    def to_json(self) -> dict:
        """The ``runner.json`` object."""
        data = {k: getattr(self, k) for k in self._REQUIRED}
        data.update({k: getattr(self, k) for k in self._OPTIONAL if getattr(self, k) is not None})
        data.update(self.extra)
        return data

    @classmethod
    def from_json(cls, data: dict) -> RunRecord:
        """A record from a ``runner.json`` object (the optional keys may be missing)."""
        known = {*cls._REQUIRED, *cls._OPTIONAL}
        return cls(**{k: data[k] for k in cls._REQUIRED}, **{k: data.get(k) for k in cls._OPTIONAL},
                   extra={k: v for k, v in data.items() if k not in known})
