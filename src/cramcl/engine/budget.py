"""A task's optimizer-step budget: fixed (``train.steps_per_task``) or in epochs (``train.epochs_per_task``).

Exactly one of the two is set (the other ``null``). In epochs, a task of ``n`` training records gets

    steps = max(1, ceil(n * epochs_per_task / global_batch)),   global_batch = batch_size * world_size * grad_accum

so one epoch is the fewest optimizer steps that show every record once (the last global batch is filled from
the next shuffled pass, as the trainer's batches always are). ``n`` counts the task's own training records:
every method gets the same budget for a task (replay's buffer takes a share of those steps' batches, as with a
fixed budget; ``mtl`` trains once on the union for the sum of every task's budget).
"""
from __future__ import annotations

import math


def global_batch(train, world_size: int) -> int:
    """Records per optimizer step: ``train.batch_size * world_size * train.grad_accum``."""
    return int(train.batch_size) * int(world_size) * int(train.grad_accum)


def steps_for_epochs(n_records: int, epochs: float, batch: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``n_records`` at ``batch`` records a step (at least 1)."""
    if n_records < 0 or epochs <= 0 or batch < 1:
        raise ValueError(f"steps_for_epochs: need n_records >= 0, epochs > 0, batch >= 1 "
                         f"(got {n_records}, {epochs}, {batch})")
    return max(1, math.ceil(n_records * epochs / batch - 1e-9))  # 1e-9: 1.0000000002 epochs' float noise


def task_steps(train, n_records: int, world_size: int) -> int:
    """The optimizer steps of a task with ``n_records`` training records under ``train`` (a TrainConfig)."""
    if train.epochs_per_task is None:
        return int(train.steps_per_task)
    return steps_for_epochs(n_records, float(train.epochs_per_task), global_batch(train, world_size))


def budget_problems(train) -> list[str]:
    """One line per problem: exactly one of ``steps_per_task`` and ``epochs_per_task`` must be set."""
    steps, epochs = train.steps_per_task, train.epochs_per_task
    if steps is not None and epochs is not None:
        return [f"train.steps_per_task ({steps}) and train.epochs_per_task ({epochs}) are both set: set the "
                "one you do not want to null (e.g. train.steps_per_task=null train.epochs_per_task=1)"]
    if steps is None and epochs is None:
        return ["train.steps_per_task and train.epochs_per_task are both null: set one of them"]
    return []
