"""Adaptive-rank consolidation and orthogonality penalty (CRAM.md parts 5-6)."""
import pytest
import torch

from cramcl.methods.cram.consolidation import (
    buffer_update_svd, consolidate_buffer, history_basis, novelty, select_expert_directions,
)
from cramcl.methods.cram.penalty import (
    column_history_basis, gated_orthogonality_penalty, orth_history_basis, orthogonality_energy,
)


def _buffer(d_out, d_in, R, spectrum, seed=0, dtype=torch.float64):
    """B_buf (d_out, R), A_buf (R, d_in) whose product has the given singular values (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, R, generator=g, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(d_in, R, generator=g, dtype=dtype))
    S = torch.as_tensor(spectrum, dtype=dtype)
    return U * S, V.T.contiguous()


def _orthonormal(d, m, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, m, generator=g, dtype=dtype))[0]


# ----------------------------------------------------------------------------------------- SVD
@pytest.mark.parametrize("shape", [(40, 8, 30), (20, 12, 50), (6, 10, 7)])
def test_svd_via_qr_equals_full_svd(shape):
    d_out, R, d_in = shape
    g = torch.Generator().manual_seed(3)
    B = torch.randn(d_out, R, generator=g, dtype=torch.float64)
    A = torch.randn(R, d_in, generator=g, dtype=torch.float64)
    U, S, Vh = buffer_update_svd(B, A, 2.0)
    full = 2.0 * B @ A
    S_ref = torch.linalg.svdvals(full)[: S.numel()]
    assert S.numel() == min(d_out, R, d_in)
    assert torch.allclose(S, S_ref, atol=1e-10)
    assert torch.all(S[:-1] >= S[1:])
    assert torch.allclose(U @ torch.diag(S) @ Vh, full, atol=1e-10)
    assert torch.allclose(U.T @ U, torch.eye(S.numel(), dtype=U.dtype), atol=1e-10)
    assert torch.allclose(Vh @ Vh.T, torch.eye(S.numel(), dtype=U.dtype), atol=1e-10)


def test_svd_float32_input_and_zero_buffer():
    B = torch.zeros(16, 4)
    A = torch.randn(4, 12)
    U, S, Vh = buffer_update_svd(B, A, 2.0)
    assert S.dtype == torch.float32 and torch.all(S == 0)


# ----------------------------------------------------------------------------------------- history
def test_history_basis_union_and_empty():
    A1 = torch.randn(3, 20, dtype=torch.float64)
    A2 = torch.cat([A1[:2] * 2.0, torch.randn(2, 20, dtype=torch.float64)])  # 2 duplicated dirs
    Q = history_basis([A1, A2])
    assert Q.shape == (20, 5)
    assert torch.allclose(Q.T @ Q, torch.eye(5, dtype=Q.dtype), atol=1e-10)
    for a in (A1, A2):  # every history row lies in span(Q)
        assert torch.allclose(a @ Q @ Q.T, a, atol=1e-10)
    assert history_basis([], dim=7).shape == (7, 0)
    with pytest.raises(ValueError):
        history_basis([])
    assert column_history_basis([A1.T], dim=20).shape == (20, 3)


def test_orth_history_basis_picks_row_or_column_space():
    A, Bm = torch.randn(2, 8), torch.randn(12, 2)
    assert orth_history_basis([A], [Bm], 8, 12).shape == (12, 2)  # columns of B in d_out
    Q = orth_history_basis([A], [torch.randn(8, 2)], 8, 8)
    assert torch.allclose(A @ Q @ Q.T, A, atol=1e-5)  # rows of A in d_in == d_out


def test_novelty_values():
    Q = torch.eye(4, dtype=torch.float64)[:, :2]  # span(e0, e1)
    V = torch.tensor([[1.0, 0, 0, 0], [0, 0, 3.0, 0], [1.0, 0, 1.0, 0]], dtype=torch.float64)
    nov = novelty(V, Q)
    assert torch.allclose(nov, torch.tensor([0.0, 1.0, 2 ** -0.5], dtype=torch.float64))
    assert torch.allclose(novelty(V, Q[:, :0]), torch.ones(3, dtype=torch.float64))


# ----------------------------------------------------------------------------------------- selection
def test_select_candidates_threshold_and_caps():
    S = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.09, 0.05, 0.01, 0.0, 0.0, 0.0])
    # 7 candidates (> 0.08), no history, r_max 9 -> all 7
    assert select_expert_directions(S, None, 0.08, 0.99, 4, 9).tolist() == list(range(7))
    # r_max caps candidates
    assert select_expert_directions(S, None, 0.08, 0.99, 4, 5).tolist() == list(range(5))
    # none passes tau_alloc -> strongest, then padded to r_min
    assert select_expert_directions(S, None, 100.0, 0.99, 4, 9).tolist() == [0, 1, 2, 3]
    # r_min larger than R' -> R'
    assert select_expert_directions(S[:3], None, 100.0, 0.99, 4, 9).tolist() == [0, 1, 2]
    # r_min above r_max -> r_max
    assert select_expert_directions(S, None, 100.0, 0.99, 6, 3).tolist() == [0, 1, 2]


def test_select_novelty_filter_and_padding_order():
    S = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.01, 0.001])
    nov = torch.tensor([0.2, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    # candidates 0..4; novel: 1, 3, 4; pad with 0 (next strongest) to 4, returned in S order
    assert select_expert_directions(S, nov, 0.08, 0.99, 4, 9).tolist() == [0, 1, 3, 4]
    # none novel -> strongest candidate, padded in S order
    none = torch.zeros(7)
    assert select_expert_directions(S, none, 0.08, 0.99, 4, 9).tolist() == [0, 1, 2, 3]
    assert select_expert_directions(S, none, 0.08, 0.99, 1, 9).tolist() == [0]
    # tau_novel = 0 keeps every candidate with any novelty at all
    assert select_expert_directions(S, nov, 0.08, 0.0, 1, 9).tolist() == [0, 1, 2, 3, 4]
    # padding may use non-candidates (below tau_alloc)
    assert select_expert_directions(S, nov, 2.5, 0.99, 4, 9).tolist() == [0, 1, 2, 3]
    assert select_expert_directions(S, torch.tensor([1.0] * 7), 4.5, 0.99, 1, 9).tolist() == [0]


def test_select_fixed_rank():
    S = torch.linspace(3, 0.01, 12)
    nov = torch.zeros(12)
    for k in (1, 4, 10):
        idx = select_expert_directions(S, nov, 0.08, 0.99, 4, 9, fixed_rank=k)
        assert idx.tolist() == list(range(k))
    assert select_expert_directions(S, None, 0.08, 0.99, 4, 9, fixed_rank=50).numel() == 12


# ----------------------------------------------------------------------------------------- consolidation
@pytest.mark.parametrize("seed", range(6))
def test_rank_within_bounds_random_buffers(seed):
    g = torch.Generator().manual_seed(100 + seed)
    R = 16
    for kind in ("many", "few", "none"):
        if kind == "many":
            spec = torch.rand(R, generator=g) * 2 + 0.5  # all above tau_alloc
        elif kind == "few":
            spec = torch.cat([torch.tensor([1.0]), torch.rand(R - 1, generator=g) * 0.05])
        else:
            spec = torch.rand(R, generator=g) * 0.05
        spec = spec.sort(descending=True).values
        B, A = _buffer(24, 20, R, spec, seed=seed)
        hist = [] if seed % 2 == 0 else [torch.randn(5, 20, generator=g, dtype=torch.float64)]
        res = consolidate_buffer(B, A, 1.0, hist, r_min=4, r_max=9)
        assert 4 <= res.rank <= 9, (kind, res.rank)
        assert res.B.shape == (24, res.rank) and res.A.shape == (res.rank, 20)
        if kind == "many" and not hist:
            assert res.rank == 9
        if kind == "few":
            assert res.n_candidates == 1


def test_no_history_reproduces_truncation():
    spec = [3.0, 2.0, 1.5, 1.0, 0.5, 0.2, 0.1, 0.07, 0.03, 0.01]
    B, A = _buffer(32, 28, 10, spec, seed=4, dtype=torch.float32)
    scale = 2.0
    res = consolidate_buffer(B, A, scale, [], r_min=4, r_max=9)
    assert res.rank == 8 and res.novelty is None  # 2*0.03 = 0.06 < 0.08 < 2*0.07 = 0.14
    U, S, Vh = torch.linalg.svd(scale * B @ A)
    trunc = U[:, :8] @ torch.diag(S[:8]) @ Vh[:8]
    assert torch.allclose(res.B @ res.A, trunc, atol=1e-5)
    assert not torch.allclose(res.B @ res.A, scale * B @ A, atol=1e-3)  # tail really dropped


def test_with_history_rows_orthogonal_to_history():
    g = torch.Generator().manual_seed(7)
    d = 30
    hist = [torch.randn(4, d, generator=g), torch.randn(3, d, generator=g)]
    Q = history_basis(hist)
    # buffer with strong directions partly inside the history span
    A = torch.randn(12, d, generator=g) + 3 * torch.randn(12, 7, generator=g) @ Q.T
    B = torch.randn(d, 12, generator=g)
    res = consolidate_buffer(B, A, 2.0, hist, tau_novel=0.5, r_min=4, r_max=9)
    assert res.novelty is not None and 4 <= res.rank <= 9
    assert (res.A @ Q).abs().max() < 1e-5
    rows = res.A / res.A.norm(dim=1, keepdim=True)
    assert torch.allclose(res.A.norm(dim=1), res.singular_values.sqrt(), atol=1e-5)
    assert rows.shape[0] == res.rank


def test_direction_inside_history_is_replaced_but_stays_orthogonal():
    d = 10
    spec = [2.0, 1.0, 0.5, 0.3]
    B, A = _buffer(12, d, 4, spec, seed=2)
    hist = [A[:1].clone()]  # the strongest direction is exactly the history
    res = consolidate_buffer(B, A, 1.0, hist, r_min=4, r_max=9)
    Q = history_basis(hist)
    assert res.kept.tolist() == [0, 1, 2, 3] and res.n_replaced == 1
    assert (res.A @ Q).abs().max() < 1e-10
    assert torch.all(res.A.norm(dim=1) > 0)
    assert res.novelty[0] < 1e-8 and torch.all(res.novelty[1:] > 0.99)


def test_tau_novel_zero_keeps_all_candidates():
    g = torch.Generator().manual_seed(11)
    spec = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.8, 0.01, 0.001])
    B, A = _buffer(20, 20, 8, spec, seed=5)
    hist = [A[:3] + 0.3 * torch.randn(3, 20, generator=g, dtype=torch.float64)]  # overlaps 0..2
    strict = consolidate_buffer(B, A, 1.0, hist, tau_novel=0.99, r_min=1, r_max=9)
    loose = consolidate_buffer(B, A, 1.0, hist, tau_novel=0.0, r_min=1, r_max=9)
    assert loose.kept.tolist() == list(range(6)) and loose.n_candidates == 6
    assert strict.rank < loose.rank
    # no capability gap at all: no projection off the history either (the authors' tau_novel = 0),
    # so the expert is exactly the buffer's truncation, as if the group had no earlier experts
    plain = consolidate_buffer(B, A, 1.0, [], tau_novel=0.0, r_min=1, r_max=9)
    assert loose.novelty is None
    assert torch.allclose(loose.B @ loose.A, plain.B @ plain.A, atol=1e-10)
    assert (loose.A @ history_basis(hist)).abs().max() > 1e-3  # it still overlaps the history


def test_fixed_rank_gives_exactly_that_rank():
    g = torch.Generator().manual_seed(12)
    B, A = torch.randn(24, 16, generator=g), torch.randn(16, 20, generator=g)
    hist = [torch.randn(3, 20, generator=g)]
    for k in (2, 5, 12):
        assert consolidate_buffer(B, A, 2.0, hist, fixed_rank=k).rank == k
        assert consolidate_buffer(B, A, 2.0, [], fixed_rank=k).A.shape == (k, 20)


# ----------------------------------------------------------------------------------------- penalty
def test_energy_and_penalty():
    d = 16
    Q = _orthonormal(d, 3, dtype=torch.float32)
    z_in = torch.randn(5, 3) @ Q.T  # inside span(Q)
    z_out = torch.randn(5, d)
    z_out = z_out - z_out @ Q @ Q.T  # orthogonal to span(Q)
    gate = torch.rand(5) + 0.1
    empty = torch.zeros(d, 0)
    assert torch.all(orthogonality_energy(z_in, empty) == 0)
    assert gated_orthogonality_penalty(z_in, empty, gate) == 0
    assert torch.allclose(orthogonality_energy(z_in, Q), z_in.pow(2).sum(1), atol=1e-5)
    assert gated_orthogonality_penalty(z_in, Q, gate) > 0.1
    assert gated_orthogonality_penalty(z_out, Q, gate) < 1e-8
    assert gated_orthogonality_penalty(z_in, Q, torch.zeros(5)) == 0
    expected = (gate * z_in.pow(2).sum(1)).mean()
    assert torch.allclose(gated_orthogonality_penalty(z_in, Q, gate), expected, atol=1e-5)


def test_penalty_gradient_flows_to_expert_output():
    Q = _orthonormal(8, 2, dtype=torch.float32)
    z = torch.randn(4, 8, requires_grad=True)
    gated_orthogonality_penalty(z, Q, torch.ones(4)).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    z2 = torch.randn(4, 8, requires_grad=True)
    gated_orthogonality_penalty(z2, torch.zeros(8, 0), torch.ones(4)).backward()
    assert torch.all(z2.grad == 0)


def test_stacked_penalties_equal_the_per_module_penalty():
    """The batched penalty (one bmm per op over M same-shaped modules, CRAM's path on a GPU) gives each module
    the per-module function's value, scale and gate included (to float rounding: bmm may sum in another order)."""
    from cramcl.methods.cram.penalty import gated_orthogonality_penalty, stacked_gated_penalties

    g = torch.Generator().manual_seed(3)
    M, B, d_in, d_out, r, m = 5, 6, 24, 16, 3, 4
    h, A = torch.randn(M, B, d_in, generator=g), torch.randn(M, r, d_in, generator=g)
    Bm, scale = torch.randn(M, d_out, r, generator=g), torch.rand(M, generator=g) + 0.5
    Q = torch.linalg.qr(torch.randn(M, d_out, m, generator=g)).Q
    gate = torch.rand(M, B, generator=g)
    got = stacked_gated_penalties(h, A, Bm, scale, Q, gate)
    want = torch.stack([gated_orthogonality_penalty(float(scale[i]) * (h[i] @ A[i].t()) @ Bm[i].t(), Q[i], gate[i])
                        for i in range(M)])
    assert got.shape == (M,) and torch.allclose(got, want, rtol=1e-5, atol=0), (got - want).abs().max()
    assert (got > 0).all()
