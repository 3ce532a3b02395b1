"""Shared SVD initialisation of a group, and the per-layer SVD baseline.

Library functions are undecorated; jit at the call site, e.g.
`jax.jit(init_group, static_argnames=("rank", "n_blocks", "n_fcs", "tau"))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fips_jax.factors import FipsFactors


def init_group(w: jax.Array, rank: int, n_blocks: int, n_fcs: int, tau: float = 32.0) -> FipsFactors:
    """Truncated SVD of a group matrix, computed in float32 whatever the input dtype.

    w: [d, n_blocks*n_fcs*p]. All singular values go into V (`V = diag(S) Vh`), so U is
    orthonormal. For rank <= min(d, m) this is the optimal rank-r approximation (Eckart-Young).
    For rank > d ("hybrid growth") U gets rank-d zero columns and the extra rows of V are the
    top rows of diag(S) Vh divided by tau, reused cyclically; U V is unchanged, yet the zero
    columns of U receive nonzero gradients through those rows.
    """
    d, m = w.shape
    if m % (n_blocks * n_fcs):
        raise ValueError(f"group matrix width {m} is not divisible by n_blocks*n_fcs = {n_blocks * n_fcs}")
    p = m // (n_blocks * n_fcs)
    u_full, s, vh = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    k = s.shape[0]  # min(d, m)
    sv = s[:, None] * vh  # [k, m]
    if rank <= k:
        u, v = u_full[:, :rank], sv[:rank]
    else:
        extra = rank - k
        rows = jnp.arange(extra) % k  # cyclic reuse when rank - k > k
        u = jnp.concatenate([u_full, jnp.zeros((d, extra), jnp.float32)], axis=1)
        v = jnp.concatenate([sv, sv[rows] / tau], axis=0)
    v = v.reshape(rank, n_blocks, n_fcs, p).transpose(1, 2, 0, 3)
    return FipsFactors(u=u, v=v)


def per_layer_svd(w: jax.Array, rank: int) -> jax.Array:
    """Baseline: the best rank-`rank` approximation of one layer on its own (no sharing, dense
    factors), returned materialised in w's shape and dtype."""
    u, s, vh = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).astype(w.dtype)


def _canonical_signs(vecs: jax.Array) -> jax.Array:
    """Flip each column so that its largest-magnitude entry is positive. Eigenvectors are defined
    up to sign; fixing it makes runs that sum partial products in different orders agree."""
    idx = jnp.argmax(jnp.abs(vecs), axis=0)
    signs = jnp.sign(vecs[idx, jnp.arange(vecs.shape[1])])
    return vecs * jnp.where(signs == 0, 1.0, signs)


def init_group_gram(w: jax.Array, rank: int, n_blocks: int, n_fcs: int, tau: float = 32.0) -> FipsFactors:
    """`init_group` through the Gram matrix, for group matrices too large for one device's SVD.

    w: [d, m] with m = n_blocks*n_fcs*p >> d (8B LLM group: 4096 x 344064). `G = W W^T` is only
    [d, d]: with W sharded along its long axis (jit it with `in_shardings` splitting m), each
    device multiplies its own columns and XLA sums the partial products. The eigendecomposition
    of G (float32, replicated) gives the left singular vectors, U = the top-r eigenvectors, and
    `V = U^T W` (column-sharded like W) equals `diag(S) Vh` of the SVD up to the sign of each row,
    so U V is the same optimal rank-r projection. Hybrid growth (rank > min(d, m)) is
    `init_group`'s: zero columns in U, top rows of V divided by tau, reused cyclically.

    Squaring W squares its condition number: directions with singular values below
    ~sqrt(eps) * s_max (eps ~ 1.2e-7 in float32) are resolved less accurately than by the SVD.
    Pretrained MLP matrices are far better conditioned than that on the kept directions.
    Returns FipsFactors(u [d, rank], v [n_blocks, n_fcs, rank, p]), float32 (float64 for a
    float64 w, which tests use to compare summation orders below float32 rounding).
    """
    d, m = w.shape
    if m % (n_blocks * n_fcs):
        raise ValueError(f"group matrix width {m} is not divisible by n_blocks*n_fcs = {n_blocks * n_fcs}")
    p = m // (n_blocks * n_fcs)
    w = w.astype(jnp.promote_types(w.dtype, jnp.float32))  # float32, or float64 if given (tests)
    # HIGHEST: TPUs and recent GPUs otherwise multiply float32 in bf16/TF32 passes.
    hi = jax.lax.Precision.HIGHEST
    gram = jnp.matmul(w, w.T, precision=hi)
    gram = (gram + gram.T) / 2  # exactly symmetric whatever the summation order
    _, vecs = jnp.linalg.eigh(gram)  # ascending eigenvalues
    k = min(d, m)
    u_full = _canonical_signs(vecs[:, ::-1][:, :k])
    if rank <= k:
        u = u_full[:, :rank]
        v = jnp.matmul(u.T, w, precision=hi)
    else:
        sv = jnp.matmul(u_full.T, w, precision=hi)  # [k, m] = diag(S) Vh up to row signs
        rows = jnp.arange(rank - k) % k
        u = jnp.concatenate([u_full, jnp.zeros((d, rank - k), w.dtype)], axis=1)
        v = jnp.concatenate([sv, sv[rows] / tau], axis=0)
    v = v.reshape(rank, n_blocks, n_fcs, p).transpose(1, 2, 0, 3)
    return FipsFactors(u=u, v=v)
