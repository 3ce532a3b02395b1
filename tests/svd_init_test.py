import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax import factors, svd_init

init = jax.jit(svd_init.init_group, static_argnames=("rank", "n_blocks", "n_fcs", "tau"))


def _w(d=16, n=2, f=3, p=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((d, n * f * p)), jnp.float32)


@pytest.mark.parametrize("rank", [1, 5, 11])
def test_eckart_young_optimum(rank):
    w = _w()
    fac = init(w, rank=rank, n_blocks=2, n_fcs=3)
    assert fac.u.shape == (16, rank) and fac.v.shape == (2, 3, rank, 24)
    err = float(jnp.sum((factors.materialize(fac.u, fac.v) - w) ** 2))
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    optimum = float(np.sum(s[rank:] ** 2))
    assert err == pytest.approx(optimum, rel=1e-4)
    np.testing.assert_allclose(np.asarray(fac.u.T @ fac.u), np.eye(rank), atol=1e-5)


@pytest.mark.parametrize("rank", [16, 20, 40])
def test_rank_at_least_d_reconstructs_exactly(rank):
    w = _w()
    fac = init(w, rank=rank, n_blocks=2, n_fcs=3)
    np.testing.assert_allclose(np.asarray(factors.materialize(fac.u, fac.v)), np.asarray(w), atol=1e-4)


def test_hybrid_growth():
    w = _w()
    d, rank, tau = 16, 40, 32.0  # 24 extra rows: the 16 top rows, then cyclically the top 8 again
    fac = init(w, rank=rank, n_blocks=2, n_fcs=3, tau=tau)
    assert np.all(np.asarray(fac.u[:, d:]) == 0)
    v = np.asarray(fac.v).transpose(2, 0, 1, 3).reshape(rank, -1)
    np.testing.assert_allclose(v[d:2 * d], v[:d] / tau, rtol=1e-6)
    np.testing.assert_allclose(v[2 * d:], v[:rank - 2 * d] / tau, rtol=1e-6)
    # The zero columns of U get nonzero gradients from a loss on U V.
    target = w + 0.1
    g = jax.grad(lambda u: jnp.sum((factors.materialize(u, fac.v) - target) ** 2))(fac.u)
    assert np.all(np.linalg.norm(np.asarray(g[:, d:]), axis=0) > 0)


def test_block_major_slicing():
    # V slices line up with the FCs: u @ v[b, f] is the (b*F + f)-th d x p column block of W.
    w = _w()
    fac = init(w, rank=16, n_blocks=2, n_fcs=3)
    p = 24
    for b in range(2):
        for f in range(3):
            j = b * 3 + f
            np.testing.assert_allclose(np.asarray(fac.u @ fac.v[b, f]), np.asarray(w[:, j * p:(j + 1) * p]), atol=1e-4)


def test_float32_for_bf16_input():
    w = _w().astype(jnp.bfloat16)
    fac = init(w, rank=4, n_blocks=2, n_fcs=3)
    assert fac.u.dtype == jnp.float32 and fac.v.dtype == jnp.float32


def test_per_layer_svd_is_optimal():
    w = _w()[:, :24]
    approx = svd_init.per_layer_svd(w, 3)
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    assert float(jnp.sum((approx - w) ** 2)) == pytest.approx(float(np.sum(s[3:] ** 2)), rel=1e-4)
