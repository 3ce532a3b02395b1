"""The Gram route of the shared init agrees with the SVD route, on one device and sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fips_jax import factors, sharding, svd_init

D, N, F, PW = 48, 2, 3, 40  # W_s: [48, 240]
STATIC = ("rank", "n_blocks", "n_fcs", "tau")


def _matrix(seed=0):
    # Gaussian [48, 240]: singular values within ~[8.6, 22.4], well conditioned.
    return jax.random.normal(jax.random.PRNGKey(seed), (D, N * F * PW), jnp.float32)


def _rel_err(w, f):
    return float(jnp.linalg.norm(w - factors.materialize(f.u, f.v)) / jnp.linalg.norm(w))


@pytest.mark.parametrize("rank", [8, 47])
def test_gram_matches_svd_reconstruction_and_projection(rank):
    w = _matrix()
    gram = svd_init.init_group_gram(w, rank, N, F)
    svd = svd_init.init_group(w, rank, N, F)
    assert gram.u.shape == (D, rank) and gram.v.shape == (N, F, rank, PW)
    # Eckart-Young optimum, from the singular values directly.
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    optimum = np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s ** 2))
    assert _rel_err(w, gram) == pytest.approx(optimum, rel=1e-4)
    assert _rel_err(w, gram) == pytest.approx(_rel_err(w, svd), rel=1e-4)
    # Same subspace (eigenvector signs are arbitrary; the projection U U^T is not) and same U V.
    np.testing.assert_allclose(gram.u @ gram.u.T, svd.u @ svd.u.T, atol=2e-5)
    np.testing.assert_allclose(factors.materialize(gram.u, gram.v), factors.materialize(svd.u, svd.v),
                               atol=1e-4 * float(jnp.max(jnp.abs(w))))
    np.testing.assert_allclose(gram.u.T @ gram.u, np.eye(rank), atol=1e-5)


def test_gram_hybrid_growth_like_init_group():
    w = _matrix(1)
    rank, tau = D + 60, 32.0  # 60 extra rows: cyclic reuse past d
    gram = svd_init.init_group_gram(w, rank, N, F, tau=tau)
    svd = svd_init.init_group(w, rank, N, F, tau=tau)
    np.testing.assert_array_equal(gram.u[:, D:], 0.0)
    np.testing.assert_allclose(factors.materialize(gram.u, gram.v), w, atol=1e-4)
    # Extra rows are the top rows / tau; only the sign of each row may differ from the SVD's
    # (and close singular pairs rotate slightly: float32 eigenvectors, not the SVD's).
    rows = lambda f: jnp.transpose(f.v, (2, 0, 1, 3)).reshape(rank, -1)
    scale = float(jnp.max(jnp.abs(rows(svd))))
    np.testing.assert_allclose(jnp.abs(rows(gram)), jnp.abs(rows(svd)), atol=1e-4 * scale)
    np.testing.assert_allclose(rows(gram)[D:D + 12], rows(gram)[:12] / tau, rtol=1e-6)


def test_gram_sharded_equals_single_device():
    """Sharding changes only the summation order of W W^T and U^T W. In float32 that moves each
    eigenvector by ~eps * ||W||^2 / (its eigenvalue gap), which for close singular pairs of a
    random matrix (gaps ~3.6 here) is ~1e-5 of V's scale and depends on the CPU's kernels; so the
    routes are compared in float64, where the same reasoning gives ~1e-13 and any real
    disagreement (wrong shard sums, a lost sign fix, misplaced columns) is O(1)."""
    with jax.enable_x64(True):
        w = _matrix(2).astype(jnp.float64)
        rank = 24
        single = jax.jit(svd_init.init_group_gram, static_argnames=STATIC)(w, rank=rank, n_blocks=N, n_fcs=F)
        mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
        w_sh = sharding.logical_to_sharding(sharding.GROUP_MATRIX_AXES, mesh, sharding.DEFAULT_RULES, w)
        assert w_sh.spec == P(None, ("data", "fsdp", "tensor"))
        out_sh = factors.FipsFactors(
            u=NamedSharding(mesh, P()),
            v=NamedSharding(mesh, sharding.logical_to_spec(sharding.V_AXES, mesh, sharding.DEFAULT_RULES,
                                                           (N, F, rank, PW))))
        w_dist = sharding.put(np.asarray(w), w_sh)
        assert {s.data.shape for s in w_dist.addressable_shards} == {(D, N * F * PW // 8)}
        init = jax.jit(svd_init.init_group_gram, static_argnames=STATIC, out_shardings=out_sh)
        dist = init(w_dist, rank=rank, n_blocks=N, n_fcs=F)
        assert dist.v.sharding.spec == P(None, None, None, ("fsdp", "tensor"))
        assert dist.v.dtype == single.v.dtype == jnp.float64
        np.testing.assert_allclose(dist.u, single.u, atol=1e-9)
        np.testing.assert_allclose(dist.v, single.v, atol=1e-9 * float(jnp.max(jnp.abs(single.v))))


def test_gram_rejects_bad_width():
    with pytest.raises(ValueError, match="not divisible by n_blocks"):
        svd_init.init_group_gram(jnp.ones((4, 10)), 2, 3, 1)
