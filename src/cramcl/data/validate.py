"""``cramcl validate``: check a whole benchmark, every record and every image, before training.

Training reads images lazily, so a corrupt PNG at record 9,000 of task 5 would otherwise surface
an hour into a run. Validation decodes every image up front and returns all problems at once.
"""
from __future__ import annotations

from pathlib import Path

from cramcl.data.benchmark import Benchmark, load_benchmark
from cramcl.errors import BadInputError


def validate_benchmark(path: str | Path) -> tuple[Benchmark | None, list[str]]:
    """Check every record and open every image (PIL verify + load) of the benchmark at ``path``.

    Returns ``(benchmark, [])`` when all is well, else ``(None, problems)`` with one line per problem
    naming the file, the record and what is wrong. Never raises for bad input.
    """
    try:
        bench = load_benchmark(path, check_images=True)
    except BadInputError as exc:
        return None, list(exc.problems)
    return bench, []


def summarize(bench: Benchmark) -> list[str]:
    """One line per task (for the CLI): name, the scorer it will use with its settings, split sizes; plus
    the pretrain corpus."""
    lines = [f"{bench.name}: {len(bench.tasks)} tasks, images under {bench.image_root}"]
    for i, task in enumerate(bench.tasks, start=1):
        lines.append(f"  {i}. {task.name:<12} scorer={task.scorer_label:<8} "
                     f"train={len(task.train):>6}  test={len(task.test):>6}")
    if bench.pretrain_file is not None:
        lines.append(f"  pretrain: {bench.pretrain_file}")
    if bench.pretrain_first_file is not None:
        lines.append(f"  pretrain_first: {bench.pretrain_first_file} (trained alone first when "
                     "backbone.base_first_steps > 0)")
    return lines
