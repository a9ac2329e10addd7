"""Level-1 instruction groups and level-2 centroid routing (CRAM.md parts 3-4)."""
import math

import pytest
import torch

from cramcl.methods.cram.centroids import (
    CentroidAccumulator, batch_mean_routing_weights, oracle_routing_weights, rbf_routing_weights,
    uniform_routing_weights,
)
from cramcl.methods.cram.groups import InstructionGroups
from cramcl.routing.prototypes import cosine_to_prototypes


def _vec_with_cos(base, cos):
    """A 2-D unit vector whose cosine to the unit vector `base` (2,) is `cos`."""
    ang = math.atan2(float(base[1]), float(base[0])) + math.acos(cos)
    return torch.tensor([math.cos(ang), math.sin(ang)])


# ----------------------------------------------------------------------------------------- level 1
def test_cosine_to_prototypes():
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    c = cosine_to_prototypes(t, p)
    exp = torch.tensor([[1.0, 0.0], [2 ** -0.5, -(2 ** -0.5)], [0.0, 0.0]])
    assert c.shape == (3, 2) and torch.allclose(c, exp, atol=1e-6)


def test_decide_empty_creates():
    g = InstructionGroups()
    assert g.num_groups == 0
    assert g.decide(torch.tensor([1.0, 0.0])) == (0, True)
    assert g.num_groups == 1 and g.counts.tolist() == [0]
    assert torch.equal(g.prototypes[0], torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("cos,expected", [(0.9, (0, False)), (0.7, (1, True))])
def test_decide_one_group(cos, expected):
    g = InstructionGroups(join_single_threshold=0.8)
    g.decide(torch.tensor([1.0, 0.0]))
    assert g.decide(_vec_with_cos(torch.tensor([1.0, 0.0]), cos)) == expected
    assert g.num_groups == (1 if expected[1] is False else 2)


def _two_groups(max_groups=5):
    g = InstructionGroups(margin_theta=0.1, max_groups=max_groups)
    e0, e1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    assert g.decide(e0) == (0, True)
    assert g.decide(e1) == (1, True)  # cos 0 < 0.8 -> new
    return g


def test_decide_two_groups_margin():
    g = _two_groups()
    # cos to g0 = 0.8, to g1 = 0.5 -> margin 0.3 > 0.1 -> join 0
    t = torch.tensor([0.8, 0.5, math.sqrt(1 - 0.64 - 0.25)])
    assert g.decide(t) == (0, False)
    # cos 0.5 / 0.55 -> margin 0.05 -> new group
    t = torch.tensor([0.5, 0.55, math.sqrt(1 - 0.25 - 0.3025)])
    assert g.decide(t) == (2, True) and g.num_groups == 3
    # joining leaves the state alone
    g2 = _two_groups()
    before = g2.state_dict()
    g2.decide(torch.tensor([0.2, 0.9, 0.1]))
    assert torch.equal(g2.prototypes, before["prototypes"]) and g2.num_groups == 2


def test_decide_max_groups_reached_joins_best():
    g = _two_groups(max_groups=2)
    t = torch.tensor([0.5, 0.55, math.sqrt(1 - 0.25 - 0.3025)])  # margin 0.05 < theta
    assert g.decide(t) == (1, False) and g.num_groups == 2


def test_running_mean_and_first_update_replaces_placeholder():
    g = InstructionGroups()
    x = torch.randn(23, 6)
    gid, created = g.decide(x[:5].mean(0) + 10.0)  # placeholder far from the real mean
    for chunk in (x[:5], x[5:12], x[12:]):
        g.update(gid, chunk)
    assert torch.allclose(g.prototypes[gid], x.mean(0), atol=1e-6)
    assert g.counts.tolist() == [23]


def test_update_from_sums_equals_update():
    x = torch.randn(40, 8, dtype=torch.float64)
    a, b = InstructionGroups(), InstructionGroups()
    for gr in (a, b):
        gr.decide(x[0])
        gr.update(0, x[:10])
    a.update(0, x[10:])
    # two "processes" see halves; sums and counts all-reduced by addition
    s = x[10:25].sum(0) + x[25:].sum(0)
    b.update_from_sums(0, s, 15 + 15)
    assert torch.allclose(a.prototypes, b.prototypes, atol=1e-7)
    assert torch.equal(a.counts, b.counts)
    assert torch.allclose(b.prototypes[0], x.mean(0).float(), atol=1e-6)


def test_assign_argmax_cosine():
    g = _two_groups()
    t = torch.tensor([[3.0, 1.0, 0.0], [0.1, 5.0, 2.0], [-1.0, -0.5, 0.0]])
    assert g.assign(t).tolist() == [0, 1, 1]
    with pytest.raises(RuntimeError):
        InstructionGroups().assign(t)


def test_state_round_trip():
    g = InstructionGroups(join_single_threshold=0.7, margin_theta=0.2, max_groups=3)
    for i in range(3):
        gid, _ = g.decide(torch.randn(5) + 4 * torch.eye(5)[i])
        g.update(gid, torch.randn(7, 5))
    h = InstructionGroups()
    h.load_state_dict(g.state_dict())
    assert torch.equal(h.prototypes, g.prototypes) and torch.equal(h.counts, g.counts)
    assert (h.join_single_threshold, h.margin_theta, h.max_groups) == (0.7, 0.2, 3)
    t = torch.randn(4, 5)
    assert torch.equal(h.assign(t), g.assign(t))
    sd = h.state_dict()
    sd["prototypes"][0, 0] += 1  # state_dict holds copies
    assert torch.equal(h.prototypes, g.prototypes)


# ----------------------------------------------------------------------------------------- level 2
def test_rbf_weights_by_hand_1d():
    q = torch.tensor([[0.0], [1.0], [3.0]])
    c = torch.tensor([[0.0], [2.0]])
    sigma = 2.0
    w = rbf_routing_weights(q, c, sigma)
    for b, x in enumerate([0.0, 1.0, 3.0]):
        l0, l1 = -(x - 0.0) ** 2 / 8, -(x - 2.0) ** 2 / 8
        p0 = math.exp(l0) / (math.exp(l0) + math.exp(l1))
        assert w[b, 0].item() == pytest.approx(p0, abs=1e-6)
        assert w[b, 1].item() == pytest.approx(1 - p0, abs=1e-6)
    assert torch.allclose(w.sum(1), torch.ones(3))


def test_rbf_stable_far_away_and_rows_sum_to_one():
    q = torch.randn(6, 16) * 1e3
    c = torch.randn(4, 16)
    w = rbf_routing_weights(q, c, 0.5)
    assert torch.isfinite(w).all() and torch.allclose(w.sum(1), torch.ones(6))


def test_rbf_gradients_reach_centroids_and_q():
    q = torch.randn(5, 8, requires_grad=True)
    c = torch.randn(3, 8, requires_grad=True)
    with torch.no_grad():
        c[0] = q[0]  # zero distance must not give NaN
    w = rbf_routing_weights(q, c, 2.0)
    (w * torch.arange(3.0)).sum().backward()
    assert c.grad is not None and c.grad.abs().sum() > 0 and torch.isfinite(c.grad).all()
    assert q.grad is not None and q.grad.abs().sum() > 0 and torch.isfinite(q.grad).all()


def test_batch_mean_routing_identical_rows():
    q, c = torch.randn(7, 4), torch.randn(3, 4)
    w = batch_mean_routing_weights(q, c, 2.0)
    ref = rbf_routing_weights(q.mean(0, keepdim=True), c, 2.0)
    assert w.shape == (7, 3)
    assert torch.allclose(w, ref.expand(7, 3))
    assert not torch.allclose(w, rbf_routing_weights(q, c, 2.0))


def test_uniform_and_oracle():
    u = uniform_routing_weights(4, 3)
    assert u.shape == (4, 3) and torch.allclose(u, torch.full((4, 3), 1 / 3))
    assert uniform_routing_weights(2, 0).shape == (2, 0)
    o = oracle_routing_weights(torch.tensor([2, 0, 2]), 3)
    assert o.tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 1]]
    with pytest.raises(ValueError):
        oracle_routing_weights(torch.tensor([3]), 3)


def test_centroid_accumulator():
    x = torch.randn(30, 6)
    acc = CentroidAccumulator()
    for chunk in (x[:4], x[4:19], x[19:]):
        acc.add(chunk)
    assert torch.allclose(acc.mean(), x.mean(0), atol=1e-6)
    # two "processes", all-reduced by summation
    p1, p2 = CentroidAccumulator(6), CentroidAccumulator(6)
    p1.add(x[:11]), p2.add(x[11:])
    (s1, n1), (s2, n2) = p1.sums(), p2.sums()
    p1.load_sums(s1 + s2, n1 + n2)
    assert p1.count == 30 and torch.allclose(p1.mean(), acc.mean(), atol=1e-7)
    with pytest.raises(RuntimeError):
        CentroidAccumulator(6).mean()


def _two_close_domains(n=200, dim=1280, seed=0):
    """Two clusters of L2-normalised embeddings with the geometry measured on the light/dark pair
    (studies/routing-embedding/README.md): task means ~0.09 apart in squared distance, each sample ~0.55 from its mean."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0) * 0.6
    shift = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0) * 0.15
    out = []
    for sign in (-1.0, 1.0):
        x = base + sign * shift + torch.randn(n, dim, generator=g) * 0.021
        out.append(torch.nn.functional.normalize(x, dim=-1))
    return out


def test_centroid_gap_is_the_closest_pair():
    from cramcl.methods.cram.centroids import centroid_gap

    c = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    assert centroid_gap(c).item() == pytest.approx(1.0)
    assert centroid_gap(c[:1]).item() == 1.0  # one expert: the scale is irrelevant
    assert centroid_gap(torch.zeros(2, 3)).item() > 0  # identical centroids: no 0/0


def test_gap_units_route_close_domains_sharply_and_are_scale_free():
    """The cause of learned routing's shortfall on the light/dark pair: an absolute sigma (0.25) spreads
    two domains whose means lie ~0.09 apart into ~0.6/0.4 weights, which no centroid position fixes
    (the new task's mean is the stationary point of its mean logit). sigma in units of the centroid gap
    routes each domain's own samples to its own expert."""
    from cramcl.methods.cram.centroids import group_layer_weights

    a, b = _two_close_domains()
    c = torch.stack([a.mean(0), b.mean(0)])  # the centroids each task's warm-up would give (c_buf)
    assert 0.05 < (c[0] - c[1]).pow(2).sum() < 0.15
    for units, lo, hi in (("absolute", 0.5, 0.75), ("gap", 0.9, 1.0)):
        for own, q in enumerate((a, b)):
            w = group_layer_weights(q, c[None], 0.25, "per_sample", sigma_units=units)[0, :, own]
            assert lo < w.mean().item() <= hi, (units, own, w.mean().item())
    q = torch.cat([a, b])
    w1 = group_layer_weights(q, c[None], 0.25, "per_sample", sigma_units="gap")
    w10 = group_layer_weights(q * 10, c[None] * 10, 0.25, "per_sample", sigma_units="gap")
    assert torch.allclose(w1, w10, atol=1e-5)
    with pytest.raises(ValueError):
        group_layer_weights(q, c[None], 0.25, "per_sample", sigma_units="metres")
