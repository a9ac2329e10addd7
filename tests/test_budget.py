"""Step budgets: ``train.epochs_per_task`` beside ``train.steps_per_task``, the global batch, the paper profile."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from cramcl.config import TrainConfig, resolve_config
from cramcl.engine.budget import budget_problems, global_batch, steps_for_epochs, task_steps
from conftest import LogSink, assert_refused, quick_config


def _train(**kw) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **kw)


@pytest.mark.parametrize("n, epochs, batch, steps", [
    (500, 1, 32, 16),      # 15.6 -> 16: the last batch is filled from the next pass
    (512, 1, 32, 16),      # exact: no extra step
    (96, 0.5, 16, 3),
    (40000, 1, 64, 625),   # a UCIT task under the paper protocol on 8 GPUs
    (1, 1, 64, 1),         # at least one step
    (100, 3, 7, 43),       # ceil(300 / 7)
])
def test_steps_for_epochs_is_ceil_of_records_times_epochs_over_global_batch(n, epochs, batch, steps):
    assert steps_for_epochs(n, epochs, batch) == steps


def test_task_steps_counts_processes_and_accumulation_in_the_global_batch():
    train = _train(steps_per_task=None, epochs_per_task=1.0, batch_size=8, grad_accum=2)
    assert global_batch(train, 4) == 64
    assert task_steps(train, 640, 4) == 10
    assert task_steps(train, 640, 1) == 40  # 8 x 1 x 2 = 16 a step
    assert [task_steps(train, n, 4) for n in (64, 65, 1000)] == [1, 2, 16]  # tasks of different sizes
    fixed = _train(steps_per_task=7, epochs_per_task=None)
    assert [task_steps(fixed, n, 4) for n in (1, 640, 10 ** 6)] == [7, 7, 7]  # a fixed budget ignores sizes


def test_exactly_one_budget_must_be_set():
    assert budget_problems(_train(steps_per_task=5, epochs_per_task=None)) == []
    assert budget_problems(_train(steps_per_task=None, epochs_per_task=2.0)) == []
    assert "both set" in budget_problems(_train(steps_per_task=5, epochs_per_task=1.0))[0]
    assert "both null" in budget_problems(_train(steps_per_task=None, epochs_per_task=None))[0]


@pytest.mark.parametrize("overrides, message", [
    (["train.epochs_per_task=1"], "train.steps_per_task (12) and train.epochs_per_task (1.0) are both set"),
    (["train.steps_per_task=null"], "are both null"),
    (["train.steps_per_task=null", "train.epochs_per_task=0"], "train.epochs_per_task: 0.0 must be > 0"),
    (["train.steps_per_task=null", "train.epochs_per_task=-1"], "train.epochs_per_task: -1.0 must be > 0"),
])
def test_budget_settings_are_checked_with_one_line_errors(overrides, message):
    assert_refused("lora-ft", overrides, message)


def test_paper_profile_is_the_cram_papers_protocol():
    """docs/cram.md "Training defaults": lr 2e-4, cosine, warm-up 0.03, 1 epoch a task, 8 per device, bf16."""
    train = resolve_config(method="cram", profile="paper").train
    assert (train.steps_per_task, train.epochs_per_task, train.batch_size, train.lr, train.scheduler,
            train.warmup_ratio, train.mixed_precision) == (None, 1.0, 8, 2e-4, "cosine", 0.03, "bf16")


def test_backbone_files_select_the_paper_protocol():
    from cramcl.config import CONFIG_DIR

    files = sorted((CONFIG_DIR / "backbones").glob("*.yaml"))
    assert files
    for path in files:
        cfg = resolve_config(method="cram", config_file=str(path))
        assert cfg.profile == "paper", path.name
        assert (cfg.train.epochs_per_task, cfg.train.steps_per_task, cfg.train.batch_size) == (1.0, None, 8), path.name
    # --profile still wins over the file's choice
    assert resolve_config(method="cram", profile="default", config_file=str(files[0])).train.steps_per_task == 100


def test_mtl_trains_the_sum_of_every_tasks_epoch_budget():
    from cramcl.methods.mtl import MultiTask, MultiTaskConfig

    m = MultiTask(MultiTaskConfig())
    train = _train(steps_per_task=None, epochs_per_task=1.0, batch_size=10, grad_accum=1)
    m.services = SimpleNamespace(run_config=SimpleNamespace(train=train))
    stream = [SimpleNamespace(train=[0] * n) for n in (100, 25, 7)]
    m.training_records(0, stream[0], stream)
    assert m.phases(0, 10)[0].steps == 10 + 3 + 1
    m.services.run_config.train = _train(steps_per_task=5, epochs_per_task=None)
    assert m.phases(0, 5)[0].steps == 15  # a fixed budget: steps_per_task x tasks


def test_cram_refuses_an_epoch_budget_too_small_for_its_two_phases():
    from cramcl.errors import BadInputError
    from cramcl.methods.cram import Cram, CramConfig

    assert [p.steps for p in Cram(CramConfig()).phases(0, 2)] == [1, 1]
    with pytest.raises(BadInputError, match="task 3: 1 optimizer step is too few for cram"):
        Cram(CramConfig()).phases(3, 1)
    assert [p.steps for p in Cram(CramConfig(no_warmup=True)).phases(3, 1)] == [1]


def test_epoch_budget_runs_each_tasks_own_steps_and_records_them(tmp_path, warm_cache, monkeypatch):
    """Two tasks of 96 and 40 records at a global batch of 16 and 0.5 epochs: 3 and 2 steps, in metrics.json."""
    import cramcl.engine.session as session_mod
    from cramcl.engine.runner import run_stream

    opened = session_mod.open_session

    def shorter_second_task(*args, **kwargs):
        s = opened(*args, **kwargs)
        tasks = list(s.bench.tasks)
        tasks[1] = dataclasses.replace(tasks[1], train=tasks[1].train[:40])
        s.bench = dataclasses.replace(s.bench, tasks=tuple(tasks))
        return s

    monkeypatch.setattr(session_mod, "open_session", shorter_second_task)
    cfg = quick_config("lora-ft", ["data.tasks=shape,colour", "train.steps_per_task=null",
                                   "train.epochs_per_task=0.5", "train.batch_size=8", "train.grad_accum=2"])
    run_stream(cfg, tmp_path / "run", log=LogSink())
    metrics = json.loads((tmp_path / "run" / "results" / "metrics.json").read_text())
    assert metrics["budget"] == {"steps_per_task": [3, 2], "epochs_per_task": 0.5, "global_batch_size": 16}
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert (env["global_batch_size"], env["epochs_per_task"]) == (16, 0.5)
