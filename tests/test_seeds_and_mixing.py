"""Mixed-task evaluation (the default) and several seeds per run / comparison."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import QUICK_TASKS, LogSink, quick_config

torch.set_num_threads(1)


# ------------------------------------------------------------------ mixed-task evaluation
def test_mixed_order_is_a_seeded_permutation():
    from cramcl.engine.runner import mixed_order

    order = mixed_order(50, seed=0, after_task=2)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert order == mixed_order(50, seed=0, after_task=2)
    assert order != mixed_order(50, seed=1, after_task=2) and order != mixed_order(50, seed=0, after_task=3)


def test_eval_batches_setting_is_checked():
    from cramcl.errors import BadInputError

    assert quick_config().train.eval_batches == "mixed"
    assert quick_config(extra=["train.eval_batches=per_task"]).train.eval_batches == "per_task"
    with pytest.raises(BadInputError, match="eval_batches: 'shuffled' is not one of mixed, per_task"):
        quick_config(extra=["train.eval_batches=shuffled"])


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory, warm_cache):
    """oracle-lora: one LoRA per task chosen by the task id, so predictions differ by task and a record given
    another record's prediction or task id shows. 30 steps a task, not the quick 6: after 6 the quick base's
    first and last tasks can both answer the same degenerate string, and a mix-up would not show."""
    from cramcl.engine.runner import run_stream

    out = tmp_path_factory.mktemp("oracle") / "run"
    run_stream(quick_config("oracle-lora", extra=["train.steps_per_task=30"]), out, log=LogSink())
    return out


def test_mixed_batches_score_each_record_as_its_own_task(oracle_run):
    from cramcl.engine.runner import evaluate_tasks
    from cramcl.engine.session import open_finished_run

    metrics = json.loads((oracle_run / "results" / "metrics.json").read_text())
    assert metrics["eval_batches"] == "mixed" and metrics["seed"] == 0
    session, after, _ = open_finished_run(oracle_run, log=LogSink())
    tasks = list(session.bench.tasks)
    session.cfg.train.eval_batch_size = 16  # several batches, each holding records of several tasks
    session.cfg.train.eval_batches = "per_task"
    per_task = evaluate_tasks(session, tasks, oracle_run.parent / "per_task", after)
    for task in tasks:
        mixed = [json.loads(l) for l in (oracle_run / "results" / "predictions" / f"after_{after}" /
                                         f"{task.name}.jsonl").open()]
        alone = [json.loads(l) for l in (oracle_run.parent / "per_task" / f"{task.name}.jsonl").open()]
        assert [r["id"] for r in mixed] == [r.id for r in task.test]  # back in the task's own order
        agree = sum(a["prediction"] == b["prediction"] for a, b in zip(mixed, alone)) / len(alone)
        assert agree >= 0.95, (task.name, agree)  # float near-ties in other batch shapes may flip a few
    # the predictions differ between tasks, so a scrambled mapping could not pass the check above
    answers = {t.name: {json.loads(l)["prediction"] for l in (oracle_run.parent / "per_task" / f"{t.name}.jsonl").open()}
               for t in tasks}
    assert not (answers[tasks[0].name] & answers[tasks[-1].name])
    assert per_task.keys() == {t.name for t in tasks}


# ------------------------------------------------------------------ seeds
def test_parse_seeds():
    from cramcl.engine.multi_seed import parse_seeds
    from cramcl.errors import BadInputError

    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(" 3 ,5") == [3, 5]
    for bad in ("", "a", "1,-1", "1,1", "0.5"):
        with pytest.raises(BadInputError, match="--seeds"):
            parse_seeds(bad)


def test_mean_and_sample_std():
    from cramcl.engine.multi_seed import mean_std, pm

    s = mean_std([70.0, 72.0, 74.0])
    assert s["mean"] == 72.0 and s["std"] == 2.0 and s["n"] == 3
    assert pm(s) == "72.0 ± 2.0"
    assert mean_std([5.0])["std"] == 0.0 and mean_std([None])["mean"] is None


SEED_RUN = [f"data.tasks={','.join(QUICK_TASKS)}", "train.steps_per_task=2"]


def test_run_with_seeds_writes_one_run_per_seed_and_a_summary(tmp_path, warm_cache, capsys):
    from cramcl.cli import main

    out = tmp_path / "seeds"
    assert main(["run", "--method", "lora-ft", "--profile", "quick", "--out", str(out), "--seeds", "0,1",
                 *SEED_RUN]) == 0
    for seed in (0, 1):
        metrics = json.loads((out / f"seed_{seed}" / "results" / "metrics.json").read_text())
        assert metrics["seed"] == seed and metrics["complete"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["tasks"] == list(QUICK_TASKS)
    mfn = [json.loads((out / f"seed_{s}" / "results" / "metrics.json").read_text())["MFN"] for s in (0, 1)]
    assert summary["metrics"]["MFN"]["values"] == mfn
    assert abs(summary["metrics"]["MFN"]["mean"] - sum(mfn) / 2) < 1e-3
    assert set(summary["final_row"]) == set(QUICK_TASKS)
    assert "±" in (out / "summary.md").read_text() and (out / "final_row_seeds.png").stat().st_size > 0
    # the same command again is refused (as for one run); --resume leaves finished seeds as they are
    assert main(["run", "--method", "lora-ft", "--profile", "quick", "--out", str(out), "--seeds", "0,1",
                 *SEED_RUN]) == 2
    assert main(["run", "--resume", "--out", str(out), "--seeds", "0,1"]) == 0
    assert json.loads((out / "summary.json").read_text()) == summary


def test_compare_with_seeds_reports_mean_and_spread(tmp_path, warm_cache):
    from cramcl.engine.compare import run_compare

    out = tmp_path / "cmp"
    result = run_compare(["lora-ft:rank=4", "zero-shot"], out, profile="quick", overrides=SEED_RUN, seeds=[0, 1],
                         log=LogSink())
    assert result["seeds"] == [0, 1]
    assert [r["method"] for r in result["methods"]] == ["lora-ft:rank=4", "zero-shot"]
    saved = yaml.safe_load((out / "lora-ft+rank=4" / "seed_1" / "config.yaml").read_text())
    assert saved["method"] == "lora-ft" and saved["method_args"]["rank"] == 4 and saved["seed"] == 1
    for row in result["methods"]:
        assert (out / row["method"].replace(":", "+") / "seed_1" / "results" / "matrix.json").exists()
        assert set(row["std"]) == {"MFT", "MFN", "MAA", "BWT", "forgetting"}
        assert len(row["final_row_std"]) == 3
    zero = next(r for r in result["methods"] if r["method"] == "zero-shot")
    assert zero["std"]["MFN"] == 0.0  # the frozen base does not depend on the seed
    text = (out / "compare.md").read_text()
    assert "Seeds: 0, 1" in text and "±" in text and "uses old data" in text


def test_method_variants_parse_into_method_settings():
    from cramcl.engine.compare import parse_variant, variant_dir
    from cramcl.errors import BadInputError

    assert parse_variant("cram") == ("cram", [])
    assert parse_variant("cram:routing=oracle:lambda_orth=0") == ("cram", ["method.routing=oracle",
                                                                          "method.lambda_orth=0"])
    assert variant_dir("cram:routing=oracle") == "cram+routing=oracle"
    for bad in (":x=1", "cram:=1"):  # "cram:routing" reads as a module:Class method, refused when resolved
        with pytest.raises(BadInputError, match="--methods"):
            parse_variant(bad)
