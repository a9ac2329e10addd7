"""SAME (PEERS.md): its pure math (range finder, router-gradient rewrite, curvature preconditioner, freezing,
prototype prior + top-2) and the method on the quick profile (frozen experts get no gradient, a save/load
round trip gives identical outputs, evaluation needs no task id, a 2-task stream runs end to end)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cramcl.methods import same_math as sm

from conftest import LogSink

torch.set_num_threads(1)

SAME_SPEC = "cramcl.methods.same:Same:SameConfig"
# Two tasks of different instruction formats (shape and colour share a question since cramcl-builtin/4,
# which would leave the prototype prior only the image to tell them apart).
SMOKE = ("data.tasks=[shape,digits]", "train.steps_per_task=6",
         # refresh the router basis at steps 1, 3, 5 so that a 6-step task exercises every hook
         "method.spectral_start=1", "method.spectral_every=2")


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q


def _samples(N: int, V: torch.Tensor, stds, seed: int) -> torch.Tensor:
    """(N, d) rows whose sample covariance is exactly V diag(stds^2) V^T, plus a mean offset."""
    Z = torch.randn(N, V.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    Z = torch.linalg.qr(Z - Z.mean(0, keepdim=True)).Q * math.sqrt(N - 1)  # centred, Z^T Z / (N - 1) = I
    return Z * torch.as_tensor(stds, dtype=torch.float64) @ V.T + 3.0


# ------------------------------------------------------------------------------------------ spectra
def test_range_finder_recovers_the_top_directions_of_a_low_rank_matrix():
    V = _orthonormal(48, 4, seed=0)
    X = _samples(400, V, [8.0, 4.0, 2.0, 1.0], seed=1)
    gen = torch.Generator().manual_seed(0)
    V_hat, s_hat = sm.principal_directions(X, k=6, generator=gen)
    assert V_hat.shape == (48, 6) and s_hat.shape == (6,)
    assert torch.allclose(s_hat[:4], torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=s_hat.dtype), rtol=1e-6)
    assert float(s_hat[4:].abs().max()) < 1e-6  # rank 4: nothing beyond
    assert torch.allclose((V_hat[:, :4].T @ V).abs(), torch.eye(4, dtype=V.dtype), atol=1e-6)
    assert torch.allclose(V_hat.T @ V_hat, torch.eye(6, dtype=V.dtype), atol=1e-8)
    # energies 64, 16, 4, 1 (of 85): two directions cover 94% >= 90%, one covers 75%
    assert sm.energy_rank(s_hat, 0.9) == 2 and sm.energy_rank(s_hat, 0.7) == 1


def test_merged_spectra_equal_the_spectrum_of_the_mixed_covariance():
    V1, V2 = _orthonormal(12, 3, seed=2), _orthonormal(12, 2, seed=3)
    s1, s2 = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), torch.tensor([2.5, 0.5], dtype=torch.float64)
    V, s = sm.merge_spectra(V1, s1, 3.0, V2, s2, 1.0, k=64)
    C = (3 * V1 @ torch.diag(s1 ** 2) @ V1.T + V2 @ torch.diag(s2 ** 2) @ V2.T) / 4
    assert torch.allclose(V @ torch.diag(s ** 2) @ V.T, C, atol=1e-10)


def test_smoothing_and_clipped_factors():
    assert torch.allclose(sm.smooth(torch.tensor([3.0, 6.0, 9.0, 12.0]), 3), torch.tensor([4.5, 6.0, 9.0, 10.5]))
    c = sm.spectral_factors(torch.tensor([1.2, 1.1, 1.0]), window=1)
    assert torch.allclose(c, torch.tensor([1.0 / 1.2, 1.0 / 1.1, 1.0]))
    c = sm.spectral_factors(torch.tensor([1.3, 1.2, 1.1, 1.0]), window=3)  # smoothed 1.25, 1.2, 1.1, 1.05
    assert torch.allclose(c, torch.tensor([1.05 / 1.25, 1.05 / 1.2, 1.05 / 1.1, 1.0]))
    assert torch.allclose(sm.spectral_factors(torch.tensor([8.0, 4.0, 1.0]), window=1), torch.tensor([0.8, 0.8, 1.0]))


# ------------------------------------------------------------------------------------------ gradients
def test_router_gradient_rewrite_scales_principal_directions_and_keeps_the_rest():
    g = torch.Generator().manual_seed(4)
    G = torch.randn(3, 10, generator=g, dtype=torch.float64)
    V = _orthonormal(10, 3, seed=5)
    c = torch.tensor([0.8, 0.9, 1.0], dtype=torch.float64)
    G2 = sm.spectral_router_grad(G, V, c)
    outside = torch.eye(10, dtype=G.dtype) - V @ V.T
    assert torch.allclose(G2 @ outside, G @ outside, atol=1e-12)  # component outside span(V) unchanged
    assert torch.allclose(G2 @ V, (G @ V) * c, atol=1e-12)  # each principal direction scaled by c_j
    assert not torch.allclose(G2, G)
    assert torch.allclose(sm.spectral_router_grad(G, V, torch.ones(3, dtype=G.dtype)), G)


def test_curvature_preconditioner_on_diagonal_inputs_with_known_stds():
    stds = [5.0, 3.0] + [0.1] * 6  # independent coordinates: principal directions = e_0, e_1
    X = _samples(300, torch.eye(8, dtype=torch.float64), stds, seed=6)
    U, s = sm.principal_directions(X, k=8, generator=torch.Generator().manual_seed(1))
    k = sm.energy_rank(s, 0.9)
    assert k == 2  # 25 / 34.06 < 0.9 <= 34 / 34.06
    G = torch.randn(4, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # an A-gradient (r, d)
    mu = 0.9
    expected = G * torch.tensor([1 / (5 + mu), 1 / (3 + mu)] + [1 / mu] * 6, dtype=G.dtype)
    assert torch.allclose(sm.curvature_precondition(G, U[:, :k], s[:k], mu), expected, atol=1e-10)


# ------------------------------------------------------------------------------------------ activation
def test_freezing_masks_low_score_experts_and_never_the_current_one():
    usage = torch.tensor([0.5, 0.1, 0.3, 0.1])
    importance = torch.tensor([0.0, 1.0, 0.2, 0.5])  # scores: 1, -1, 0.3, -0.5
    assert sm.activation_mask(usage, importance, current=0).tolist() == [True, False, True, False]
    assert sm.activation_mask(usage, importance, current=3).tolist() == [True, False, True, True]
    assert sm.activation_mask(usage, importance, current=1).tolist() == [True, True, True, False]
    assert sm.activation_mask(usage, importance, current=1, threshold=0.5).tolist() == [True, True, False, False]
    assert sm.minmax(torch.full((3,), 0.4)).tolist() == [0.0, 0.0, 0.0]
    new = sm.ema_update(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 5.0]), 0.95, torch.tensor([False, True]))
    assert torch.allclose(new, torch.tensor([0.95, 5.0]))
    # training weights: the batch's token mean (padding ignored), frozen experts 0, renormalised
    probs = torch.tensor([[[0.6, 0.2, 0.2], [0.0, 0.0, 1.0]], [[0.2, 0.2, 0.6], [0.2, 0.4, 0.4]]])
    valid = torch.tensor([[1, 0], [1, 1]])
    g = sm.masked_batch_weights(probs, valid, torch.tensor([True, False, True]))
    assert torch.allclose(g, torch.tensor([1.0, 0.0, 1.2]) / 2.2)


def test_prototype_prior_and_top2_pick_the_expected_experts():
    P_img, P_txt = torch.eye(3, 4), torch.eye(3, 5)
    q = torch.stack([P_img[1], P_img[0]])  # sample 0: image like task 1; sample 1: image like task 0
    t = torch.stack([P_txt[2], P_txt[1]])  # text like task 2 / task 1 (text weighs 0.8, image 0.2)
    prior = sm.prototype_prior(q, t, P_img, P_txt, 0.2, 28.0)
    assert torch.allclose(prior[0], torch.softmax(28 * torch.tensor([0.0, 0.2, 0.8]), -1))
    assert prior.argmax(-1).tolist() == [2, 1]
    router = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    w = sm.topk_renormalize(router * prior, 2)
    assert (w > 0).tolist() == [[False, True, True], [True, True, False]]
    assert torch.allclose(w.sum(-1), torch.ones(2))
    assert w.argmax(-1).tolist() == [2, 1]
    assert torch.allclose(w[0, 1:], (router * prior)[0, 1:] / (router * prior)[0, 1:].sum())


# ------------------------------------------------------------------------------------------ the method
@pytest.fixture(scope="module")
def registered():
    with pytest.MonkeyPatch.context() as mp:
        from cramcl.methods import registry

        mp.setitem(registry._METHODS, "same", SAME_SPEC)
        yield


def _config(*extra):
    from cramcl.config import resolve_config

    return resolve_config(method="same", profile="quick", overrides=[*SMOKE, *extra])


@pytest.fixture(scope="module")
def smoke_run(registered, tmp_path_factory) -> tuple[Path, dict]:
    from cramcl.engine.runner import run_stream

    out = tmp_path_factory.mktemp("same") / "run"
    return out, run_stream(_config(), out, log=LogSink())


@pytest.fixture(scope="module")
def loaded(smoke_run):
    from cramcl.engine.session import open_finished_run

    session, after, _ = open_finished_run(smoke_run[0], log=LogSink())
    assert after == 1
    return session


def test_end_to_end_two_tasks_give_a_finite_matrix(smoke_run):
    out, matrix = smoke_run
    assert matrix["tasks"] == ["shape", "digits"]
    scores = matrix["scores"]
    assert scores[0][1] is None and all(math.isfinite(v) for row in scores for v in row if v is not None)
    assert all(v is not None for v in scores[1])
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("MFT", "MFN", "MAA", "BWT"))
    assert metrics["uses_task_id_at_eval"] is False
    assert metrics["params"]["stored_total"] == metrics["params"]["active_per_sample"]  # 2 experts = top-2
    meta = json.loads((out / "checkpoints" / "task_1" / "method.json").read_text())["same"]
    assert meta["spectra_tasks"] == 2 and len(meta["task_log"]) == 2
    assert "SAME" in (out / "report.md").read_text()


def _batch(session, records, train=False):
    session.backbone.model.train(train)  # as the trainer / predict() set it (adapter dropout)
    batch = session.backbone.collate(records, train=train)
    return {k: (v.to(session.accelerator.device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def test_save_load_round_trip_gives_identical_outputs(smoke_run, loaded, tmp_path):
    from cramcl.engine.session import open_session

    out, _ = smoke_run
    session = loaded
    records = list(session.bench.tasks[1].test[:8]) + list(session.bench.tasks[0].test[:8])
    session.backbone.prepare(records)
    # the reloaded checkpoint predicts exactly what the trained in-memory method predicted during the run
    for task in session.bench.tasks:
        rows = [json.loads(l) for l in (out / "results" / "predictions" / "after_1" / f"{task.name}.jsonl").open()]
        # the run evaluated each task's whole test split as one batch: the same batch here gives the same
        # kernels, so the comparison is bit-for-bit (another batch size may flip a near-tie in float)
        batch = _batch(session, list(task.test))
        session.method.prepare_batch(batch, train=False)
        assert session.backbone.generate(session.backbone.model, batch) == [r["prediction"] for r in rows]
    # and state() -> safetensors + JSON -> load_state() into a fresh session gives the same logits
    tensors, meta = session.method.state()
    save_file(tensors, str(tmp_path / "m.safetensors"))
    fresh = open_session(session.cfg, tmp_path, log=LogSink())
    fresh.method.load_state(load_file(str(tmp_path / "m.safetensors")), json.loads(json.dumps(meta)))
    again, _ = fresh.method.state()
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)
    logits = []
    for s in (session, fresh):
        batch = _batch(s, records)
        s.method.prepare_batch(batch, train=False)
        with torch.no_grad():
            logits.append(s.backbone.model(**s.backbone.model_inputs(batch)).logits)
    # the state round trip is bit-exact (asserted above); the forward may still differ by float32 rounding when
    # the reloaded tensors' memory layout picks another kernel (measured: 1 ulp, 9.5e-7 at logits ~9)
    assert torch.allclose(logits[0], logits[1], atol=1e-5, rtol=1e-6), (logits[0] - logits[1]).abs().max()


def test_evaluation_needs_no_task_id_and_routes_each_sample(loaded):
    session, method = loaded, loaded.method
    for own, task in enumerate(session.bench.tasks):
        records = list(task.test[:16])
        batch = _batch(session, records)
        assert "task_index" not in batch
        method.prepare_batch(batch, train=False)
        preds = session.backbone.generate(session.backbone.model, batch)
        assert len(preds) == len(records)
        for key, w in method._cache.items():  # per-sample weights of every adapted layer, rows sum to 1
            assert w.shape == (len(records), 2) and torch.allclose(w.sum(-1), torch.ones(len(records)))
        assert (method._prior.argmax(-1) == own).float().mean() >= 0.9  # the prototypes find the task


def test_frozen_old_experts_get_no_gradient_and_the_current_one_trains(registered, smoke_run, tmp_path):
    from cramcl.engine.session import open_session
    from cramcl.methods.base import Phase

    session = open_session(_config(), tmp_path, log=LogSink())
    method, backbone = session.method, session.backbone
    tasks = session.bench.tasks

    def step(records):
        batch = _batch(session, records, train=True)
        method.prepare_batch(batch, train=True)
        loss, _ = method.compute_loss(backbone.model, batch)
        loss.backward()

    for t, task in enumerate(tasks):
        backbone.prepare(list(task.train[:8]))
        method.before_task(t, task)
        method.phases(t, 2 - (t == 0))  # task 0: one step, its last (where the input spectrum is pooled)
        method.begin_phase(Phase("train", 2))
        if t == 0:
            step(list(task.train[:8]))
            method.end_phase(Phase("train", 1))
            method.after_task(t)
            with torch.no_grad():  # give the old experts a non-zero B so that their A's get real gradients
                for layer in method.layers.values():
                    layer.experts_B[0].normal_(0.0, 0.02)
    layers = list(method.layers.values())
    for threshold, old_trains in ((5.0, False), (-5.0, True)):
        method.cfg.freeze_threshold = threshold  # 5: every old expert scores below; -5: none does
        for p in method.trainable_parameters():
            p.grad = None
        step(list(tasks[1].train[:8]))
        for layer in layers:
            assert method.active[layer.key].tolist() == [old_trains, True]
            assert (layer.experts_A[0].grad is not None) == old_trains
            assert (layer.experts_B[0].grad is not None) == old_trains
            assert not old_trains or layer.experts_A[0].grad.abs().sum() > 0
            assert layer.experts_B[1].grad is not None and layer.experts_B[1].grad.abs().sum() > 0
        assert all(row.grad is not None for layer in layers for row in method.routers[layer.key])
    # task 1, step 1: the router basis was refreshed (spectral_start=1) and task 0's spectra precondition A
    assert set(method._router_basis) == set(method._curv) == set(method.layers)
    method.end_phase(Phase("train", 2))
    assert not method._hooks and method.context.capture is None
