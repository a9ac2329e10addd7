"""The routing probe (eval/routing_probe.py): which units count, what a hit is, and that only the prompt's
routing call per linear is read."""
from types import SimpleNamespace

import pytest
import torch

from cramcl.adapters.multi_lora import RoutingContext
from cramcl.eval.routing_probe import own_expert_hits, own_expert_share


def _hits(weights, own, valid=None):
    h, n = own_expert_hits(weights, torch.full((weights.shape[0],), own), valid)
    return int(h.sum()), int(n.sum())


def test_hits_per_sample_and_per_token():
    w = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5], [0.0, 0.0]])  # hit, miss, tie, unrouted
    assert _hits(w, 0) == (1, 3)
    assert own_expert_hits(w, torch.tensor([0, 1, 1, 0]))[0].tolist() == [1, 1, 0, 0]  # per-sample own
    tokens = torch.tensor([[[0.9, 0.1], [0.1, 0.9], [0.6, 0.4]]])  # (1, 3, 2); the last token is padding
    assert _hits(tokens, 0, torch.tensor([[True, True, False]])) == (1, 2)
    assert _hits(tokens, 1) == (1, 3)
    assert _hits(torch.tensor([[1.0]]), 0) == (1, 1)  # a single expert always wins


class _Layer:
    def __init__(self, key):
        self.key = key


class _Backbone:
    """Two linears; generate() routes the prompt, then two decoding steps whose weights must be ignored."""

    def __init__(self, ctx):
        self.ctx, self.model, self.layers = ctx, torch.nn.Linear(1, 1), [_Layer("l0"), _Layer("l1")]

    def prepare(self, records, desc=""):
        pass

    def collate(self, records, train):
        return {"records": records, "x": torch.tensor([r.own for r in records])}

    def generate(self, model, batch):
        for step in range(3):
            for layer in self.layers:
                self.ctx.route(layer, (batch["x"], step))
        return [""] * len(batch["records"])


class _Method:
    """Routes each record to the expert its ``own`` field names at the prompt, and to expert 0 afterwards."""
    uses_task_id_at_eval = False

    def __init__(self, wrong_on=()):
        self.context = RoutingContext()
        self.context.route = self.route
        self.wrong_on = set(wrong_on)
        self.prepared, self.batches = 0, []

    def route(self, layer, inputs):
        own, step = inputs
        w = torch.zeros(len(own), 3)
        target = own if step == 0 else torch.zeros_like(own)
        if layer.key in self.wrong_on:
            target = (target + 1) % 3
        w[torch.arange(len(own)), target] = 1.0
        return w

    def expert_created_for(self, i):
        return i if i < 3 else None

    def prepare_batch(self, batch, train):
        assert not train
        self.prepared += 1
        self.batches.append({r.task for r in batch["records"]})


def _task(name, n, own):
    return SimpleNamespace(name=name, test=[SimpleNamespace(own=own, task=name) for _ in range(n)])


def test_share_reads_the_prompt_call_of_each_linear_and_restores_the_route():
    """Batches mix the tasks; each sample is scored against its own task's expert."""
    method = _Method(wrong_on={"l1"})
    backbone = _Backbone(method.context)
    tasks = [_task("a", 5, 0), _task("b", 3, 1), _task("c", 4, 0), _task("d", 2, 2)]  # c's own is 2; d has none
    out = own_expert_share(backbone, method, tasks, batch_size=2)
    assert out["a"] == {"share": 50.0, "min_linear": 0.0, "max_linear": 100.0, "units": 10}
    assert out["b"]["share"] == 50.0
    assert out["c"]["share"] == 0.0  # routed to expert 0, its own is expert 2
    assert "d" not in out
    assert method.context.route == method.route  # restored
    assert method.prepared == 6  # the 12 records of a, b, c in batches of 2
    assert sum(len(tasks) > 1 for tasks in method.batches) >= 3  # that mix tasks (in stream order: 1 of 6)


def test_oracle_methods_are_not_probed():
    method = _Method()
    method.uses_task_id_at_eval = True
    assert own_expert_share(_Backbone(method.context), method, [_task("a", 2, 0)]) == {}


@pytest.mark.parametrize("method, linears, per_token", [("routing-cl", 16, True), ("same", 12, False)])
def test_probe_on_a_real_run_counts_every_prompt_token_or_sample(tmp_path, method, linears, per_token):
    """Two quick tasks; the probe reads every adapted linear once per prompt: per-token routers count the
    real (unpadded) prompt tokens, per-sample routers each sample; SAME's expert k is task k's."""
    from cramcl.config import resolve_config
    from cramcl.engine.runner import run_stream
    from cramcl.engine.session import open_finished_run

    cfg = resolve_config(method=method, profile="quick",
                         overrides=["data.tasks=[shape,digits]", "train.steps_per_task=4"])
    run_stream(cfg, tmp_path / "run", log=lambda *a: None)
    session, _, _ = open_finished_run(tmp_path / "run", None, log=lambda *a: None)
    tasks = session.bench.tasks
    assert [session.method.expert_created_for(i) for i in range(3)] == [0, 1, None]
    out = own_expert_share(session.backbone, session.method, tasks, batch_size=8)
    assert set(out) == {"shape", "digits"}
    for task in tasks:
        records = list(task.test)
        if per_token:
            units = int(session.backbone.collate(records, train=False)["attention_mask"].sum()) * linears
        else:
            units = len(records) * linears
        assert out[task.name]["units"] == units
        assert 0.0 <= out[task.name]["min_linear"] <= out[task.name]["share"] <= out[task.name]["max_linear"] <= 100.0
