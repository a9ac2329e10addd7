"""CRAM as a method: the phase lifecycle, what trains when, per-sample routing, state round trip, resume."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import LogSink, quick_config

torch.set_num_threads(1)


def _session(tmp_path, extra=()):
    from cramcl.engine.session import open_session

    return open_session(quick_config("cram", extra), tmp_path, log=LogSink())


def _train(session, task_index):
    from cramcl.engine.trainer import train_task

    task = session.bench.tasks[task_index]
    session.backbone.prepare(list(task.train))
    session.method.before_task(task_index, task)
    train_task(session.accelerator, session.backbone, session.method, list(task.train), session.cfg.train,
               task_index, seed=task_index)
    session.method.after_task(task_index)


def _eval_batch(session, records):
    session.backbone.prepare(records)
    return session.backbone.collate(records, train=False)


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory, warm_cache):
    """CRAM after shape and colour, with colour in shape's group (they share a question; one pool makes
    sure) so that the second task consolidates against history and trains with the orthogonality penalty."""
    s = _session(tmp_path_factory.mktemp("cram"), ["method.grouping=false"])
    _train(s, 0)
    _train(s, 1)
    return s


def test_one_expert_per_task_with_ranks_in_bounds(two_tasks):
    m = two_tasks.method
    cfg = m.cfg
    assert m.expert_group == [0, 0] and m.expert_task == [0, 1]
    for layer in m.layers.values():
        assert layer.num_experts == 2
        assert all(cfg.r_min <= r <= cfg.r_max for r in layer.ranks), layer.ranks
        assert layer.buffer_A is None  # the buffer is gone after the task
    assert len(m.centroids.centroids) == 2
    assert m.centroids.centroids[0].shape == (m.num_layers, m.encoders.image_embeddings(
        list(two_tasks.bench.tasks[0].test[:1])).shape[-1])


def test_stable_phase_trains_only_the_new_expert_and_its_centroids(tmp_path, warm_cache):
    from cramcl.methods.base import Phase

    s = _session(tmp_path, ["method.grouping=false"])
    _train(s, 0)
    m = s.method
    task = s.bench.tasks[1]
    s.backbone.prepare(list(task.train))
    m.before_task(1, task)
    m.begin_phase(Phase("warmup", 1))
    warm = {id(p) for p in m.trainable_parameters()}
    assert warm == {id(l.buffer_A) for l in m.layers.values()} | {id(l.buffer_B) for l in m.layers.values()}
    batch = s.backbone.collate(list(task.train[:8]), train=True)
    m.prepare_batch(batch, train=True)
    m.compute_loss(s.backbone.model, batch)[0].backward()
    torch.optim.AdamW(m.trainable_parameters(), lr=1e-2).step()  # one warm-up step: a buffer (and expert) != 0
    m.end_phase(Phase("warmup", 1))
    # consolidation: the new expert's A rows lie off the row space of the group's earlier expert
    from cramcl.methods.cram.consolidation import history_basis

    for layer in m.layers.values():
        Q = history_basis([layer.experts_A[0].detach()])
        assert (layer.experts_A[1].detach() @ Q).abs().max() < 1e-4
        assert m.cfg.r_min <= layer.ranks[1] <= m.cfg.r_max
    assert m.consolidation_log[-1]["history_experts"] == 1
    m.begin_phase(Phase("stable", 2))
    params = m.trainable_parameters()
    expected = {id(l.experts_A[1]) for l in m.layers.values()} | {id(l.experts_B[1]) for l in m.layers.values()}
    expected |= {id(m.centroids.centroids[1])}
    assert {id(p) for p in params} == expected
    frozen_before = {k: (l.experts_A[0].detach().clone(), l.experts_B[0].detach().clone()) for k, l in m.layers.items()}
    centroid_before = m.centroids.centroids[0].detach().clone()
    new_before = m.centroids.centroids[1].detach().clone()
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = s.backbone.collate(list(task.train[:8]), train=True)
    m.prepare_batch(batch, train=True)
    loss, aux = m.compute_loss(s.backbone.model, batch)
    # history exists and shares the pool: the penalty is on, and > 0 since the earlier expert's routing gate is
    # (its value: test_cram_mechanisms.py)
    assert float(m._weights[:, :, 0].max()) > 0
    assert "orth" in aux and float(aux["orth"]) > 0
    loss.backward()
    opt.step()
    for k, l in m.layers.items():
        assert torch.equal(l.experts_A[0], frozen_before[k][0]) and torch.equal(l.experts_B[0], frozen_before[k][1])
    assert torch.equal(m.centroids.centroids[0], centroid_before)
    assert not torch.equal(m.centroids.centroids[1], new_before)  # the new centroids do train


def test_per_sample_routing_is_independent_of_batch_mates(two_tasks):
    s = two_tasks
    shape_recs = list(s.bench.tasks[0].test[:3])
    digit_recs = list(s.bench.tasks[2].test[:3])
    alone = _eval_batch(s, shape_recs[:1])
    s.method.prepare_batch(alone, train=False)
    w_alone = s.method._weights[:, 0].clone()
    mixed = _eval_batch(s, shape_recs[:1] + digit_recs)
    s.method.prepare_batch(mixed, train=False)
    assert torch.allclose(s.method._weights[:, 0], w_alone, atol=1e-6)
    assert torch.allclose(s.method._weights.sum(-1), torch.ones_like(s.method._weights.sum(-1)), atol=1e-5)
    # and so is its output: the next-token logits of the prompt's last position agree to float precision
    # (not bit-for-bit: another batch size may pick other matmul kernels)
    s.method.prepare_batch(alone, train=False)
    with torch.no_grad():
        logit_alone = s.backbone.model(**s.backbone.model_inputs(alone)).logits[0, -1]
        s.method.prepare_batch(mixed, train=False)
        logit_mixed = s.backbone.model(**s.backbone.model_inputs(mixed)).logits[0, -1]
    assert torch.allclose(logit_alone, logit_mixed, atol=1e-4)


def test_batch_mean_routing_depends_on_batch_mates(tmp_path, two_tasks):
    s = two_tasks
    s.method.cfg.routing = "batch_mean"
    try:
        recs = list(s.bench.tasks[0].test[:1])
        s.method.prepare_batch(_eval_batch(s, recs), train=False)
        w_alone = s.method._weights[:, 0].clone()
        s.method.prepare_batch(_eval_batch(s, recs + list(s.bench.tasks[2].test[:5])), train=False)
        assert not torch.allclose(s.method._weights[:, 0], w_alone, atol=1e-4)
    finally:
        s.method.cfg.routing = "per_sample"


def test_state_round_trip_gives_identical_routing_and_outputs(tmp_path, two_tasks):
    from safetensors.torch import load_file, save_file

    tensors, meta = two_tasks.method.state()
    save_file(tensors, str(tmp_path / "m.safetensors"))
    fresh = _session(tmp_path / "fresh", ["method.grouping=false"])
    fresh.method.load_state(load_file(str(tmp_path / "m.safetensors")), json.loads(json.dumps(meta)))
    recs = list(two_tasks.bench.tasks[1].test[:4])
    a, b = _eval_batch(two_tasks, recs), _eval_batch(fresh, recs)
    two_tasks.method.prepare_batch(a, train=False)
    fresh.method.prepare_batch(b, train=False)
    assert torch.equal(two_tasks.method._weights, fresh.method._weights)
    la = two_tasks.backbone.model(**two_tasks.backbone.model_inputs(a)).logits
    lb = fresh.backbone.model(**fresh.backbone.model_inputs(b)).logits
    assert torch.equal(la, lb)


def test_resume_in_the_middle_of_the_stream_equals_an_uninterrupted_run(tmp_path, warm_cache):
    from cramcl.engine.runner import run_stream

    full = tmp_path / "full"
    run_stream(quick_config("cram"), full, log=LogSink())
    cut = tmp_path / "cut"
    run_stream(quick_config("cram"), cut, log=LogSink(), stop_after_task=1)
    run_stream(None, cut, resume=True, log=LogSink())
    a = json.loads((full / "results" / "matrix.json").read_text())
    b = json.loads((cut / "results" / "matrix.json").read_text())
    assert a == b
    for pred in (full / "results" / "predictions" / "after_2").iterdir():
        assert pred.read_text() == (cut / "results" / "predictions" / "after_2" / pred.name).read_text()
    metrics = json.loads((full / "results" / "metrics.json").read_text())
    analysis = metrics["method_analysis"]
    assert set(analysis["group_accuracy"]) == {"shape", "colour", "ocr"}
    # three instruction formats, three groups: level 1 sends every test record to its own task's group
    assert analysis["group_accuracy"] == {"shape": 100.0, "colour": 100.0, "ocr": 100.0}


def test_oracle_routing_is_marked_as_using_the_task_id(tmp_path, warm_cache):
    s = _session(tmp_path, ["method.routing=oracle"])
    assert s.method.uses_task_id_at_eval
    assert not _session(tmp_path / "b").method.uses_task_id_at_eval


def test_routing_uses_sigma_in_units_of_the_centroid_gap(two_tasks):
    """The profiles state sigma relative to the group's closest centroid pair; the method must route so."""
    from cramcl.methods.cram.centroids import group_layer_weights

    s, m = two_tasks, two_tasks.method
    assert m.cfg.sigma_units == "gap"
    recs = list(s.bench.tasks[1].test[:6])
    s.backbone.prepare(recs)
    w = m.routing_weights(recs, torch.zeros(len(recs), dtype=torch.long))  # both experts in group 0
    q = m.encoders.image_embeddings(recs).to(m.device)
    ref = group_layer_weights(q, m.centroids.stacked([0, 1]), m.cfg.sigma, "per_sample", sigma_units="gap")
    assert torch.allclose(w, ref.to(w.dtype), atol=1e-6)


def test_unknown_sigma_units_is_a_config_error(tmp_path, warm_cache):
    from cramcl.errors import BadInputError

    with pytest.raises(BadInputError, match="sigma_units"):
        _session(tmp_path, ["method.sigma_units=metres"])


def test_every_decoding_step_of_a_batch_gets_the_same_weight_tensors(two_tasks):
    """Each adapted module must recognise its layer's weights at a glance over a batch's decoding steps (to
    reuse its per-column multiplier): the route hands out the same tensor per layer until the next batch."""
    m = two_tasks.method
    records = list(two_tasks.bench.tasks[0].test[:4]) + list(two_tasks.bench.tasks[1].test[:4])
    layers = list(m.layers.values())
    m.prepare_batch(_eval_batch(two_tasks, records), train=False)
    x = torch.zeros(len(records), 1, layers[0].in_features)
    first = [m._route(layer, x) for layer in layers]
    assert all(m._route(layer, x) is w for layer, w in zip(layers, first))
    assert all(torch.equal(w, m._weights[layer.layer_index]) for layer, w in zip(layers, first))
    m.prepare_batch(_eval_batch(two_tasks, records), train=False)  # the next batch: new tensors
    assert all(m._route(layer, x) is not w for layer, w in zip(layers, first))
