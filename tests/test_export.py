"""cramcl export --format peft: a task's expert loads with peft.PeftModel.from_pretrained onto the same base
and gives the logits cramcl gives with that expert forced (oracle routing)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import LogSink

torch.set_num_threads(1)


def _clean_copy(module):
    """The base the adapter loads onto: the same weights without cramcl's wrappers."""
    from cramcl.adapters.multi_lora import MultiLoRALinear

    clean = copy.deepcopy(module)
    for name, m in list(clean.named_modules()):
        if isinstance(m, MultiLoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(clean.get_submodule(parent), child, m.base)
    return clean


@pytest.mark.parametrize("which", ["cram", "lora-ft"])
@torch.no_grad()
def test_exported_expert_loads_into_peft_with_cramcls_logits(which, cram_run, finished_run, tmp_path, capsys):
    """CRAM: ragged ranks per module, scale 1; lora-ft: one rank, scale alpha / r = 2 folded into lora_B."""
    from peft import PeftModel

    from cramcl.cli import main
    from cramcl.engine.session import open_finished_run

    run = cram_run if which == "cram" else finished_run
    session, _, _ = open_finished_run(run, log=LogSink())
    m, bb = session.method, session.backbone
    task_index = len(session.bench.tasks) - 1
    task = session.bench.tasks[task_index]
    out = tmp_path / "peft"
    assert main(["export", "--run", str(run), "--task", task.name, "--format", "peft", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    ranks = json.loads((out / "cramcl_export.json").read_text())["ranks"]
    assert len(ranks) == len(m.layers)
    assert len(set(ranks.values())) > 1 if which == "cram" else set(ranks.values()) == {8}  # ragged: per module
    assert cfg["peft_type"] == "LORA" and cfg["lora_dropout"] == 0.0

    records = list(task.test[:4])
    bb.prepare(records)
    batch = bb.collate(records, train=False)
    inputs = bb.model_inputs(batch)
    k = m.expert_for_task(task_index)
    n = next(iter(m.layers.values())).num_experts
    m.context.route = lambda layer, x: torch.nn.functional.one_hot(torch.full((x.shape[0],), k), n).float()
    m.context.active, m.context.buffer_weight = (k,), None
    bb.model.eval()
    want = bb.model(**inputs).logits

    lm = bb.model.language_model
    peft_model = PeftModel.from_pretrained(_clean_copy(lm), str(out)).eval()
    embeds = bb.model.embed(inputs["input_ids"], inputs["image_feats"], inputs["image_mask"])
    position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    got = peft_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], position_ids=position_ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    base_only = _clean_copy(lm)(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                position_ids=position_ids).logits
    assert not torch.allclose(base_only, want, atol=1e-3)  # the adapter is what makes them equal


@pytest.mark.parametrize("argv, words", [
    (["--task", "nope"], "unknown task 'nope'"),
])
def test_export_bad_input(cram_run, tmp_path, capsys, argv, words):
    from cramcl.cli import main

    assert main(["export", "--run", str(cram_run), *argv, str(tmp_path / "o")]) == 2
    assert words in capsys.readouterr().err


def test_export_refuses_a_non_empty_out_and_methods_without_one_expert(cram_run, finished_run, tmp_path, capsys):
    from cramcl.cli import main

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    assert main(["export", "--run", str(cram_run), "--task", "shape", str(busy)]) == 2
    assert "not an empty directory" in capsys.readouterr().err and (busy / "x").read_text() == "keep me"
    # lora-ft's one LoRA is every task's expert
    assert main(["export", "--run", str(finished_run), "--task", "shape", str(tmp_path / "lora")]) == 0
