"""Second-order (OBS / SparseGPT-style) pruning of FiPS's V factors, with error compensation.

Input-side FC (gate/up/fc1): `y = (x U) V`, V: [r, p]. The input of V is `z = x U` (r wide), and
every column v[:, j] is an independent least-squares regression sharing the Hessian
`H = (X U)^T (X U) = U^T G_in U` [r, r]: the output error of replacing V by V_hat is

    ||X U (V - V_hat)||_F^2 = sum_j (v_j - v_hat_j)^T H (v_j - v_hat_j).

`obs_prune` minimises it approximately with SparseGPT's procedure (Frantar & Alistarh 2023),
rewritten here for the [r, p] orientation: walk the r axis ("input" axis) in blocks of
`block_size`; at each block start choose the block's mask from the saliency w_q^2 / C_qq^2,
C upper triangular with C^T C = H^-1 (C_qq^2 = [(H restricted to entries q..r-1)^-1]_qq, the
OBS denominator for the entries not yet processed); then entry by entry zero the masked
weights and push the error onto the not-yet-processed entries of the same column with row q of
C (the exact OBS update restricted to those entries); updates for later blocks are applied
lazily, once per block, as one matmul.

Measured on random anisotropic quadratics (tests/obs_test.py): smaller blocks are better (the
mask of a block is chosen before any of its compensation), e.g. r = 128, 50% sparsity, error
relative to magnitude pruning 0.38 with blocks of 8, 0.70 with one block of 128; the greedy
`method="exact"` reaches 0.11 and `refit=True` on blocks of 8 reaches 0.19, both at a cost that
only small factors afford.

With r > d (hybrid growth), or zero columns in U, H has rank <= d < r: it is singular and the
damping (`damp * mean(diag(H)) * I`) is what makes the inverse exist. Rows of V behind zero
columns of U carry no output now, so OBS prunes them first; leave them out (prune
v[..., :d, :]) if they are meant to learn during calibration.

Output-side FC (down/fc2): the kernel is `V^T U^T` [p, d], `y = (h V^T) U^T`, error
`||H (V - V_hat)^T U^T||^2 = tr(U^T U dV G_hid dV^T)`. With orthonormal columns of U (the SVD
and whitened inits) this is sum_i dV_i G_hid dV_i^T: the ROWS of V decouple, each a regression
over the p axis with Hessian G_hid [p, p]; `obs_prune_rows` transposes and reuses `obs_prune`.
With non-orthonormal U only the diagonal of U^T U is kept (row weights ||u_i||^2); the
off-diagonal coupling between rows is ignored, an approximation.

Numpy float64: this runs once per FC after calibration. Cost: the Cholesky of H (r^3/3) plus
~2 p r^2 for the lazy updates per FC.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fips_jax.sparsity.masks import num_keep

ORDERS = ("natural", "saliency")
METHODS = ("sparsegpt", "exact")


def _check_args(v, hessian, sparsity, damp, n, m, block_size, order, axis_name, method="sparsegpt"):
    if v.ndim != 2:
        raise ValueError(f"v: expected a matrix, got shape {v.shape}")
    r = v.shape[0]
    if hessian.shape != (r, r):
        raise ValueError(f"hessian: expected [{r}, {r}] for v of shape {v.shape}, got {hessian.shape}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
    if damp < 0:
        raise ValueError(f"damp {damp} must be >= 0")
    if block_size < 1:
        raise ValueError(f"block_size {block_size} must be >= 1")
    if order not in ORDERS:
        raise ValueError(f"order {order!r} not in {ORDERS}")
    if method not in METHODS:
        raise ValueError(f"method {method!r} not in {METHODS}")
    if (n is None) != (m is None):
        raise ValueError(f"give both n and m for N:M sparsity (got n={n}, m={m})")
    if m is not None:
        if not 0 < n <= m:
            raise ValueError(f"N:M: need 0 < n <= m, got n={n}, m={m}")
        if abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"sparsity {sparsity} disagrees with N:M {n}:{m} (= {1 - n / m})")
        if r % m or (method == "sparsegpt" and block_size % m):
            raise ValueError(f"N:M: m={m} must divide the {axis_name} axis ({r}) and block_size ({block_size})")
        if order != "natural":
            raise ValueError("N:M tiles are consecutive along the axis: use order='natural'")


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper-triangular C with C^T C = H^-1, float64."""
    try:
        h_inv = np.linalg.inv(np.linalg.cholesky(h))  # L^-1
        h_inv = h_inv.T @ h_inv                        # H^-1 = L^-T L^-1
        return np.linalg.cholesky(h_inv).T
    except np.linalg.LinAlgError:
        raise ValueError("hessian: not positive definite after damping; raise `damp` "
                         "(needed when r > rank, e.g. hybrid growth r > d)") from None


def obs_error(v, v_hat, hessian) -> float:
    """sum_j (v_j - v_hat_j)^T H (v_j - v_hat_j) for v, v_hat: [r, p], hessian: [r, r]."""
    dv = np.asarray(v, np.float64) - np.asarray(v_hat, np.float64)
    return float(np.sum(dv * (np.asarray(hessian, np.float64) @ dv)))


def obs_prune(v, hessian, sparsity: float, damp: float = 0.01, n: int | None = None, m: int | None = None,
              block_size: int = 128, order: str = "natural", refit: bool = False,
              method: str = "sparsegpt") -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT pruning of an input-side factor v [r, p] with Hessian [r, r] over the r axis.

    sparsity: fraction of zeros in [0, 1); unstructured masks prune exactly
      `r*p - masks.num_keep(sparsity, r*p)` entries, spread over the blocks of `block_size`
      entries along r in proportion to their size (each block's count is chosen among all its
      r_block x p entries, so columns of v may end with different counts).
    n, m: N:M sparsity instead: in every m consecutive entries along r of every column keep n
      (sparsity must equal 1 - n/m; m must divide r and block_size).
    damp: H + damp * mean(diag(H)) * I (essential when H is singular, e.g. r > d).
    order: "natural" walks r as given (SparseGPT); "saliency" walks it in increasing
      sum_j v_qj^2 / [H^-1]_qq, so the entries most likely pruned come first and their error
      can be pushed onto every other entry. With p = 1, one entry pruned and r <= block_size
      this is exactly the OBS optimum (the first entry's score w^2 / C_00^2 = w^2 / [H^-1]_qq is
      the smallest OBS saliency, and every later C_ii^2 <= [H^-1]_ii only raises the others'
      scores); in natural order it is exact only if that entry happens to come first.
    refit: after the masks are fixed, replace every column's kept entries by the exact
      optimum `v_K + H_KK^-1 H_KP v_P` (damped H). Costs a solve of size |K| per column,
      O(p r^3): for small factors and references, not for 8B-scale groups.
    method: "sparsegpt" (the above) or "exact": greedy OBS one entry at a time per column,
      each removal with the full OBS update of every remaining entry and a rank-1 downdate of
      that column's H^-1 (OBC's ExactOBS). Exactly optimal for one entry, usually close to
      the best mask for more (greedy), O(p * pruned * r^2): a reference for small factors.
      Each column prunes the same count (+-1, so the total is exact); N:M restricts every
      step to tiles that still have entries to lose. `order`, `block_size`, `refit` unused
      (its compensation is already the optimum for its mask).
    Returns (v_hat [r, p] with exact zeros, keep mask [r, p] bool, True = kept).
    """
    v = np.asarray(v, np.float64)
    h = np.asarray(hessian, np.float64)
    _check_args(v, h, sparsity, damp, n, m, block_size, order, "r", method)
    r, p = v.shape
    h = (h + h.T) / 2
    h = h + damp * np.mean(np.diag(h)) * np.eye(r) if damp else h
    if method == "exact":
        return _exact_obs(v, h, sparsity, n, m)
    if order == "saliency":
        diag_inv = np.diag(np.linalg.inv(h))
        perm = np.argsort(np.sum(v * v, axis=1) / diag_inv, kind="stable")
    else:
        perm = np.arange(r)
    hp = h[np.ix_(perm, perm)]
    c = _inverse_cholesky(hp)
    w = v[perm].T.copy()                     # [p, r]: SparseGPT's rows x inputs
    pruned = np.zeros((p, r), bool)

    def pruned_before(cols: int) -> int:     # cumulative count keeps the total exact
        return cols * p - num_keep(sparsity, cols * p)

    for i1 in range(0, r, block_size):
        i2 = min(i1 + block_size, r)
        w1, c1 = w[:, i1:i2].copy(), c[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        mask1 = np.zeros(w1.shape, bool)
        diag1 = np.diag(c1)
        if m is None:
            k = pruned_before(i2) - pruned_before(i1)
            if k:
                score = (w1 ** 2 / diag1 ** 2).ravel()
                mask1.ravel()[np.argsort(score, kind="stable")[:k]] = True
        for i in range(i2 - i1):
            if m is not None and i % m == 0:
                score = w1[:, i:i + m] ** 2 / diag1[i:i + m] ** 2
                drop = np.argsort(score, axis=1, kind="stable")[:, :m - n]
                np.put_along_axis(mask1[:, i:i + m], drop, True, axis=1)
            col = w1[:, i]
            q = np.where(mask1[:, i], 0.0, col)
            e = (col - q) / c1[i, i]
            w1[:, i:] -= np.outer(e, c1[i, i:])
            w1[:, i] = q                     # exact zeros whatever the rounding above
            err1[:, i] = e
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ c[i1:i2, i2:]
    w[pruned] = 0.0
    if refit:
        w = _refit_columns(v[perm].T, hp, ~pruned)
    inv = np.argsort(perm)
    return w.T[inv], ~pruned.T[inv]


def _exact_obs(v: np.ndarray, h: np.ndarray, sparsity: float, n: int | None, m: int | None):
    r, p = v.shape
    c = _inverse_cholesky(h)
    h_inv = c.T @ c
    if m is None:
        total = r * p - num_keep(sparsity, r * p)
        counts = [total // p + (j < total % p) for j in range(p)]
    else:
        counts = [(m - n) * (r // m)] * p
    out, keep = np.empty_like(v), np.ones(v.shape, bool)
    for j in range(p):
        w, hi, alive = v[:, j].copy(), h_inv.copy(), np.ones(r, bool)
        lost = np.zeros(r // m if m else 1, int)
        for _ in range(counts[j]):
            ok = alive if m is None else alive & (lost[np.arange(r) // m] < m - n)
            diag = np.where(ok, np.diag(hi), 1.0)
            q = int(np.argmin(np.where(ok, w * w / diag, np.inf)))
            w -= (w[q] / hi[q, q]) * hi[:, q]
            hi -= np.outer(hi[:, q], hi[q]) / hi[q, q]
            w[q], alive[q] = 0.0, False
            if m is not None:
                lost[q // m] += 1
        w[~alive] = 0.0
        out[:, j], keep[:, j] = w, alive
    return out, keep


def _refit_columns(w: np.ndarray, h: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per row of w [p, r]: kept entries v_K + H_KK^-1 H_KP v_P, pruned ones 0."""
    out = np.zeros_like(w)
    for j in range(w.shape[0]):
        k, pr = keep[j], ~keep[j]
        if k.any():
            out[j, k] = w[j, k] + np.linalg.solve(h[np.ix_(k, k)], h[np.ix_(k, pr)] @ w[j, pr])
    return out


def obs_prune_rows(v, hessian_p, sparsity: float, damp: float = 0.01, n: int | None = None, m: int | None = None,
                   block_size: int = 128, order: str = "natural", refit: bool = False,
                   row_weights=None, method: str = "sparsegpt") -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT pruning of an output-side factor v [r, p] (down/fc2: kernel V^T U^T) whose rows
    are independent regressions over p with Hessian hessian_p = H^T H [p, p].

    Exact decoupling needs orthonormal columns of U; row_weights ([r], e.g. ||u_i||^2 =
    diag(U^T U)) keep the diagonal of U^T U when they are not (weights below 1e-12 of the
    largest are raised to it). N:M tiles run along p here (the axis `h @ V^T` contracts);
    m must divide p. Other arguments as `obs_prune`. Returns (v_hat [r, p], keep [r, p]).
    """
    v = np.asarray(v, np.float64)
    if v.ndim != 2:
        raise ValueError(f"v: expected [r, p], got shape {v.shape}")
    scale = np.ones(v.shape[0])
    if row_weights is not None:
        wts = np.asarray(row_weights, np.float64)
        if wts.shape != (v.shape[0],) or np.any(wts < 0):
            raise ValueError(f"row_weights: expected {v.shape[0]} nonnegative weights, got shape {wts.shape}")
        scale = np.sqrt(np.maximum(wts, 1e-12 * max(float(wts.max()), 1e-300)))
    vt, keep = obs_prune((v * scale[:, None]).T, hessian_p, sparsity, damp, n, m, block_size, order, refit, method)
    return vt.T / scale[:, None], keep.T


def obs_prune_group(u, v, grams_in, grams_hidden, transposed: Sequence[bool], sparsity: float,
                    damp: float = 0.01, n: int | None = None, m: int | None = None, block_size: int = 128,
                    order: str = "natural", method: str = "sparsegpt") -> tuple[np.ndarray, np.ndarray]:
    """OBS-prune every V of a FiPS group to the same sparsity.

    u: [d, r]; v: [n_blocks, F, r, p]; grams_in: [n_blocks, d, d] (X_b^T X_b); grams_hidden:
    [n_blocks, p, p] (H_b^T H_b); transposed: per FC, True for down/fc2.
    Input-side FCs: Hessian U^T G_in_b U over r (N:M along r). Output-side FCs: Hessian
    G_hid_b over p, row weights diag(U^T U) (N:M along p). Returns (v_hat, keep), both
    [n_blocks, F, r, p].

    Each FC gets exactly `sparsity`, with saliencies that compare entries of one FC only.
    FiPS's GMP/static masks instead rank |v| over all V's in scope at once (group or model), so
    FCs whose factors are small lose more entries and the per-FC sparsity is not uniform;
    plain magnitude also ignores both the Hessian and the error compensation done here.
    """
    u = np.asarray(u, np.float64)
    v = np.asarray(v, np.float64)
    if v.ndim != 4 or u.ndim != 2 or u.shape[1] != v.shape[2]:
        raise ValueError(f"u {u.shape}, v {v.shape}: expected [d, r] and [n_blocks, F, r, p]")
    nb, f, r, p = v.shape
    d = u.shape[0]
    g_in = np.asarray(grams_in, np.float64)
    g_h = np.asarray(grams_hidden, np.float64) if grams_hidden is not None else None
    if g_in.shape != (nb, d, d):
        raise ValueError(f"grams_in: expected [{nb}, {d}, {d}], got {g_in.shape}")
    if any(transposed) and (g_h is None or g_h.shape != (nb, p, p)):
        raise ValueError(f"grams_hidden: expected [{nb}, {p}, {p}], got {None if g_h is None else g_h.shape}")
    if len(transposed) != f:
        raise ValueError(f"transposed: {len(transposed)} flags for {f} FCs")
    out, keep = np.empty_like(v), np.empty(v.shape, bool)
    row_w = np.sum(u * u, axis=0)
    for b in range(nb):
        h_in = u.T @ g_in[b] @ u
        for i, tr in enumerate(transposed):
            if tr:
                out[b, i], keep[b, i] = obs_prune_rows(v[b, i], g_h[b], sparsity, damp, n, m, block_size, order,
                                                       row_weights=row_w, method=method)
            else:
                out[b, i], keep[b, i] = obs_prune(v[b, i], h_in, sparsity, damp, n, m, block_size, order,
                                                  method=method)
    return out, keep
