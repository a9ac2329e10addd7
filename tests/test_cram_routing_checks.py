"""CRAM's routing made visible: the near-uniform warning at a stable phase's start, each task's own-expert
weight on its own test images, batch_mean at both levels, oracle routing per record in mixed batches."""
from __future__ import annotations

import pytest
import torch

from conftest import LogSink, quick_config

torch.set_num_threads(1)


def _session(tmp_path, extra=()):
    from cramcl.engine.session import open_session

    log = LogSink()
    return open_session(quick_config("cram", extra), tmp_path, log=log), log


def _train(session, task_index):
    from cramcl.engine.trainer import train_task

    task = session.bench.tasks[task_index]
    session.backbone.prepare(list(task.train) + list(task.test))
    session.method.before_task(task_index, task)
    train_task(session.accelerator, session.backbone, session.method, list(task.train), session.cfg.train,
               task_index, seed=task_index)
    session.method.after_task(task_index)


def _two_domains(tmp_path, extra):
    """shape (easy-VQA images) then the quick stream's third task (printed digits) in one pool: two experts
    whose images differ."""
    s, log = _session(tmp_path, ["method.grouping=false", *extra])
    _train(s, 0)
    _train(s, 2)
    return s, log


# ------------------------------------------------------------------ the pure check
def test_routing_check_flags_a_sigma_too_large_for_separable_images():
    from cramcl.methods.cram.centroids import routing_check
    from cramcl.methods.cram.centroids import rbf_routing_weights

    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    b = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    q = torch.nn.functional.normalize(b + 0.05 * torch.randn(50, 16, generator=g), dim=1)  # the new task's images
    centroids = torch.stack([a, b])  # older expert, new expert
    wide = routing_check(q, centroids, own=1, sigma=2.0)
    assert wide["separable"] == 1.0 and wide["near_uniform"]
    assert 0.5 < wide["own_weight"] < 0.625  # the bound the warning is about: two experts, sigma 2, unit vectors
    sharp = routing_check(q, centroids, own=1, sigma=0.25)
    assert not sharp["near_uniform"] and sharp["own_weight"] > 0.99
    # the suggested sigma does what it says at the median sample
    suggested = wide["sigma_for_0_9"]
    assert suggested is not None and rbf_routing_weights(q, centroids, suggested)[:, 1].median() >= 0.9 - 1e-4
    # images that do not separate the experts are no reason to warn
    mixed = routing_check(torch.cat([q, torch.nn.functional.normalize(a + 0.05 * torch.randn(50, 16, generator=g),
                                                                       dim=1)]), centroids, own=1, sigma=2.0)
    assert not mixed["near_uniform"]


# ------------------------------------------------------------------ in a run
@pytest.fixture(scope="module")
def sharp(tmp_path_factory, warm_cache):
    return _two_domains(tmp_path_factory.mktemp("sharp"), [])  # the profile's sigma (0.25)


def test_near_uniform_routing_is_warned_about_and_reported(tmp_path, warm_cache):
    from cramcl.methods.cram.report import report_sections

    s, log = _two_domains(tmp_path, ["method.sigma=2.0", "method.sigma_units=absolute"])  # the paper's setting
    check = s.method.routing_checks[-1]
    assert check["task"] == 2 and check["experts"] == 2 and check["near_uniform"]
    assert check["own_weight"] < 0.625 and check["separable"] >= 0.8
    assert any("CRAM WARNING: routing in group 0 is near uniform" in line for line in log.lines)
    # and before any training, from the setting alone: sigma 2 on unit vectors cannot exceed 0.62 / 0.38
    assert any("method.sigma=2.0 on unit-norm routing embeddings cannot route" in line and "0.62/0.38" in line
               for line in log.lines)
    text = "\n".join(body for _, body in report_sections(s.method))
    assert "near uniform: sigma too large" in text


def test_a_sigma_in_the_embeddings_units_routes_each_task_to_its_own_expert(sharp):
    s, log = sharp
    check = s.method.routing_checks[-1]
    assert not check["near_uniform"] and check["own_weight"] > 0.9
    assert not any("CRAM WARNING" in line for line in log.lines)
    tasks = list(s.bench.tasks)
    own = s.method.stream_analysis(tasks)["own_expert_weight"]
    assert set(own) == {s.bench.tasks[0].name, s.bench.tasks[2].name}  # the middle task was never trained
    for name, w in own.items():
        assert w["experts_in_group"] == 2 and len(w["per_layer"]) == s.method.num_layers
        assert w["mean"] > 0.8, (name, w)  # each task's images go to its own expert
    assert any("own expert's weight on own test images" in line for line in log.lines)


def test_own_expert_weight_is_measured_as_evaluation_routes(sharp):
    """Uniform routing must show 1/2 for every task: the measurement reads the routing, not the task id."""
    from cramcl.methods.cram.report import own_expert_weights

    s, _ = sharp
    s.method.cfg.routing = "uniform"
    try:
        own = own_expert_weights(s.method, list(s.bench.tasks))
    finally:
        s.method.cfg.routing = "per_sample"
    assert all(abs(w["mean"] - 0.5) < 1e-6 for w in own.values())


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory, warm_cache):
    """shape and the third quick task (a number question) in their own groups (their instructions differ)."""
    s, _ = _session(tmp_path_factory.mktemp("groups"))
    _train(s, 0)
    _train(s, 2)
    assert s.method.task_group == [0, 1]
    return s


def _mixed_batch(s):
    records = list(s.bench.tasks[0].test[:3]) + list(s.bench.tasks[2].test[:3])
    batch = s.backbone.collate(records, train=False)
    return records, batch


def test_batch_mean_routing_picks_one_group_for_the_whole_batch(two_groups):
    s = two_groups
    records, batch = _mixed_batch(s)
    assert s.method.assign_groups(records).tolist() == [0, 0, 0, 1, 1, 1]  # per sample: each its own
    s.method.cfg.routing = "batch_mean"
    try:
        groups = s.method.assign_groups(records)
        s.method.prepare_batch(batch, train=False)
        weights = s.method._weights
    finally:
        s.method.cfg.routing = "per_sample"
    assert groups.unique().numel() == 1  # the authors' level 1: the batch's mean text picks one group
    g = int(groups[0])
    experts = [k for k, grp in enumerate(s.method.expert_group) if grp == g]
    outside = [k for k in range(len(s.method.expert_group)) if k not in experts]
    assert torch.all(weights[:, :, outside] == 0) and torch.allclose(weights.sum(-1), torch.ones(()))


def test_oracle_routing_reads_each_records_own_task_in_a_mixed_batch(tmp_path, two_groups):
    s = two_groups
    records, batch = _mixed_batch(s)
    s.method.cfg.routing = "oracle"
    try:
        batch["task_index"] = torch.tensor([0, 0, 0, 2, 2, 2])
        s.method.prepare_batch(batch, train=False)
        weights = s.method._weights
    finally:
        s.method.cfg.routing = "per_sample"
    own = torch.tensor([0, 0, 0, 1, 1, 1])  # expert 0 is task 0's, expert 1 task 2's
    assert torch.equal(weights, torch.nn.functional.one_hot(own, 2).float().expand_as(weights))
