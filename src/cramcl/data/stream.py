"""The stream a run trains on: the built-in one (generated once into the cache) or a user benchmark."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cramcl.config import DataConfig
from cramcl.data.benchmark import Benchmark, load_benchmark
from cramcl.data.records import Record, read_records
from cramcl.errors import BadInputError


def builtin_benchmark_path(cfg: DataConfig) -> Path:
    from cramcl.backbones.tiny.vision import cache_root
    from cramcl.data.builtin import generate_builtin

    out = cache_root() / "builtin" / f"seed{cfg.builtin_seed}-train{cfg.builtin_n_train}-test{cfg.builtin_n_test}"
    return generate_builtin(out, seed=cfg.builtin_seed, n_train=cfg.builtin_n_train, n_test=cfg.builtin_n_test)


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
        bench = dataclasses.replace(bench, tasks=tuple(t for t in bench.tasks if t.name in cfg.tasks))
    return bench


def base_corpus(bench: Benchmark, cfg: DataConfig) -> list[Record]:
    """Captions for the tiny backbone's base stage: the benchmark's own `pretrain:` file, else the built-in one."""
    if bench.pretrain_file is not None:
        path, root = bench.pretrain_file, bench.image_root
    else:
        builtin = load_benchmark(builtin_benchmark_path(cfg))
        path, root = builtin.pretrain_file, builtin.image_root
    records, problems = read_records(path, root)
    if problems:
        raise BadInputError(problems)
    return records
