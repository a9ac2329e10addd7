"""The stream a run trains on: the built-in one (generated once into the cache) or a user benchmark."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cramcl.backbones.tiny.vision import cache_root
from cramcl.config import DataConfig
from cramcl.data.benchmark import Benchmark, load_benchmark
from cramcl.data.builtin import generate_builtin
from cramcl.data.records import Record, check_image, read_records
from cramcl.errors import BadInputError
from cramcl.utils.progress import bar as progress_bar


def builtin_benchmark_path(cfg: DataConfig, stream: str | None = None) -> Path:
    """The generated built-in stream ``stream`` (default: ``data.builtin_stream``) at the config's sizes."""
    stream = stream or cfg.builtin_stream
    name = "builtin" if stream == "main" else f"builtin-{stream}"
    out = cache_root() / name / f"seed{cfg.builtin_seed}-train{cfg.builtin_n_train}-test{cfg.builtin_n_test}"
    return generate_builtin(out, seed=cfg.builtin_seed, n_train=cfg.builtin_n_train, n_test=cfg.builtin_n_test,
                            stream=stream)


def load_stream(cfg: DataConfig) -> Benchmark:
    """The benchmark with the task subset and per-task caps of the config applied."""
    path = Path(cfg.benchmark) if cfg.benchmark else builtin_benchmark_path(cfg)
    bench = load_benchmark(path, max_train=cfg.max_train_per_task, max_test=cfg.max_test_per_task)
    if cfg.tasks:
        names = bench.task_names()
        unknown = [t for t in cfg.tasks if t not in names]
        if unknown:
            raise BadInputError([f"data.tasks: unknown task '{t}' in {path} (tasks: {', '.join(names)})"
                                 for t in unknown])
        repeated = sorted({t for t in cfg.tasks if cfg.tasks.count(t) > 1})
        if repeated:
            raise BadInputError(f"data.tasks: task '{repeated[0]}' is listed more than once")
        in_stream_order = [t for t in names if t in cfg.tasks]
        if list(cfg.tasks) != in_stream_order:  # the stream's order is the experiment: never silently reordered
            raise BadInputError(f"data.tasks: {','.join(cfg.tasks)} is not in the order of the stream {path}; a "
                                f"subset trains in the stream's order: data.tasks={','.join(in_stream_order)}")
        bench = dataclasses.replace(bench, tasks=tuple(t for t in bench.tasks if t.name in cfg.tasks))
    return bench


def check_stream_images(bench: Benchmark) -> None:
    """Decode every image of every task (each file once, with a progress bar); every unreadable one is bad
    input naming the image, the task, the split and the first record that uses it."""
    first_use: dict[Path, str] = {}
    for task in bench.tasks:
        for split, records in (("train", task.train), ("test", task.test)):
            for r in records:
                first_use.setdefault(r.image, f"task '{task.name}' {split} record '{r.id}'")
    problems = []
    for path in progress_bar(first_use, desc="checking images", unit="img", leave=False, disable=len(first_use) < 2000):
        why = check_image(path)
        if why:
            problems.append(f"{path}: unreadable image ({why}); used by {first_use[path]}")
    if problems:
        raise BadInputError(problems)


def base_corpora(bench: Benchmark, cfg: DataConfig) -> tuple[list[Record], list[Record]]:
    """(main, first): the tiny backbone's base-stage records, from the benchmark's own `pretrain:` (and
    `pretrain_first:`) files, else the main built-in stream's. ``first`` is empty without a `pretrain_first:` file."""
    source = bench if bench.pretrain_file is not None else load_benchmark(builtin_benchmark_path(cfg, "main"))
    corpora = []
    for path in (source.pretrain_file, source.pretrain_first_file):
        records, problems = read_records(path, source.image_root) if path is not None else ([], [])
        if problems:
            raise BadInputError(problems)
        corpora.append(records)
    return corpora[0], corpora[1]
