"""CRAM's mechanisms checked at method level on a stream where they all act (CRAM.md parts 3-6).

The stream is built by cram_mechanism_stream.py (a YAML, JSONL records and PNG images in a tmp directory),
so nothing depends on the built-in stream's task names: three tasks in two instruction formats,

    task 0  format "shape" on LIGHT images    -> group g0 (new)
    task 1  format "colour" on coloured images -> group g1 (new)
    task 2  format "shape" on DARK images      -> joins g0: consolidates against task 0's expert and trains
                                                  with the orthogonality penalty; task 1's expert is in
                                                  another group and must play no part in it.

The lifecycle (before_task, phases, begin_phase, prepare_batch, compute_loss, end_phase, after_task) is
driven by hand with a few optimizer steps, and every quantity is recomputed here from first principles
(the buffer's SVD, the history basis, the RBF weights, the image-token pooling) rather than through
cramcl's own helpers, so that a break in any one of them shows up as a mismatch:

  * consolidation: expert delta == kept part of the buffer's update (scale applied once), projected off
    the *same group's* history;
  * centroids of a new expert start at c_buf, the mean image embedding of *this* task's warm-up;
  * warm-up: routing weight exactly 0 on every expert (only the buffer acts);
  * routing: weight exactly 0 outside each sample's group, in training and at evaluation, and the
    other group's experts do not change a sample's output;
  * penalty: equals lambda * mean_modules mean_b gate_b ||Q_hist^T s B A h_b||^2 with h_b pooled over the
    image tokens and gate_b the RBF weight of the earlier same-group experts; > 0 when the gate is > 0.
"""
from __future__ import annotations

import pytest
import torch

from cram_mechanism_stream import (basis, check_stream_shape, collate, drive, expected_delta, open_mechanism_session,
                                   penalty_probe)


# ----------------------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """CRAM trained by hand through the three tasks; everything the tests check is recorded on the way."""
    s = open_mechanism_session(tmp_path_factory.mktemp("cram_mech"))
    torch.manual_seed(0)
    recs = {}
    for t in range(3):
        recs[t] = {}
        probe = None
        if t == 2:
            light = list(s.bench.tasks[0].train[:3])
            dark = list(s.bench.tasks[2].train[:3])
            probe = penalty_probe(s, light + dark)
        drive(s, t, recs[t], on_stable=probe)
    return s, recs




# ----------------------------------------------------------------------------------------- tests
def test_stream_has_two_groups_one_holding_two_tasks(stream):
    s, recs = stream
    check_stream_shape(s)
    assert [recs[t]["log"]["history_experts"] for t in range(3)] == [0, 0, 1]


@pytest.mark.parametrize("task", [0, 1, 2])
def test_new_expert_delta_is_the_kept_part_of_the_buffer_update(stream, task):
    """B @ A (scale 1, per module) == U_S S_S V_S^T of svd(s * B_buf A_buf), V_S projected off the row space
    of the earlier experts *of the same group* (task 1 has none: its group is new; task 2 has task 0's)."""
    s, recs = stream
    check_stream_shape(s)
    m, rec = s.method, recs[task]
    history = [k for k in range(rec["new"]) if m.expert_group[k] == m.expert_group[rec["new"]]]
    assert history == ([0] if task == 2 else [])
    checked = 0
    for key, (B_buf, A_buf, scale) in rec["buffer"].items():
        B, A, stored_scale = rec["expert"][key]
        got = stored_scale * B.double() @ A.double()
        hist = [m.layers[key].experts_A[k].detach() for k in history]
        ref, rank, ambiguous = expected_delta(B_buf, A_buf, scale, hist, m.cfg)
        if ambiguous:
            continue
        checked += 1
        assert ref.norm() > 0
        assert A.shape[0] == rank, (key, A.shape, rank)
        err = float((got - ref).norm() / ref.norm())
        assert err < 1e-3, f"{key}: expert delta differs from the kept buffer update by {err:.2e}"
        if hist:
            Q = basis(torch.cat(hist))
            assert float((A.double() @ Q).abs().max()) < 1e-4  # rows off the group history
    assert checked >= len(rec["buffer"]) - 2, f"only {checked} modules away from the thresholds"
    # and the layer applies exactly that delta (no scale on top of the stored factors)
    assert rec["effective_gap"] < 1e-4, rec["effective_gap"]


@pytest.mark.parametrize("task", [0, 1, 2])
def test_new_centroids_start_at_this_tasks_c_buf(stream, task):
    """Every layer's centroid of the new expert == mean image embedding of this task's warm-up batches
    only (c_buf is reset when a task starts)."""
    s, recs = stream
    m, rec = s.method, recs[task]
    q = m.encoders.image_embeddings(rec["warm_records"]).double()
    c_buf = q.mean(0)
    init = rec["centroid_init"].double()
    assert init.shape == (m.num_layers, q.shape[1])
    assert torch.allclose(init, c_buf.expand_as(init), atol=1e-5), \
        float((init - c_buf).abs().max())
    if task > 0:  # sanity: the stream's images differ, so a c_buf mixing tasks would not match
        earlier = m.encoders.image_embeddings(recs[task - 1]["warm_records"]).double()
        mixed = torch.cat([earlier, q]).mean(0)
        assert float((mixed - c_buf).abs().max()) > 1e-3


@pytest.mark.parametrize("task", [1, 2])
def test_experts_are_silent_during_warmup(stream, task):
    """Warm-up: routing weight exactly 0 on every existing expert, the buffer at weight 1, and each adapted
    layer computes W0 x + s B_buf A_buf x."""
    s, recs = stream
    rec = recs[task]
    assert rec["warm_weights"]
    for w in rec["warm_weights"]:
        assert w.shape[-1] == task and torch.count_nonzero(w) == 0
    for routes in rec["warm_route"]:
        for r in routes:
            assert r is not None and torch.count_nonzero(r) == 0
    assert all(b == 1.0 for b in rec["warm_buffer_weight"])
    assert rec["warm_forward"] < 1e-5, rec["warm_forward"]


def test_orthogonality_penalty_equals_hand_computation(stream):
    """First stable step of the group's second task, on a batch of both tasks' images: L_orth ==
    lambda * mean_modules mean_b gate_b ||Q_hist^T s B A h_b||^2 with h_b the layer input pooled over the
    image tokens and gate_b the RBF weight on the group's earlier expert; > 0 since the gate is > 0."""
    s, recs = stream
    rec = recs[2]
    assert rec["gate_max"] > 1e-3
    assert rec["orth_expected"] > 0
    assert rec["orth"] is not None, "the penalty is missing although the group has history"
    got = float(rec["orth"])
    assert got > 0
    assert got == pytest.approx(rec["orth_expected"], rel=1e-4, abs=1e-12)


def test_the_penalty_reaches_the_loss_scaled_by_lambda(stream):
    """The training loss is the LM loss plus exactly lambda times the penalty (a penalty computed and reported
    but not added, or added without lambda, fails here): total - LM == the hand-computed lambda * L_orth, and at
    three times lambda the difference triples."""
    s, recs = stream
    rec = recs[2]
    added = rec["loss_total"] - rec["loss_lm"]
    assert added == pytest.approx(rec["orth_expected"], rel=1e-3, abs=1e-9)
    assert rec["loss_total_3x"] - rec["loss_lm"] == pytest.approx(3 * added, rel=1e-3, abs=1e-9)


def test_no_penalty_without_same_group_history(stream):
    """Task 1 opens its own group: no earlier expert in it, so no orthogonality term."""
    s, recs = stream
    assert all("orth" not in keys for keys in recs[1]["stable_aux_keys"])
    assert all("orth" in keys for keys in recs[2]["stable_aux_keys"])


def test_training_weights_are_zero_outside_the_tasks_group(stream):
    s, recs = stream
    m = s.method
    for t in (1, 2):
        members = [k for k in range(t + 1) if m.expert_group[k] == m.expert_group[t]]
        others = [k for k in range(t + 1) if k not in members]
        for w in recs[t]["stable_weights"]:
            assert w.shape[-1] == t + 1
            if others:
                assert torch.count_nonzero(w[..., others]) == 0
            assert torch.allclose(w[..., members].sum(-1), torch.ones(w.shape[:2], dtype=w.dtype), atol=1e-5)


def test_mixed_group_batch_routes_each_sample_inside_its_group(stream):
    """Eval batch mixing both groups: each sample gets its own group (level 1), weight exactly 0 on the
    other group's experts, weights summing to 1 inside; and the other group's experts do not change its
    output (their factors zeroed: same logits), while its own group's experts do."""
    s, _ = stream
    m, model = s.method, s.backbone.model
    tasks = s.bench.tasks
    records = [tasks[0].test[0], tasks[1].test[0], tasks[2].test[0], tasks[1].test[1], tasks[0].test[1]]
    owner = [0, 1, 2, 1, 0]
    want_group = torch.tensor([m.task_group[t] for t in owner])
    batch = collate(s, records, train=False)
    model.eval()
    m.prepare_batch(batch, train=False)
    assert torch.equal(m.assign_groups(records), want_group)
    w = m._weights
    K = len(m.expert_group)
    assert w.shape == (m.num_layers, len(records), K)
    for b, g in enumerate(want_group.tolist()):
        inside = [k for k in range(K) if m.expert_group[k] == g]
        outside = [k for k in range(K) if m.expert_group[k] != g]
        assert torch.count_nonzero(w[:, b, outside]) == 0, (b, w[:, b])
        assert torch.allclose(w[:, b, inside].sum(-1), torch.ones(m.num_layers, dtype=w.dtype), atol=1e-5)
    # a sample's output does not depend on the other group's experts
    inputs = s.backbone.model_inputs(batch)
    with torch.no_grad():
        ref = model(**inputs).logits
        for g_off in sorted(set(m.expert_group)):
            saved = {key: [l.experts_B[k].detach().clone() for k in range(K)] for key, l in m.layers.items()}
            try:
                for l in m.layers.values():
                    for k in range(K):
                        if m.expert_group[k] == g_off:
                            l.experts_B[k].zero_()
                m.prepare_batch(batch, train=False)
                out = model(**inputs).logits
            finally:
                for key, l in m.layers.items():
                    for k in range(K):
                        l.experts_B[k].copy_(saved[key][k])
            for b, g in enumerate(want_group.tolist()):
                if g == g_off:
                    assert not torch.allclose(out[b], ref[b], atol=1e-6), "own experts should matter"
                else:
                    assert torch.allclose(out[b], ref[b], atol=1e-5), f"sample {b} saw group {g_off}'s experts"
