"""CRAM's settings reach what they name, and each ablation switch removes the one thing it names
(docs/cram.md, "Ablations"): the allocation settings (r_max, r_min, tau_alloc and its units) set the ranks
consolidation gives, theta decides level 1, the warm-up length follows warmup_fraction, the prototypes are
running means of every training batch, fixed_rank keeps the capability gap, capability_gap=false drops it,
no_warmup takes its rank from fixed_rank, and routing=oracle never falls back silently."""
from __future__ import annotations

import pytest
import torch

from cram_mechanism_stream import BATCH, LR, check_stream_shape, drive, open_mechanism_session
from cramcl.methods.cram import Cram, CramConfig
from cramcl.methods.cram.consolidation import allocation_count, select_expert_directions

torch.set_num_threads(1)


def _consolidate_first_task(tmp_path, extra):
    """A mechanism-stream session with ``extra`` settings, task 0 through its warm-up and consolidation;
    returns the method."""
    s = open_mechanism_session(tmp_path, extra)
    m, model = s.method, s.backbone.model
    task = s.bench.tasks[0]
    train = list(task.train)
    s.backbone.prepare(train)
    m.before_task(0, task)
    warm = m.phases(0, 5)[0]
    m.begin_phase(warm)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=LR, weight_decay=0.0)
    torch.manual_seed(0)
    for step in range(warm.steps):
        batch = s.backbone.collate(train[step * BATCH:(step + 1) * BATCH], train=True)
        model.train()
        m.prepare_batch(batch, train=True)
        loss, _ = m.compute_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    m.end_phase(warm)
    return m


@pytest.mark.parametrize("settings, rank", [
    # every direction passes tau_alloc 0: r_max caps them
    (["method.tau_alloc=0", "method.r_min=1", "method.r_max=2"], 2),
    (["method.tau_alloc=0", "method.r_min=1", "method.r_max=5"], 5),
    # none passes: the strongest one, padded to r_min
    (["method.tau_alloc=1e6", "method.r_min=3", "method.r_max=9"], 3),
    # energy units: the strongest direction alone holds a 1e-9 share of the energy
    (["method.alloc_units=energy", "method.tau_alloc=1e-9", "method.r_min=1", "method.r_max=9"], 1),
    # the whole energy: every direction with a nonzero singular value, capped at r_max
    (["method.alloc_units=energy", "method.tau_alloc=1.0", "method.r_min=1", "method.r_max=7"], 7),
])
def test_allocation_settings_set_the_rank_consolidation_gives(tmp_path, warm_cache, settings, rank):
    m = _consolidate_first_task(tmp_path, settings)
    assert {layer.ranks[0] for layer in m.layers.values()} == {rank}
    log = m.consolidation_log[-1]
    assert set(log["spectra"]) == set(m.layers) and log["novelty"] == {}  # no history: no novelty
    for spectrum in log["spectra"].values():
        assert len(spectrum) == m.cfg.buffer_rank and spectrum == sorted(spectrum, reverse=True)


def test_energy_units_count_the_directions_holding_the_share():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert [allocation_count(S, tau, "energy") for tau in (0.5, 9 / 14, 0.9, 13 / 14, 0.99, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert allocation_count(S, 1.5, "absolute") == 2
    with pytest.raises(ValueError):
        allocation_count(S, 0.5, "relative")


def test_fixed_rank_keeps_the_capability_gap_choosing_novel_directions_first():
    S = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    novelty = torch.tensor([0.1, 0.95, 0.2, 0.99, 0.97])
    # adaptive rank off: exactly 3 directions; the novel ones (index 1, 3, 4) beat stronger stale ones
    assert select_expert_directions(S, novelty, 0.0, 0.9, 1, 9, fixed_rank=3).tolist() == [1, 3, 4]
    assert select_expert_directions(S, novelty, 0.0, 0.9, 1, 9, fixed_rank=4).tolist() == [0, 1, 3, 4]
    assert select_expert_directions(S, None, 0.0, 0.9, 1, 9, fixed_rank=3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("gap", [True, False])
def test_capability_gap_switch_alone_decides_the_projection(tmp_path, warm_cache, gap):
    """The group's second task (dark images, history: task 0's expert): with the gap its expert's rows lie off
    the history's row space; with capability_gap=false they do not, at the same fixed rank."""
    s = open_mechanism_session(tmp_path, ["method.fixed_rank=3", f"method.capability_gap={str(gap).lower()}"])
    recs = [{} for _ in range(3)]
    for t in range(3):
        drive(s, t, recs[t])
    check_stream_shape(s)
    m = s.method
    for key, layer in m.layers.items():
        assert layer.ranks[2] == 3
        Q = torch.linalg.svd(layer.experts_A[0].detach().double(), full_matrices=False)[2].T  # frozen since task 0
        overlap = float((recs[2]["expert"][key][1].double() @ Q).abs().max())  # A as consolidation made it
        assert (overlap < 1e-4) if gap else (overlap > 1e-3), overlap
    assert set(m.consolidation_log[2]["novelty"]) == (set(m.layers) if gap else set())


@pytest.mark.parametrize("fraction, total, warm", [(0.05, 100, 5), (0.2, 100, 20), (0.5, 10, 5), (0.2, 12, 3),
                                                   (0.01, 10, 1), (0.9, 10, 9), (0.99, 10, 9)])
def test_warmup_length_follows_the_fraction(fraction, total, warm):
    phases = Cram(CramConfig(warmup_fraction=fraction)).phases(0, total)
    assert [(p.name, p.steps) for p in phases] == [("warmup", warm), ("stable", total - warm)]


def test_theta_from_the_config_decides_level_one():
    """Two groups exist; a task's text is closer to the first by a cosine margin of about 0.3: theta 0.1 joins
    it, theta 0.5 opens a third group."""
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    new = torch.tensor([0.8, 0.45, 0.4])
    decisions = {}
    for theta in (0.1, 0.5):
        m = Cram(CramConfig(theta=theta))
        m.groups.decide(a)
        m.groups.decide(b)
        decisions[theta] = m.groups.decide(new)
    assert decisions == {0.1: (0, False), 0.5: (2, True)}


class _TextStub:
    """Routing encoders whose text embedding of a record is a fixed vector per record id."""

    def __init__(self, vectors):
        self.vectors = vectors

    def text_embeddings(self, records):
        return torch.stack([self.vectors[r] for r in records])


def test_prototypes_are_running_means_of_every_training_record():
    """Batches of unequal size: the prototype is the mean over records (not over batch means), the count the
    number of records."""
    gen = torch.Generator().manual_seed(0)
    vectors = {i: torch.randn(6, generator=gen) for i in range(7)}
    m = Cram(CramConfig())
    m.encoders = _TextStub(vectors)
    m.groups.decide(vectors[0])
    m.task_group = [0]
    for batch in ([0, 1, 2, 3, 4], [5], [6]):
        m._update_prototype(batch)
    expected = torch.stack(list(vectors.values())).double().mean(0).float()
    assert torch.allclose(m.groups.prototypes[0], expected, atol=1e-6)
    assert int(m.groups.counts[0]) == 7


def test_every_training_batch_of_both_phases_joins_the_prototype(tmp_path, warm_cache):
    """Task 1 has a group of its own: its prototype has counted every record of its warm-up and stable
    batches."""
    from cram_mechanism_stream import STEPS

    s = open_mechanism_session(tmp_path)
    for t in range(2):
        drive(s, t, {})
    assert int(s.method.groups.counts[s.method.task_group[1]]) == STEPS[1] * BATCH


def test_no_warmup_takes_its_rank_from_fixed_rank(tmp_path, warm_cache):
    s = open_mechanism_session(tmp_path, ["method.no_warmup=true", "method.fixed_rank=3"])
    m = s.method
    task = s.bench.tasks[0]
    s.backbone.prepare(list(task.train))
    m.before_task(0, task)
    assert [p.name for p in m.phases(0, 5)] == ["stable"]
    for layer in m.layers.values():
        assert layer.ranks[0] == 3
        assert layer.expert_scales[0] == pytest.approx(m.cfg.buffer_alpha / m.cfg.buffer_rank)


def test_oracle_routing_overrules_a_wrong_group_and_counts_it(tmp_path, warm_cache):
    """A record of task 0 whose instruction level 1 sends to task 1's group: the oracle gives it task 0's
    expert (weight 1) and counts it; without a task id it is routed by its image, not to a first expert."""
    s = open_mechanism_session(tmp_path, ["method.routing=oracle"])
    for t in range(3):
        drive(s, t, {})
    m = s.method
    records = list(s.bench.tasks[0].test[:2])
    batch = s.backbone.collate(records, train=False)
    true_group = m.expert_group[m.expert_for_task(0)]
    wrong = m.expert_group[m.expert_for_task(1)]
    m.assign_groups = lambda recs: torch.full((len(recs),), wrong, dtype=torch.long)  # a level-1 error
    batch["task_index"] = torch.tensor([0, 0])
    m.prepare_batch(batch, train=False)
    assert m.oracle_overruled == 2
    assert torch.equal(m._weights[:, :, m.expert_for_task(0)], torch.ones(m.num_layers, 2))
    # no task id, or a task with no expert (one not trained yet): routed by the image, never to the group's first
    # expert (the dark images' own expert, the group's second, carries most of the weight)
    del m.assign_groups
    dark = s.backbone.collate(list(s.bench.tasks[2].test[:2]), train=False)
    for task_index in (None, torch.tensor([7, 7])):
        m.prepare_batch(dark | {"task_index": task_index}, train=False)
        w = m._weights[:, :, [k for k, g in enumerate(m.expert_group) if g == true_group]]
        assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5)
        assert float(w[:, :, -1].min()) > 0.5, task_index
    assert m.oracle_overruled == 2
