"""Whitening, SVD-LLM, Basis Sharing and the whitened FiPS init against independent optima."""

import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax import calib_stats, factors, svd_init, whitening
from fips_jax.models import base

GATED = base.MlpSpec(("gate", "up", "down"), (False, False, True), "silu", gated=True, has_bias=False)


def _aniso_x(tokens, d, rng, spread=3.0):
    """Inputs whose second moment spans exp(2*spread) in scale, in a random rotation."""
    scale = np.exp(np.linspace(-spread / 2, spread / 2, d))[rng.permutation(d)]
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (rng.standard_normal((tokens, d)) * scale) @ rot


def _err(x, w, approx):
    return float(np.sum((x @ (w - approx)) ** 2))


# ----------------------------------------------------------------------------- whitener
def test_whitener_factorises_damped_gram():
    rng = np.random.default_rng(0)
    x = _aniso_x(200, 10, rng)
    g = x.T @ x
    wh = whitening.whitener(g, damp=0.01)
    np.testing.assert_allclose(wh.s.T @ wh.s, g + 0.01 * np.mean(np.diag(g)) * np.eye(10), rtol=1e-12, atol=1e-10)
    assert np.allclose(wh.s, np.triu(wh.s)) and np.allclose(wh.s_inv, np.triu(wh.s_inv))
    np.testing.assert_allclose(wh.s @ wh.s_inv, np.eye(10), atol=1e-12)
    assert wh.shift == pytest.approx(0.01 * np.mean(np.diag(g)))


def test_whitener_fallback_on_singular_gram():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 10))  # rank 4 < 10: Cholesky fails without the shift
    g = x.T @ x
    wh = whitening.whitener(g)
    assert wh.shift > 0
    np.testing.assert_allclose(wh.s.T @ wh.s, g + wh.shift * np.eye(10), atol=1e-9)
    assert wh.shift < 1e-6 * np.mean(np.diag(g))  # (-lambda_min + eps), lambda_min ~ -rounding


# ----------------------------------------------------------------------------- SVD-LLM
@pytest.mark.parametrize("k", [1, 3, 6])
def test_svd_llm_is_the_weighted_optimum(k):
    """With X of full column rank, {X M : rank M <= k} is every rank-<=k matrix in col(X), and
    the best rank-k approximation of X W lies in col(X): the optimum is the tail of X W's
    singular values, computed here without any factorisation of X."""
    rng = np.random.default_rng(k)
    x, w = _aniso_x(60, 8, rng), rng.standard_normal((8, 7))
    a, b = whitening.svd_llm(w, x.T @ x, k)
    assert a.shape == (8, k) and b.shape == (k, 7)
    uu, s, vh = np.linalg.svd(x @ w, full_matrices=False)
    assert _err(x, w, a @ b) == pytest.approx(float(np.sum(s[k:] ** 2)), rel=1e-9)
    np.testing.assert_allclose(x @ a @ b, (uu[:, :k] * s[:k]) @ vh[:k], atol=1e-9 * np.abs(x @ w).max())


def test_svd_llm_beats_plain_truncation_on_anisotropic_inputs():
    rng = np.random.default_rng(3)
    x, w = _aniso_x(400, 16, rng, spread=4.0), rng.standard_normal((16, 12))
    a, b = whitening.svd_llm(w, x.T @ x, 5)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    plain = (u[:, :5] * s[:5]) @ vh[:5]
    assert _err(x, w, a @ b) < 0.7 * _err(x, w, plain)


def test_svd_llm_bad_arguments():
    g = np.eye(4)
    with pytest.raises(ValueError, match="rank k=5"):
        whitening.svd_llm(np.ones((4, 5)), g, 5)
    with pytest.raises(ValueError, match="rank k=0"):
        whitening.svd_llm(np.ones((4, 5)), g, 0)
    with pytest.raises(ValueError, match="gram: shape"):
        whitening.svd_llm(np.ones((3, 5)), g, 2)
    with pytest.raises(ValueError, match="damp"):
        whitening.svd_llm(np.ones((4, 5)), g, 2, damp=-1.0)


# ----------------------------------------------------------------------------- Basis Sharing
def test_basis_sharing_single_layer_is_svd_llm():
    rng = np.random.default_rng(4)
    x, w = _aniso_x(80, 9, rng), rng.standard_normal((9, 6))
    a, b = whitening.svd_llm(w, x.T @ x, 4)
    basis, (c,) = whitening.basis_sharing([w], [x.T @ x], 4)
    np.testing.assert_allclose(basis @ c, a @ b, atol=1e-10)


def test_basis_sharing_hand_case():
    """Pooled gram diag(4, 1): whitened [W1 W2] = diag(2, 1.5), so the shared rank-1 basis is
    e1 (plain SVD of [W1 W2] = diag(1, 1.5) would pick e2): W1 is kept exactly, W2 is lost."""
    w1, w2 = np.array([[1.0], [0.0]]), np.array([[0.0], [1.5]])
    g1, g2 = np.diag([3.0, 0.5]), np.diag([1.0, 0.5])
    basis, (c1, c2) = whitening.basis_sharing([w1, w2], [g1, g2], 1)
    np.testing.assert_allclose(np.abs(basis[:, 0]), [1.0, 0.0], atol=1e-12)  # S^{-1} u sigma = e1
    np.testing.assert_allclose(basis @ c1, w1, atol=1e-12)
    np.testing.assert_allclose(basis @ c2, np.zeros((2, 1)), atol=1e-12)
    # Correlated inputs with the same pooled gram diag(4, 1): same basis e1, and the refit
    # recovers the part of W2 visible through e1 in layer 2's own inputs:
    # c2 = (e1^T G2 e1)^{-1} e1^T G2 W2 = 0.5 * 1.5 / 1.
    g1c, g2c = np.array([[3.0, -0.5], [-0.5, 0.5]]), np.array([[1.0, 0.5], [0.5, 0.5]])
    basis, (c1, c2) = whitening.basis_sharing([w1, w2], [g1c, g2c], 1, refit=True)
    np.testing.assert_allclose(np.abs(basis[:, 0]), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(basis @ c1, w1, atol=1e-12)
    np.testing.assert_allclose(basis @ c2, [[0.75], [0.0]], atol=1e-12)


def test_basis_sharing_refit_never_increases_the_error():
    rng = np.random.default_rng(5)
    d, k = 10, 4
    ws = [rng.standard_normal((d, 7)) for _ in range(3)]
    xs = [_aniso_x(100, d, rng, spread=s) for s in (1.0, 3.0, 5.0)]  # different inputs per layer
    grams = [x.T @ x for x in xs]
    basis, cs = whitening.basis_sharing(ws, grams, k)
    basis_r, cs_r = whitening.basis_sharing(ws, grams, k, refit=True)
    np.testing.assert_allclose(basis_r, basis)
    per = [_err(x, w, basis @ c) for x, w, c in zip(xs, ws, cs)]
    per_r = [_err(x, w, basis @ c) for x, w, c in zip(xs, ws, cs_r)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(per, per_r))
    assert sum(per_r) < 0.99 * sum(per)  # the layers' inputs differ: the refit must help


def test_rank_for_ratio_formulas():
    # SVD-LLM per layer, LLaMA-7B up_proj at 20%: floor(4096*11008*0.8 / 15104)
    assert whitening.rank_for_ratio(4096, 11008, 0.2) == (4096 * 11008 * 4 // 5) // 15104 == 2388
    assert whitening.rank_for_ratio(64, 64, 0.5) == 16
    # Basis Sharing, g = 2: floor(d_in*d_out*g*(1-ratio) / (d_in + d_out*g))
    assert whitening.rank_for_ratio(4096, 4096, 0.2, n_layers=2) == (4096 * 4096 * 2 * 4 // 5) // (3 * 4096)
    assert whitening.rank_for_ratio(10, 10, 0.3) == 3  # 70/20 = 3.5: exact rational, floored
    k = whitening.rank_for_kept(100, 300, 40_000, n_layers=2)
    assert k * (100 + 600) <= 40_000 < (k + 1) * (100 + 600)
    with pytest.raises(ValueError, match="ratio 1.0"):
        whitening.rank_for_ratio(4, 4, 1.0)


# ----------------------------------------------------------------------------- FiPS groups
def _gated_group(n=3, d=24, p=36, tokens=1500, seed=0, spread=3.0):
    """A random gated group, its anisotropic MLP inputs and the grams calib_stats streams."""
    rng = np.random.default_rng(seed)
    mlps, xs = [], []
    for _ in range(n):
        mlps.append({name: {"kernel": jnp.asarray(rng.standard_normal((p, d) if tr else (d, p)) / np.sqrt(d), jnp.float32)}
                     for name, tr in zip(GATED.fc_names, GATED.transposed)})
        xs.append(_aniso_x(tokens, d, rng, spread).astype(np.float32))
    st = calib_stats.group_input_grams(GATED, base.stack_trees(mlps), np.stack(xs))
    ws = np.stack([[np.asarray(m[nm]["kernel"], np.float64).T if tr else np.asarray(m[nm]["kernel"], np.float64)
                    for nm, tr in zip(GATED.fc_names, GATED.transposed)] for m in mlps])
    return ws, st["in"], st["hidden"]


def _svd_factors(ws, rank):
    n, f, d, p = ws.shape
    w_s = np.transpose(ws, (2, 0, 1, 3)).reshape(d, n * f * p)
    return svd_init.init_group(jnp.asarray(w_s, jnp.float32), rank, n, f)


def _f64(fac):
    return np.asarray(fac.u, np.float64), np.asarray(fac.v, np.float64)


def test_whitened_init_single_input_fc_is_svd_llm():
    rng = np.random.default_rng(6)
    x, w = _aniso_x(300, 12, rng), rng.standard_normal((12, 9))
    g = x.T @ x
    a, b = whitening.svd_llm(w, g, 5)
    fac = whitening.whitened_group_init(w[None, None], g[None], None, (False,), 5)
    u, v = _f64(fac)
    assert u.shape == (12, 5) and v.shape == (1, 1, 5, 9)
    np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-6)
    assert _err(x, w, u @ v[0, 0]) == pytest.approx(_err(x, w, a @ b), rel=1e-5)  # float32 factors


def test_whitened_init_single_output_fc_is_the_hidden_weighted_optimum():
    """down/fc2 alone: ||H (W - U V)^T||^2 over rank r is Eckart-Young on W T^T (T^T T = H^T H):
    the tail of the eigenvalues of W G_hid W^T, whatever the (anisotropic) input gram."""
    rng = np.random.default_rng(8)
    d, p, r = 10, 14, 4
    w, h = rng.standard_normal((d, p)), _aniso_x(200, p, rng)
    g_hid, g_in = h.T @ h, (lambda x: x.T @ x)(_aniso_x(200, d, rng, spread=4.0))
    fac = whitening.whitened_group_init(w[None, None], g_in[None], g_hid[None], (True,), r)
    u, v = _f64(fac)
    optimum = float(np.sum(np.linalg.eigvalsh(w @ g_hid @ w.T)[:d - r]))
    assert float(np.sum((h @ (w - u @ v[0, 0]).T) ** 2)) == pytest.approx(optimum, rel=1e-5)
    only_whitened = whitening.whitened_group_init(w[None, None], g_in[None], g_hid[None], (True,), r, alphas=(1.0,))
    assert whitening.weighted_error(*_f64(only_whitened), w[None, None], g_in[None], g_hid[None], (True,)) > 1.05 * optimum


def test_whitened_init_beats_svd_init_on_a_gated_group():
    ws, gi, gh = _gated_group()
    tr = GATED.transposed
    for rank in (6, 12, 18):
        e_svd = whitening.weighted_error(*_f64(_svd_factors(ws, rank)), ws, gi, gh, tr, relative=True)
        e_wh = whitening.weighted_error(*_f64(whitening.whitened_group_init(ws, gi, gh, tr, rank)), ws, gi, gh, tr,
                                        relative=True)
        assert e_wh < 0.85 * e_svd, (rank, e_wh, e_svd)


def test_alternating_steps_never_increase_the_error():
    ws, gi, gh = _gated_group(seed=1)
    tr = GATED.transposed
    errs = [whitening.weighted_error(*_f64(whitening.whitened_group_init(ws, gi, gh, tr, 10, steps=s)), ws, gi, gh, tr)
            for s in (0, 1, 3)]
    assert errs[1] <= errs[0] * (1 + 1e-5) and errs[2] <= errs[1] * (1 + 1e-5)
    assert errs[2] < 0.95 * errs[0]  # measured ~0.8x on this case: the steps do real work


@pytest.mark.parametrize("rank", [24, 40])
def test_rank_at_least_d_is_svd_init(rank):
    ws, gi, gh = _gated_group(d=24, p=12, tokens=200)
    fac = whitening.whitened_group_init(ws, gi, gh, GATED.transposed, rank, tau=8.0)
    ref = _svd_factors(ws, rank)
    np.testing.assert_allclose(np.asarray(factors.materialize(fac.u, fac.v)),
                               np.asarray(factors.materialize(ref.u, ref.v)), atol=1e-4)
    # the same factors up to the sign of each (U column, V row) pair
    signs = np.sign(np.sum(np.asarray(fac.u[:, :24]) * np.asarray(ref.u[:, :24]), axis=0))
    np.testing.assert_allclose(np.asarray(fac.u[:, :24]) * signs, np.asarray(ref.u[:, :24]), atol=1e-4)
    if rank > 24:
        assert np.all(np.asarray(fac.u[:, 24:]) == 0)
        v = np.asarray(fac.v).transpose(2, 0, 1, 3).reshape(rank, -1)
        np.testing.assert_allclose(v[24:rank], v[:rank - 24] / 8.0, rtol=1e-6)


def _grad_v(u, v, ws, gi, gh, tr):
    g = np.empty_like(v)
    for b in range(ws.shape[0]):
        for i, t in enumerate(tr):
            e = ws[b, i] - u @ v[b, i]
            g[b, i] = -2 * (u.T @ e @ gh[b] if t else u.T @ gi[b] @ e)
    return g


@pytest.mark.parametrize("case", ["random", "rank_deficient"])
def test_refit_v_is_optimal_given_u(case):
    ws, gi, gh = _gated_group(n=2, d=16, p=20, tokens=400, seed=2)
    tr = GATED.transposed
    rng = np.random.default_rng(7)
    u = rng.standard_normal((16, 7))  # not orthonormal
    if case == "rank_deficient":  # duplicate and zero columns: U^T G U singular
        u = np.concatenate([u, u[:, :2], np.zeros((16, 2))], axis=1)
    v = whitening.refit_v(u, ws, gi, gh, tr)
    grad = _grad_v(u, v, ws, gi, gh, tr)
    scale = np.abs(_grad_v(u, np.zeros_like(v), ws, gi, gh, tr)).max()
    assert np.abs(grad).max() < 1e-9 * scale
    loss = whitening.weighted_error(u, v, ws, gi, gh, tr)
    for seed in range(5):
        dv = np.random.default_rng(seed).standard_normal(v.shape) * 1e-3
        assert whitening.weighted_error(u, v + dv, ws, gi, gh, tr) > loss


def test_group_bad_arguments():
    ws, gi, gh = _gated_group(n=2, d=8, p=10, tokens=50)
    with pytest.raises(ValueError, match="grams_in"):
        whitening.whitened_group_init(ws, gi[:1], gh, GATED.transposed, 4)
    with pytest.raises(ValueError, match="transposed"):
        whitening.whitened_group_init(ws, gi, gh, (False, True), 4)
    with pytest.raises(ValueError, match="grams_hidden: required"):
        whitening.refit_v(np.eye(8), ws, gi, None, GATED.transposed)


def test_weighted_error_is_the_output_error_of_each_fc():
    """gate/up: ||X (W - U V)||^2; down (kernel W^T, y = h W^T): ||H (W - U V)^T||^2."""
    rng = np.random.default_rng(9)
    n, d, p, r = 2, 6, 9, 3
    ws = rng.standard_normal((n, 3, d, p))
    xs, hs = rng.standard_normal((n, 40, d)), rng.standard_normal((n, 40, p))
    u, v = rng.standard_normal((d, r)), rng.standard_normal((n, 3, r, p))
    direct = sum(float(np.sum((xs[b] @ (ws[b, i] - u @ v[b, i])) ** 2)) for b in range(n) for i in (0, 1))
    direct += sum(float(np.sum((hs[b] @ (ws[b, 2] - u @ v[b, 2]).T) ** 2)) for b in range(n))
    gi, gh = np.einsum("btd,bte->bde", xs, xs), np.einsum("btp,btq->bpq", hs, hs)
    assert whitening.weighted_error(u, v, ws, gi, gh, GATED.transposed) == pytest.approx(direct, rel=1e-12)
