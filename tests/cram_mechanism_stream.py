"""The three-task stream of test_cram_mechanisms.py (two instruction formats, one holding two tasks on
light vs dark images), the hand-driven CRAM lifecycle that records what the tests check, and the
first-principles references (buffer SVD, history basis, RBF weights) the records are compared with."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cramcl.methods.base import Method

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
def draw(path: Path, bg, fg, shape: str, jitter: int) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), bg)
    d = ImageDraw.Draw(im)
    a, b = 14 + jitter, 50 - jitter
    (d.ellipse if shape == "circle" else d.rectangle)([a, a, b, b], fill=fg)
    im.save(path)


def write_benchmark(root: Path) -> Path:
    """Three tasks (see the module docstring), a tiny pretrain file; fixed texts (fixed vocabulary)."""
    img = root / "images"
    img.mkdir(parents=True)

    def split(task: str, n: int, offset: int, make) -> list[dict]:
        out = []
        for i in range(n):
            j = i + offset
            q, a, bg, fg, shape = make(j)
            name = f"{task}-{j:03d}.png"
            draw(img / name, bg, fg, shape, j % 5)
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
        draw(img / name, bg, (128, 128, 128), shape, j % 3)
        pre.append({"id": f"pre-{j}", "image": name, "question": "Describe the image.",
                    "answer": f"a {shape} on {word}"})
    (root / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pre))
    import yaml

    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump({"name": "cram-mechanisms", "image_root": "images",
                                    "pretrain": "pretrain.jsonl", "tasks": entries}))
    return path


# ----------------------------------------------------------------------------------------- references
def basis(M: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (columns) of the row space of M (float64)."""
    _, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return Vh[S > tol * S[0]].T


def expected_delta(B_buf, A_buf, scale, history_As, cfg) -> torch.Tensor:
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
    Q = basis(torch.cat(history_As).double()) if history_As else None
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


def rbf(q: torch.Tensor, C: torch.Tensor, sigma: float) -> torch.Tensor:
    """q: (B, D), C: (K, D) -> (B, K) softmax_k(-||q - c_k||^2 / (2 sigma^2))."""
    d2 = (q.double()[:, None, :] - C.double()[None]).pow(2).sum(-1)
    return torch.softmax(-d2 / (2 * sigma ** 2), dim=-1)


def open_mechanism_session(root: Path, extra=()):
    """A session on this stream with the quick profile's CRAM values pinned (the groups [a, b, a] and a
    penalty gate well above 0 rely on them), plus ``extra`` settings."""
    from conftest import LogSink
    from cramcl.config import resolve_config
    from cramcl.engine.session import open_session

    bench = write_benchmark(root / "bench")
    cfg = resolve_config(method="cram", profile="quick", overrides=[
        f"data.benchmark={bench}", "backbone.base_steps=4", "backbone.base_batch_size=8",
        f"train.batch_size={BATCH}", "method.group_init_samples=8",
        "method.theta=0.25", "method.sigma=0.25", "method.warmup_fraction=0.2", "method.tau_novel=0.9", *extra])
    return open_session(cfg, root / "run", log=LogSink())


# ----------------------------------------------------------------------------------------- driver
def collate(s, records, train):
    s.backbone.prepare(records)
    return s.backbone.collate(records, train=train)


def drive(s, t, rec: dict, on_stable=None) -> None:
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
                    [clone(m.context.route(layer, None)) for layer in m.layers.values()])
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
                rec["warm_forward"] = warmup_forward_gap(m)
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
            rec["effective_gap"] = effective_delta_gap(m, new, rec)
        else:
            m.end_phase(phase)
    model.eval()
    m.after_task(t)


def clone(t):
    return None if t is None else t.detach().clone()


@torch.no_grad()
def warmup_forward_gap(m) -> float:
    """During warm-up an adapted layer must compute W0 x + 1 * s * B_buf A_buf x: experts silent."""
    gen = torch.Generator().manual_seed(7)
    worst = 0.0
    for layer in m.layers.values():
        x = torch.randn(BATCH, 5, layer.in_features, generator=gen)  # the batch the routing state is for
        expected = layer.base(x) + layer.buffer_scale * (x @ layer.buffer_A.t()) @ layer.buffer_B.t()
        worst = max(worst, float((layer(x) - expected).abs().max()))
    return worst


@torch.no_grad()
def effective_delta_gap(m, new: int, rec: dict) -> float:
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


def penalty_probe(s, records_mixed):
    """At the first stable step of a task with history: the method's penalty and a hand computation."""

    def probe(rec):
        m, model = s.method, s.backbone.model
        model.eval()
        batch = collate(s, records_mixed, train=True)
        captured = {}
        hooks = [layer.register_forward_pre_hook(
            lambda mod, args, key=key: captured.__setitem__(key, args[0].detach().clone()))
            for key, layer in m.layers.items()]
        try:
            m.prepare_batch(batch, train=True)
            with torch.no_grad():
                total, aux = m.compute_loss(model, batch)
                # the same batch's language-model loss alone, and the total at three times lambda (the model is in
                # eval mode: no dropout, so the forward passes are identical)
                rec["loss_lm"] = float(Method.compute_loss(m, model, batch)[0])
                lam = m.cfg.lambda_orth
                m.cfg.lambda_orth = 3 * lam
                try:
                    rec["loss_total_3x"] = float(m.compute_loss(model, batch)[0])
                finally:
                    m.cfg.lambda_orth = lam
                rec["loss_total"] = float(total)
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
                Q = basis(torch.cat([layer.experts_A[k].detach() for k in history]))
            else:
                Q = basis(torch.cat([layer.experts_B[k].detach().t() for k in history]))
            E = (z @ Q).pow(2).sum(-1)
            C = torch.stack([m.centroids.centroids[k][layer.layer_index].detach() for k in members])
            sigma = m.cfg.sigma
            if m.cfg.sigma_units == "gap":  # sigma relative to the closest pair of the group's centroids
                d2 = (C[:, None, :] - C[None, :, :]).pow(2).sum(-1)
                sigma = sigma * float(d2[~torch.eye(len(C), dtype=torch.bool)].min()) ** 0.5
            pi = rbf(q, C, sigma)
            gate = pi[:, :len(history)].sum(-1)
            gates.append(gate)
            per_module.append((gate * E).mean())
        rec["orth"] = aux.get("orth")
        rec["orth_expected"] = float(m.cfg.lambda_orth * torch.stack(per_module).mean())
        rec["gate_max"] = float(torch.stack(gates).max())

    return probe




def check_stream_shape(s):
    m = s.method
    g = m.task_group
    assert g[0] == g[2] != g[1], f"the in-test stream should give groups [a, b, a], got {g}"
    assert m.expert_group == g and m.expert_task == [0, 1, 2]
