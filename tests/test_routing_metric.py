"""The ``standardized`` routing metric (``method.routing_metric``): distances inside a group weighted per
coordinate by the group's within-task image variance, ``s^2 = 1 / (v + shrinkage * mean(v))``.

Pure parts first (the scale, the accumulator's variance, the weights with a scale), then CRAM driven by hand
through the mechanism stream (two groups, one holding two tasks on light and dark images): each expert keeps
the variance of its own warm-up's images, and the group's weights equal a hand computation from those.
"""
from __future__ import annotations

import pytest
import torch

from cram_mechanism_stream import check_stream_shape, collate, drive, open_mechanism_session

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------- pure parts
def test_scale_weights_quiet_coordinates_up_and_noisy_ones_down():
    from cramcl.methods.cram.centroids import standardizing_scale

    v = torch.tensor([[0.01, 1.0, 0.1, 0.1], [0.03, 3.0, 0.1, 0.1]])  # (K=2, D=4) per-expert variances
    s = standardizing_scale(v, shrinkage=1.0)
    assert s.shape == (4,)
    assert float(s.pow(2).mean()) == pytest.approx(1.0, rel=1e-6)
    vbar = v.mean(0)
    want = 1.0 / (vbar + vbar.mean())
    assert torch.allclose(s.pow(2), want / want.mean(), rtol=1e-5)
    assert s[0] > s[2] > s[1]  # quiet > middle > noisy
    # large shrinkage: back towards Euclidean (all ones); small: towards plain standardisation
    assert torch.allclose(standardizing_scale(v, shrinkage=1e6), torch.ones(4), atol=1e-3)
    plain = 1.0 / vbar
    assert torch.allclose(standardizing_scale(v, shrinkage=1e-9).pow(2), plain / plain.mean(), rtol=1e-4)


def test_scale_of_identical_images_is_all_ones_and_shrinkage_must_be_positive():
    from cramcl.methods.cram.centroids import standardizing_scale

    assert torch.equal(standardizing_scale(torch.zeros(2, 5)), torch.ones(5))
    with pytest.raises(ValueError, match="shrinkage"):
        standardizing_scale(torch.ones(2, 5), shrinkage=0.0)


def test_accumulator_variance_matches_torch_and_survives_an_all_reduce():
    from cramcl.methods.cram.centroids import CentroidAccumulator

    torch.manual_seed(0)
    x = torch.randn(30, 6) * torch.tensor([0.1, 1, 2, 3, 4, 5]) + 7.0
    acc = CentroidAccumulator()
    for chunk in x.split(7):
        acc.add(chunk)
    assert torch.allclose(acc.variance(), x.var(0, unbiased=False), atol=1e-5)
    # two "processes", summed as an all-reduce would: the same variance
    p1, p2 = CentroidAccumulator(), CentroidAccumulator()
    p1.add(x[:11])
    p2.add(x[11:])
    (s1, n1), (s2, n2) = p1.sums(), p2.sums()
    p1.load_sums(s1 + s2, n1 + n2, p1.square_sums() + p2.square_sums())
    assert torch.allclose(p1.variance(), acc.variance(), atol=1e-6)
    # a state written without square sums cannot give a variance, and says so
    p2.load_sums(s2, n2)
    with pytest.raises(RuntimeError, match="square sums"):
        p2.variance()


def test_weights_with_a_scale_are_the_rbf_of_the_scaled_embeddings():
    """The scale multiplies q and every centroid before the distances and before the gap (gap units)."""
    from cramcl.methods.cram.centroids import group_layer_weights

    torch.manual_seed(1)
    q, c = torch.randn(5, 4), torch.randn(3, 2, 4)  # (B, D), (L, K, D)
    scale = torch.tensor([3.0, 0.5, 1.0, 0.2])
    got = group_layer_weights(q, c, 0.25, "per_sample", sigma_units="gap", scale=scale)
    qs, cs = q * scale, c * scale
    for layer in range(3):
        d2 = (qs[:, None] - cs[layer][None]).pow(2).sum(-1)  # (B, K)
        gap = float((cs[layer][0] - cs[layer][1]).pow(2).sum())
        want = torch.softmax(-d2 / (2 * 0.25 ** 2 * gap), dim=-1)
        assert torch.allclose(got[layer], want, atol=1e-6)
    plain = group_layer_weights(q, c, 0.25, "per_sample", sigma_units="gap")
    assert not torch.allclose(got, plain, atol=1e-3)  # the scale acts


def test_unknown_metric_and_bad_shrinkage_are_config_errors():
    from cramcl.methods.cram.config import CramConfig

    assert any("routing_metric" in p for p in CramConfig(routing_metric="cosine").problems())
    assert any("metric_shrinkage" in p for p in CramConfig(metric_shrinkage=0.0).problems())
    assert CramConfig(routing_metric="standardized").problems() == []
    assert CramConfig().routing_metric == "euclidean"  # the paper's metric stays the default


# ----------------------------------------------------------------------------------------- CRAM by hand
@pytest.fixture(scope="module")
def standardized(tmp_path_factory):
    s = open_mechanism_session(tmp_path_factory.mktemp("cram_metric"),
                               ["method.routing_metric=standardized", "method.metric_shrinkage=0.5"])
    torch.manual_seed(0)
    recs = {}
    for t in range(3):
        recs[t] = {}
        drive(s, t, recs[t])
    check_stream_shape(s)
    return s, recs


@pytest.mark.parametrize("task", [0, 1, 2])
def test_each_expert_keeps_the_variance_of_its_own_warmup_images(standardized, task):
    s, recs = standardized
    m = s.method
    q = m.encoders.image_embeddings(recs[task]["warm_records"]).double()
    got = m.expert_variance[recs[task]["new"]].double().cpu()
    assert got.shape == (q.shape[1],)
    assert torch.allclose(got, q.var(0, unbiased=False), atol=1e-6, rtol=1e-4)
    if task > 0:  # not another task's images, nor a running mix of the stream's
        other = m.encoders.image_embeddings(recs[task - 1]["warm_records"]).double()
        assert float((torch.cat([other, q]).var(0, unbiased=False) - got).abs().max()) > 1e-5


def test_shared_group_routes_by_the_hand_computed_standardized_distance(standardized):
    """Eval batch of the shared group's two tasks (light, dark): weights == softmax(-sum_d s_d^2 (q_d -
    c_d)^2 / (2 sigma^2 gap_s)), s from the two experts' variances and the shrinkage, gap_s the scaled
    squared distance between the two centroids at that layer; and they differ from Euclidean routing."""
    from cramcl.methods.cram.centroids import group_layer_weights

    s, recs = standardized
    m = s.method
    tasks = s.bench.tasks
    records = [tasks[0].test[0], tasks[2].test[0], tasks[0].test[1], tasks[2].test[1]]
    batch = collate(s, records, train=False)
    m.prepare_batch(batch, train=False)
    experts = [k for k in range(3) if m.expert_group[k] == m.task_group[0]]
    assert experts == [0, 2]
    v = torch.stack([m.expert_variance[k].double().cpu() for k in experts]).mean(0)
    s2 = 1.0 / (v + 0.5 * v.mean())
    s2 = s2 / s2.mean()
    q = m.encoders.image_embeddings(records).double().cpu()
    for layer in range(m.num_layers):
        C = torch.stack([m.centroids.centroids[k][layer].detach().double().cpu() for k in experts])  # (2, D)
        d2 = ((q[:, None] - C[None]).pow(2) * s2).sum(-1)
        gap = float(((C[0] - C[1]).pow(2) * s2).sum())
        want = torch.softmax(-d2 / (2 * m.cfg.sigma ** 2 * gap), dim=-1)
        got = m._weights[layer][:, experts].double().cpu()
        assert torch.allclose(got, want, atol=1e-5), (layer, got, want)
    euclid = group_layer_weights(q.float().to(m.device), m.centroids.stacked(experts), m.cfg.sigma, "per_sample",
                                 sigma_units="gap")
    assert not torch.allclose(euclid.double().cpu(), m._weights[:, :, experts].double().cpu(), atol=1e-3)


def test_variances_travel_with_the_state(standardized):
    """A run resumed from a checkpoint routes exactly as the one that wrote it."""
    from cramcl.methods.cram import Cram

    s, _ = standardized
    m = s.method
    tensors, meta = m.state()
    assert sum(k.startswith("cram.expert_variance.") for k in tensors) == 3
    records = [s.bench.tasks[0].test[0], s.bench.tasks[2].test[0]]
    groups = m.assign_groups(records)
    before = m.routing_weights(records, groups)
    saved = list(m.expert_variance)
    try:
        m.expert_variance = []
        Cram.load_state(m, tensors, meta)
        assert len(m.expert_variance) == 3
        assert torch.equal(m.routing_weights(records, groups), before)
    finally:
        m.expert_variance = saved


def test_euclidean_runs_keep_no_variances(tmp_path, warm_cache):
    """The default metric stores nothing extra (stored parameters unchanged)."""
    from conftest import LogSink, quick_config
    from cramcl.engine.session import open_session
    from cramcl.engine.trainer import train_task

    s = open_session(quick_config("cram", ["method.grouping=false"]), tmp_path, log=LogSink())
    task = s.bench.tasks[0]
    s.backbone.prepare(list(task.train))
    s.method.before_task(0, task)
    train_task(s.accelerator, s.backbone, s.method, list(task.train), s.cfg.train, 0, seed=0)
    s.method.after_task(0)
    assert s.method.expert_variance == []
    assert not any(k.startswith("cram.expert_variance.") for k in s.method.state()[0])
