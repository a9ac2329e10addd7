"""CRAM's mechanisms checked at method level on a stream where they all act (CRAM.md parts 3-6).

The stream is built here (a YAML, JSONL records and PNG images in a tmp directory), so nothing depends on
the built-in stream's task names: three tasks in two instruction formats,

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

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

FORMAT_SHAPE = "What shape is drawn in the picture?"
FORMAT_COLOUR = "Is the background red? Answer yes or no."
SHAPES = ("circle", "square")
N_TRAIN, N_TEST = 12, 4
BATCH = 4
LR = 2e-3
# task -> (total optimizer steps); warm-up = ceil(0.2 * total) (quick profile's warmup_fraction)
STEPS = {0: 5, 1: 5, 2: 10}


# ----------------------------------------------------------------------------------------- the stream
def _draw(path: Path, bg, fg, shape: str, jitter: int) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), bg)
    d = ImageDraw.Draw(im)
    a, b = 14 + jitter, 50 - jitter
    (d.ellipse if shape == "circle" else d.rectangle)([a, a, b, b], fill=fg)
    im.save(path)


def _write_benchmark(root: Path) -> Path:
    """Three tasks (see the module docstring), a tiny pretrain file; fixed texts (fixed vocabulary)."""
    img = root / "images"
    img.mkdir(parents=True)

    def split(task: str, n: int, offset: int, make) -> list[dict]:
        out = []
        for i in range(n):
            j = i + offset
            q, a, bg, fg, shape = make(j)
            name = f"{task}-{j:03d}.png"
            _draw(img / name, bg, fg, shape, j % 5)
            out.append({"id": f"{task}-{j}", "image": name, "question": q, "answer": a})
        return out

    def light(j):
        shape = SHAPES[j % 2]
        return FORMAT_SHAPE, shape, (235 + j % 3 * 5, 235, 240), (20, 20, 20), shape

    def dark(j):
        shape = SHAPES[(j // 2) % 2]
        return FORMAT_SHAPE, shape, (10 + j % 3 * 5, 10, 15), (235, 235, 235), shape

    def colour(j):
        red = j % 2 == 0
        return FORMAT_COLOUR, "yes" if red else "no", (200, 30, 30) if red else (30, 40, 200), (120, 120, 40), "square"

    tasks = [("light", light), ("coloured", colour), ("dark", dark)]
    entries = []
    for name, make in tasks:
        (root / name).mkdir()
        for slot, n, off in (("train", N_TRAIN, 0), ("test", N_TEST, 100)):
            (root / name / f"{slot}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in split(name, n, off, make)))
        entries.append({"name": name, "train": f"{name}/train.jsonl", "test": f"{name}/test.jsonl",
                        "scorer": "exact"})
    pre = []
    for j in range(8):
        shape = SHAPES[j % 2]
        bg, word = ((240, 240, 240), "white") if j % 4 < 2 else ((10, 10, 10), "black")
        name = f"pre-{j}.png"
        _draw(img / name, bg, (128, 128, 128), shape, j % 3)
        pre.append({"id": f"pre-{j}", "image": name, "question": "Describe the image.", "answer": f"a {shape} on {word}"})
    (root / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pre))
    import yaml

    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump({"name": "cram-mechanisms", "image_root": "images",
                                    "pretrain": "pretrain.jsonl", "tasks": entries}))
    return path


# ----------------------------------------------------------------------------------------- references
def _basis(M: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (columns) of the row space of M (float64)."""
    _, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return Vh[S > tol * S[0]].T


def _expected_delta(B_buf, A_buf, scale, history_As, cfg) -> torch.Tensor:
    """CRAM.md part 5, recomputed from the full update (no QR shortcut): the kept directions of
    svd(s * B_buf A_buf), projected off the history row space and renormalised, as U_S S_S V_S^T."""
    M = scale * B_buf.double() @ A_buf.double()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    n = min(B_buf.shape[0], B_buf.shape[1], A_buf.shape[1])
    U, S, Vh = U[:, :n], S[:n], Vh[:n]
    order = list(range(n))
    cand = [i for i in order if S[i] > cfg.tau_alloc][:cfg.r_max] or [0]
    # float32 (the method) vs float64 (here) may disagree on a value within a hair of a threshold
    ambiguous = bool(((S - cfg.tau_alloc).abs() < 1e-5).any())
    Q = _basis(torch.cat(history_As).double()) if history_As else None
    if Q is not None:
        nov = (Vh - (Vh @ Q) @ Q.T).norm(dim=1) / Vh.norm(dim=1)
        kept = [i for i in cand if nov[i] > cfg.tau_novel] or [cand[0]]
        ambiguous |= bool(((nov[cand] - cfg.tau_novel).abs() < 1e-5).any())
    else:
        kept = list(cand)
    for i in order:
        if len(kept) >= min(cfg.r_min, cfg.r_max, n):
            break
        if i not in kept:
            kept.append(i)
    kept = sorted(kept)
    V = Vh[kept]
    if Q is not None:
        V = V - (V @ Q) @ Q.T
        V = V / V.norm(dim=1, keepdim=True)
    return (U[:, kept] * S[kept]) @ V, len(kept), ambiguous


def _rbf(q: torch.Tensor, C: torch.Tensor, sigma: float) -> torch.Tensor:
    """q: (B, D), C: (K, D) -> (B, K) softmax_k(-||q - c_k||^2 / (2 sigma^2))."""
    d2 = (q.double()[:, None, :] - C.double()[None]).pow(2).sum(-1)
    return torch.softmax(-d2 / (2 * sigma ** 2), dim=-1)


# ----------------------------------------------------------------------------------------- driver
def _collate(s, records, train):
    s.backbone.prepare(records)
    return s.backbone.collate(records, train=train)


def _drive(s, t, rec: dict, on_stable=None) -> None:
    """One task by hand through CRAM's lifecycle, recording what the tests check."""
    m, model = s.method, s.backbone.model
    task = s.bench.tasks[t]
    train = list(task.train)
    s.backbone.prepare(train)
    m.before_task(t, task)
    phases = m.phases(t, STEPS[t])
    assert [p.name for p in phases] == ["warmup", "stable"]
    g = torch.Generator().manual_seed(100 + t)
    step = 0
    for phase in phases:
        m.begin_phase(phase)
        params = m.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        for _ in range(phase.steps):
            idx = torch.randperm(len(train), generator=g)[:BATCH].tolist()
            recs = [train[i] for i in idx]
            batch = s.backbone.collate(recs, train=True)
            model.train()
            m.prepare_batch(batch, train=True)
            if phase.name == "warmup":
                rec.setdefault("warm_records", []).extend(recs)
                rec.setdefault("warm_weights", []).append(m._weights.detach().clone())
                rec.setdefault("warm_route", []).append(
                    [_clone(m.context.route(layer, None)) for layer in m.layers.values()])
                rec.setdefault("warm_buffer_weight", []).append(m.context.buffer_weight)
            elif step == phases[0].steps and on_stable is not None:
                on_stable(rec)  # first stable step: before the new expert moves
                model.train()
                m.prepare_batch(batch, train=True)
            if phase.name == "stable":
                rec.setdefault("stable_weights", []).append(m._weights.detach().clone())
            loss, aux = m.compute_loss(model, batch)
            if phase.name == "stable":
                rec.setdefault("stable_aux_keys", []).append(set(aux))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        if phase.name == "warmup":
            model.eval()
            if m.num_layers and m.expert_group:
                rec["warm_forward"] = _warmup_forward_gap(m)
            rec["buffer"] = {k: (l.buffer_B.detach().clone(), l.buffer_A.detach().clone(), l.buffer_scale)
                             for k, l in m.layers.items()}
            n_before = len(m.expert_group)
            m.end_phase(phase)
            new = len(m.expert_group) - 1
            assert new == n_before
            rec["new"] = new
            rec["expert"] = {k: (l.experts_B[new].detach().clone(), l.experts_A[new].detach().clone(),
                                 l.expert_scales[new]) for k, l in m.layers.items()}
            rec["centroid_init"] = m.centroids.centroids[new].detach().clone()
            rec["log"] = dict(m.consolidation_log[-1])
            rec["effective_gap"] = _effective_delta_gap(m, new, rec)
        else:
            m.end_phase(phase)
    model.eval()
    m.after_task(t)


def _clone(t):
    return None if t is None else t.detach().clone()


@torch.no_grad()
def _warmup_forward_gap(m) -> float:
    """During warm-up an adapted layer must compute W0 x + 1 * s * B_buf A_buf x: experts silent."""
    gen = torch.Generator().manual_seed(7)
    worst = 0.0
    for layer in m.layers.values():
        x = torch.randn(BATCH, 5, layer.in_features, generator=gen)  # the batch the routing state is for
        expected = layer.base(x) + layer.buffer_scale * (x @ layer.buffer_A.t()) @ layer.buffer_B.t()
        worst = max(worst, float((layer(x) - expected).abs().max()))
    return worst


@torch.no_grad()
def _effective_delta_gap(m, new: int, rec: dict) -> float:
    """The new expert as the layer applies it (routing weight 1 on it, buffer off) vs its B @ A: any scale the
    layer applies on top of the stored factors shows here."""
    saved_route, saved_buf, saved_active = m.context.route, m.context.buffer_weight, m.context.active
    worst = 0.0
    gen = torch.Generator().manual_seed(11)
    try:
        m.context.buffer_weight = None
        m.context.active = None  # the probe's own routing: every expert may run
        for key, layer in m.layers.items():
            x = torch.randn(2, 3, layer.in_features, generator=gen)
            w = torch.zeros(2, layer.num_experts)
            w[:, new] = 1.0
            m.context.route = lambda _l, _x, w=w: w
            got = layer(x) - layer.base(x)
            B, A, _ = rec["expert"][key]
            ref = x @ (B @ A).t()
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    finally:
        m.context.route, m.context.buffer_weight, m.context.active = saved_route, saved_buf, saved_active
    return worst


def _penalty_probe(s, records_mixed):
    """At the first stable step of a task with history: the method's penalty and a hand computation."""

    def probe(rec):
        m, model = s.method, s.backbone.model
        model.eval()
        batch = _collate(s, records_mixed, train=True)
        captured = {}
        hooks = [layer.register_forward_pre_hook(
            lambda mod, args, key=key: captured.__setitem__(key, args[0].detach().clone()))
            for key, layer in m.layers.items()]
        try:
            m.prepare_batch(batch, train=True)
            with torch.no_grad():
                _, aux = m.compute_loss(model, batch)
        finally:
            for h in hooks:
                h.remove()
        new = len(m.expert_group) - 1
        group = m.expert_group[new]
        history = [k for k in range(new) if m.expert_group[k] == group]
        members = history + [new]
        q = m.encoders.image_embeddings(records_mixed).double()
        mask = batch["image_mask"].double().unsqueeze(-1)  # (B, T, 1)
        per_module, gates = [], []
        for key, layer in m.layers.items():
            x = captured[key].double()
            h = (x * mask).sum(1) / mask.sum(1)  # (B, d_in): mean over image tokens only
            z = layer.expert_scales[new] * h @ layer.experts_A[new].detach().double().t() @ \
                layer.experts_B[new].detach().double().t()
            if layer.in_features == layer.out_features:
                Q = _basis(torch.cat([layer.experts_A[k].detach() for k in history]))
            else:
                Q = _basis(torch.cat([layer.experts_B[k].detach().t() for k in history]))
            E = (z @ Q).pow(2).sum(-1)
            C = torch.stack([m.centroids.centroids[k][layer.layer_index].detach() for k in members])
            sigma = m.cfg.sigma
            if m.cfg.sigma_units == "gap":  # sigma relative to the closest pair of the group's centroids
                d2 = (C[:, None, :] - C[None, :, :]).pow(2).sum(-1)
                sigma = sigma * float(d2[~torch.eye(len(C), dtype=torch.bool)].min()) ** 0.5
            pi = _rbf(q, C, sigma)
            gate = pi[:, :len(history)].sum(-1)
            gates.append(gate)
            per_module.append((gate * E).mean())
        rec["orth"] = aux.get("orth")
        rec["orth_expected"] = float(m.cfg.lambda_orth * torch.stack(per_module).mean())
        rec["gate_max"] = float(torch.stack(gates).max())

    return probe


# ----------------------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """CRAM trained by hand through the three tasks; everything the tests check is recorded on the way."""
    from conftest import LogSink
    from cramcl.config import resolve_config
    from cramcl.engine.session import open_session

    root = tmp_path_factory.mktemp("cram_mech")
    bench = _write_benchmark(root / "bench")
    cfg = resolve_config(method="cram", profile="quick", overrides=[
        f"data.benchmark={bench}", "backbone.base_steps=4", "backbone.base_batch_size=8",
        f"train.batch_size={BATCH}", "method.group_init_samples=8",
        # the quick profile's CRAM values, pinned: the groups [a, b, a] and a gate well above 0 rely on them
        "method.theta=0.25", "method.sigma=0.25", "method.warmup_fraction=0.2", "method.tau_novel=0.9"])
    s = open_session(cfg, root / "run", log=LogSink())
    torch.manual_seed(0)
    recs = {}
    for t in range(3):
        recs[t] = {}
        probe = None
        if t == 2:
            light = list(s.bench.tasks[0].train[:3])
            dark = list(s.bench.tasks[2].train[:3])
            probe = _penalty_probe(s, light + dark)
        _drive(s, t, recs[t], on_stable=probe)
    return s, recs


def _check_stream_shape(s):
    m = s.method
    g = m.task_group
    assert g[0] == g[2] != g[1], f"the in-test stream should give groups [a, b, a], got {g}"
    assert m.expert_group == g and m.expert_task == [0, 1, 2]


# ----------------------------------------------------------------------------------------- tests
def test_stream_has_two_groups_one_holding_two_tasks(stream):
    s, recs = stream
    _check_stream_shape(s)
    assert [recs[t]["log"]["history_experts"] for t in range(3)] == [0, 0, 1]


@pytest.mark.parametrize("task", [0, 1, 2])
def test_new_expert_delta_is_the_kept_part_of_the_buffer_update(stream, task):
    """B @ A (scale 1, per module) == U_S S_S V_S^T of svd(s * B_buf A_buf), V_S projected off the row space
    of the earlier experts *of the same group* (task 1 has none: its group is new; task 2 has task 0's)."""
    s, recs = stream
    _check_stream_shape(s)
    m, rec = s.method, recs[task]
    history = [k for k in range(rec["new"]) if m.expert_group[k] == m.expert_group[rec["new"]]]
    assert history == ([0] if task == 2 else [])
    checked = 0
    for key, (B_buf, A_buf, scale) in rec["buffer"].items():
        B, A, stored_scale = rec["expert"][key]
        got = stored_scale * B.double() @ A.double()
        hist = [m.layers[key].experts_A[k].detach() for k in history]
        ref, rank, ambiguous = _expected_delta(B_buf, A_buf, scale, hist, m.cfg)
        if ambiguous:
            continue
        checked += 1
        assert ref.norm() > 0
        assert A.shape[0] == rank, (key, A.shape, rank)
        err = float((got - ref).norm() / ref.norm())
        assert err < 1e-3, f"{key}: expert delta differs from the kept buffer update by {err:.2e}"
        if hist:
            Q = _basis(torch.cat(hist))
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
    batch = _collate(s, records, train=False)
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
