"""Activation-aware closed forms: whitening, SVD-LLM, Basis Sharing, and a whitened FiPS init.

Everything here is float64 numpy: each function runs once per layer or group on matrices of
at most a few thousand rows, where float32 would lose the small eigenvalues of a Gram matrix
that whitening divides by.

Two orientations appear and are never mixed inside one function:

* Peers (SVD-LLM, Basis Sharing), row vectors: `y = x W`, `W: [d_in, d_out]`, calibration
  inputs `X: [tokens, d_in]`, `gram = X^T X: [d_in, d_in]`. An upper-triangular `S` with
  `S^T S = gram` turns the output error into a plain Frobenius norm: `||X M||_F = ||S M||_F`.
* FiPS (`whitened_group_init`, `refit_v`, `weighted_error`): every FC written as `W: [d, p]`,
  `W ~ U V` with `U: [d, r]`, `V: [r, p]`. Input-side FCs (gate/up/fc1, flax kernel `[d, p]`)
  are weighted by the block's MLP-input gram `X^T X: [d, d]`; output-side FCs (down/fc2, flax
  kernel `[p, d] = W^T`) by the hidden gram `H^T H: [p, p]` (`calib_stats` computes both).

Damping (`damp`) is relative: `G + damp * mean(diag(G)) * I`, so one value fits every scale.
"""

from __future__ import annotations

import fractions
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from fips_jax.factors import FipsFactors


# ----------------------------------------------------------------------------- whitening
class Whitener(NamedTuple):
    """s: [d, d] upper triangular with `s^T s = G + shift * I`; s_inv: [d, d] its inverse (upper
    triangular); shift: what was added to G's diagonal (damping plus any Cholesky fallback)."""

    s: np.ndarray
    s_inv: np.ndarray
    shift: float


def _sym64(g, name: str) -> np.ndarray:
    g = np.asarray(g, np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"{name}: expected a square [d, d] Gram matrix, got shape {g.shape}")
    return (g + g.T) / 2


def _damped(g: np.ndarray, damp: float) -> np.ndarray:
    if damp < 0:
        raise ValueError(f"damp {damp} must be >= 0")
    if damp == 0:
        return g
    return g + damp * np.mean(np.diag(g)) * np.eye(g.shape[0])


def whitener(gram, damp: float = 0.0) -> Whitener:
    """Upper-triangular S with `S^T S = gram + damp * mean(diag(gram)) * I`, in float64.

    gram: [d, d] symmetric positive semi-definite (X^T X). Cholesky; if it fails (singular or,
    from rounding, slightly indefinite), SVD-LLM's fallback: add `(-lambda_min + eps) * I` with
    `eps = 1e-10 * mean|diag|` and retry (eps grows tenfold if rounding defeats it again).
    The extra diagonal is reported in `shift`.
    """
    g0 = _sym64(gram, "gram")
    g = _damped(g0, damp)
    d = g.shape[0]
    shift = damp * float(np.mean(np.diag(g0)))
    try:
        low = np.linalg.cholesky(g)
    except np.linalg.LinAlgError:
        scale = float(np.mean(np.abs(np.diag(g)))) or 1.0
        lam_min = float(np.linalg.eigvalsh(g)[0])
        eps = 1e-10 * scale
        for _ in range(6):
            extra = max(-lam_min, 0.0) + eps
            try:
                low = np.linalg.cholesky(g + extra * np.eye(d))
                shift += extra
                break
            except np.linalg.LinAlgError:
                eps *= 10
        else:
            raise ValueError(f"gram: Cholesky failed even after adding {extra:.3g} * I (non-finite entries?)")
    s = low.T
    s_inv = np.triu(np.linalg.solve(s, np.eye(d)))
    return Whitener(s=s, s_inv=s_inv, shift=shift)


def _psd_solve(a: np.ndarray, b: np.ndarray, rcond: float = 1e-12) -> np.ndarray:
    """`pinv(a) @ b` for symmetric PSD a [r, r], through eigh: eigenvalues below rcond * max
    are treated as zero (minimum-norm least-squares solution when a is singular)."""
    lam, q = np.linalg.eigh((a + a.T) / 2)
    keep = lam > rcond * max(float(lam[-1]), 0.0)
    inv = np.where(keep, 1.0 / np.where(keep, lam, 1.0), 0.0)
    return q @ (inv[:, None] * (q.T @ b))


# ----------------------------------------------------------------------------- peers
def _check_rank(k: int, d_in: int, d_out: int, what: str) -> None:
    if not 1 <= k <= min(d_in, d_out):
        raise ValueError(f"{what}: rank k={k} must be in [1, min(d_in, d_out) = {min(d_in, d_out)}]")


def svd_llm(w, gram, k: int, damp: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """SVD-LLM's truncation-aware whitened SVD of one layer (peers' orientation, `y = x W`).

    w: [d_in, d_out]; gram: X^T X [d_in, d_in]; k: kept rank in [1, min(d_in, d_out)].
    SVD of `S W = U Sigma V^T`, then A = S^{-1} U_k Sigma_k [d_in, k], B = V_k^T [k, d_out].
    `X A B` is the best rank-k approximation of `X W` (so A B minimises ||X W - X A B||_F over
    rank k) whenever S is exact, i.e. damp = 0 and gram positive definite; otherwise it is the
    optimum for the damped/shifted gram.
    """
    w = np.asarray(w, np.float64)
    if w.ndim != 2:
        raise ValueError(f"w: expected [d_in, d_out], got shape {w.shape}")
    g = _sym64(gram, "gram")
    if g.shape[0] != w.shape[0]:
        raise ValueError(f"gram: shape {g.shape} does not match w's d_in {w.shape[0]}")
    _check_rank(k, *w.shape, "svd_llm")
    wh = whitener(g, damp)
    u, s, vh = np.linalg.svd(wh.s @ w, full_matrices=False)
    return wh.s_inv @ (u[:, :k] * s[:k]), vh[:k]


def input_side_coeffs(basis, gram, w, damp: float = 0.0) -> np.ndarray:
    """The coefficients C [k, d_out] minimising ||X (W - basis C)||_F with the basis fixed:
    `C = (B^T G B)^+ B^T G W` (G = X^T X damped). basis: [d_in, k]; gram: [d_in, d_in];
    w: [d_in, d_out]. Minimum-norm solution when B^T G B is singular."""
    b = np.asarray(basis, np.float64)
    g = _damped(_sym64(gram, "gram"), damp)
    w = np.asarray(w, np.float64)
    if b.shape[0] != g.shape[0] or w.shape[0] != g.shape[0]:
        raise ValueError(f"input_side_coeffs: basis {b.shape}, gram {g.shape}, w {w.shape} disagree on d_in")
    gb = g @ b
    return _psd_solve(b.T @ gb, gb.T @ w)


def basis_sharing(ws: Sequence, grams: Sequence, k: int, damp: float = 0.0,
                  refit: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Basis Sharing: one input-side basis for g layers of one matrix type (peers' orientation).

    ws: g matrices [d_in, d_out_i]; grams: their X_i^T X_i [d_in, d_in]; k: shared rank in
    [1, min(d_in, sum d_out_i)]. The grams are summed and whitened (S^T S = sum_i G_i), then
    `S [W_1 .. W_g] = U Sigma V^T`: basis = S^{-1} U_k Sigma_k [d_in, k], layer i keeps its
    [k, d_out_i] slice of V_k^T. This minimises sum_i ||S (W_i - basis C_i)||_F^2, i.e. every
    layer weighted by the group's pooled inputs. `refit=True` then replaces each C_i by the
    exact optimum for the layer's own inputs with the basis fixed (Basis Sharing's optional
    refit, `C_i = (B^T G_i B)^{-1} B^T G_i W_i`), which never increases sum_i ||X_i (W_i - B C_i)||.
    Returns (basis, [C_1, .., C_g]).
    """
    if len(ws) != len(grams) or not ws:
        raise ValueError(f"basis_sharing: {len(ws)} matrices but {len(grams)} grams (need as many, >= 1)")
    ws = [np.asarray(w, np.float64) for w in ws]
    d_in = ws[0].shape[0]
    for i, (w, g) in enumerate(zip(ws, grams)):
        if w.ndim != 2 or w.shape[0] != d_in or np.shape(g) != (d_in, d_in):
            raise ValueError(f"basis_sharing: layer {i} has w {w.shape}, gram {np.shape(g)}; expected [{d_in}, *], [{d_in}, {d_in}]")
    widths = [w.shape[1] for w in ws]
    _check_rank(k, d_in, sum(widths), "basis_sharing")
    wh = whitener(sum(_sym64(g, f"grams[{i}]") for i, g in enumerate(grams)), damp)
    u, s, vh = np.linalg.svd(wh.s @ np.concatenate(ws, axis=1), full_matrices=False)
    basis = wh.s_inv @ (u[:, :k] * s[:k])
    if refit:
        return basis, [input_side_coeffs(basis, g, w, damp) for w, g in zip(ws, grams)]
    edges = np.cumsum([0] + widths)
    return basis, [vh[:k, a:b] for a, b in zip(edges[:-1], edges[1:])]


def rank_for_ratio(d_in: int, d_out: int, ratio: float, n_layers: int = 1) -> int:
    """The peers' rank for removing `ratio` of the weights of n_layers [d_in, d_out] matrices
    that share one [d_in, k] basis and keep [k, d_out] each:
    `k = floor(d_in * d_out * n * (1 - ratio) / (d_in + d_out * n))`; n = 1 is SVD-LLM's
    per-layer formula, n = g Basis Sharing's. Exact rational arithmetic."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio} must be in [0, 1) (the fraction of weights removed)")
    if min(d_in, d_out, n_layers) < 1:
        raise ValueError(f"d_in {d_in}, d_out {d_out}, n_layers {n_layers} must be >= 1")
    kept = 1 - fractions.Fraction(str(ratio))
    return int((d_in * d_out * n_layers * kept) // (d_in + d_out * n_layers))


def rank_for_kept(d_in: int, d_out: int, kept: int, n_layers: int = 1) -> int:
    """The largest shared rank k whose factors (`d_in*k + n*k*d_out` numbers) fit in `kept`
    parameters: for matching another method's kept-parameter count."""
    if kept < 0 or min(d_in, d_out, n_layers) < 1:
        raise ValueError(f"kept {kept} must be >= 0 and d_in {d_in}, d_out {d_out}, n_layers {n_layers} >= 1")
    return kept // (d_in + d_out * n_layers)


# ----------------------------------------------------------------------------- FiPS, whitened
def _check_group(ws, grams_in, grams_hidden, transposed):
    ws = np.asarray(ws, np.float64)
    if ws.ndim != 4:
        raise ValueError(f"ws: expected [n_blocks, n_fcs, d, p], got shape {ws.shape}")
    n, f, d, p = ws.shape
    if len(transposed) != f:
        raise ValueError(f"transposed: {len(transposed)} flags for {f} FCs")
    g_in = np.asarray(grams_in, np.float64)
    if g_in.shape != (n, d, d):
        raise ValueError(f"grams_in: expected [{n}, {d}, {d}], got {g_in.shape}")
    g_h = None
    if grams_hidden is not None:
        g_h = np.asarray(grams_hidden, np.float64)
        if g_h.shape != (n, p, p):
            raise ValueError(f"grams_hidden: expected [{n}, {p}, {p}], got {g_h.shape}")
    elif any(transposed):
        raise ValueError("grams_hidden: required when an FC is output-side (transposed)")
    return ws, g_in, g_h


def _damp_all(grams: np.ndarray | None, damp: float) -> np.ndarray | None:
    if grams is None:
        return None
    return np.stack([_damped((g + g.T) / 2, damp) for g in grams])


def refit_v(u, ws, grams_in, grams_hidden, transposed: Sequence[bool], damp: float = 0.0) -> np.ndarray:
    """The exactly optimal V given U for every FC of a group (FiPS orientation), float64.

    u: [d, r]; ws: [n, F, d, p]; grams_in: [n, d, d] (X_b^T X_b); grams_hidden: [n, p, p]
    (H_b^T H_b, or None when no FC is output-side); transposed: per FC, True for down/fc2.
    Returns v [n, F, r, p].

    Input-side FC (y = x W): minimise ||X_b (W - U V)||_F^2. Setting the gradient
    -2 U^T G_b (W - U V) to zero gives V = (U^T G_b U)^+ U^T G_b W; U^T G_b W lies in the range
    of U^T G_b U (both are (X_b U)^T times something), so the pseudo-inverse solves the normal
    equations even when U^T G_b U is singular (r > rank, zero columns of a grown U), giving the
    minimum-norm optimum.

    Output-side FC (kernel K = W^T, y = h K): minimise ||H_b (W^T - V^T U^T)||_F^2
    = ||(W - U V) T^T||_F^2 with T^T T = G_hid. Claim: V = (U^T U)^+ U^T W is optimal whatever
    G_hid. Proof: let P be the orthogonal projector onto span(U), so U V_opt = P W. For any V,
    W - U V = (I - P) W + (P W - U V), and (I - P)(P W - U V) = 0 because both P W and U V lie
    in span(U). Hence the cross term tr(T W^T (I - P)(P W - U V) T^T) vanishes and
    ||(W - U V) T^T||^2 = ||(I - P) W T^T||^2 + ||(P W - U V) T^T||^2 >= ||(I - P) W T^T||^2,
    with equality at U V = P W. The hidden-side weighting cancels; grams_hidden is only
    shape-checked here.

    damp: relative damping of grams_in (the optimum of the damped objective).
    """
    ws, g_in, _ = _check_group(ws, grams_in, grams_hidden, transposed)
    u = np.asarray(u, np.float64)
    n, f, d, p = ws.shape
    if u.ndim != 2 or u.shape[0] != d:
        raise ValueError(f"u: expected [{d}, r], got shape {u.shape}")
    r = u.shape[1]
    g_in = _damp_all(g_in, damp)
    v = np.empty((n, f, r, p))
    ins = [i for i in range(f) if not transposed[i]]
    outs = [i for i in range(f) if transposed[i]]
    if outs:
        utu = u.T @ u
        for b in range(n):
            for i in outs:
                v[b, i] = _psd_solve(utu, u.T @ ws[b, i])
    for b in range(n):
        if ins:
            gu = g_in[b] @ u
            rhs = gu.T @ np.concatenate([ws[b, i] for i in ins], axis=1)
            sol = _psd_solve(u.T @ gu, rhs)
            for j, i in enumerate(ins):
                v[b, i] = sol[:, j * p:(j + 1) * p]
    return v


def weighted_error(u, v, ws, grams_in, grams_hidden, transposed: Sequence[bool],
                   relative: bool = False) -> float:
    """The activation-weighted reconstruction error of a group, summed over blocks and FCs:
    input-side `||X_b (W - U V)||_F^2 = tr(E^T G_in E)`, output-side
    `||H_b (W - U V)^T||_F^2 = tr(E G_hid E^T)`, E = W - U V [d, p]. relative=True divides by
    the same sum for E = W (the error of U V = 0)."""
    ws, g_in, g_h = _check_group(ws, grams_in, grams_hidden, transposed)
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)

    def sq(e, b, out_side):
        return float(np.sum(e * (e @ g_h[b])) if out_side else np.sum(e * (g_in[b] @ e)))

    n, f = ws.shape[:2]
    err = sum(sq(ws[b, i] - u @ v[b, i], b, transposed[i]) for b in range(n) for i in range(f))
    if not relative:
        return err
    ref = sum(sq(ws[b, i], b, transposed[i]) for b in range(n) for i in range(f))
    return err / ref


def _output_side_gram(ws, g_h, transposed) -> np.ndarray:
    """P_out = sum_{b, f out} W_bf G_hid_b W_bf^T [d, d]: with U orthonormal and the optimal
    V_bf = U^T W_bf, every output-side quantity below needs G_hid only through P_out
    (error tr(P_out) - tr(U^T P_out U), CG terms P_out U and U^T P_out U): one d p^2 product
    per output-side FC, none per candidate or step."""
    n, f, d, _ = ws.shape
    p_out = np.zeros((d, d))
    for b in range(n):
        for i in range(f):
            if transposed[i]:
                p_out += ws[b, i] @ g_h[b] @ ws[b, i].T
    return (p_out + p_out.T) / 2


def _error_given_u(u, v, ws, g_in, p_out, transposed) -> float:
    """L(U, V) for orthonormal u and v = refit_v(u): input side directly, output side by trace."""
    n, f = ws.shape[:2]
    err = float(np.trace(p_out) - np.trace(u.T @ p_out @ u))
    for b in range(n):
        for i in range(f):
            if not transposed[i]:
                e = ws[b, i] - u @ v[b, i]
                err += float(np.sum(e * (g_in[b] @ e)))
    return err


def _u_step(u, v, ws, g_in, p_out, transposed, iters: int) -> np.ndarray:
    """U minimising the weighted error with V fixed, by conjugate gradients from u.

    The error is a quadratic in U with normal equations A(U) = C,
      A(U) = sum_b G_in_b U (sum_{f in} V_bf V_bf^T) + U (sum_{b, f out} V_bf G_hid_b V_bf^T),
      C    = sum_b G_in_b (sum_{f in} W_bf V_bf^T) + sum_{b, f out} W_bf G_hid_b V_bf^T;
    A is symmetric PSD in the Frobenius inner product, and CG started from u never increases
    the quadratic, so an alternating step never increases the error. u must be orthonormal and
    v = refit_v(u): then the output-side V_bf = u^T W_bf and those sums are u^T P_out u and
    P_out u.
    """
    n, f = ws.shape[:2]
    r = u.shape[1]
    a_b = np.zeros((n, r, r))
    b_out = u.T @ p_out @ u
    c = p_out @ u
    for b in range(n):
        rhs_in = np.zeros_like(u)
        for i in range(f):
            if not transposed[i]:
                a_b[b] += v[b, i] @ v[b, i].T
                rhs_in += ws[b, i] @ v[b, i].T
        c += g_in[b] @ rhs_in

    def op(x):
        return sum(g_in[b] @ (x @ a_b[b]) for b in range(n)) + x @ b_out

    x = u.copy()
    res = c - op(x)
    d = res.copy()
    rr = float(np.sum(res * res))
    tol = 1e-24 * max(float(np.sum(c * c)), 1e-300)
    for _ in range(iters):
        if rr <= tol:
            break
        ad = op(d)
        alpha = rr / float(np.sum(d * ad))
        x += alpha * d
        res -= alpha * ad
        rr_new = float(np.sum(res * res))
        d = res + (rr_new / rr) * d
        rr = rr_new
    return x


def _orthonormal(u: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(u)
    return q


def _candidate_basis(g_eig: tuple, p_in: np.ndarray, p_out: np.ndarray, r0: int, alpha: float) -> np.ndarray:
    """Orthonormal U [d, r0] spanning the top-r0 PCA subspace in coordinates y = A x,
    A = (G / c)^(alpha / 2), c = tr(G) / d. Input-side terms enter as sqrt(c) A W (their exact
    whitened form at alpha = 1), output-side terms as A W T_b^T (their exact form at
    alpha = 0), both in units of squared outputs x tokens: the PCA matrix is
    A (c P_in + P_out) A with P_in = sum_{in} W W^T and P_out as `_output_side_gram`.
    g_eig: (c, lam, q), the eigendecomposition G / c = q diag(lam) q^T."""
    c, lam, q = g_eig
    a, a_inv = (q * lam ** (alpha / 2)) @ q.T, (q * lam ** (-alpha / 2)) @ q.T
    cov = a @ (c * p_in + p_out) @ a
    _, vecs = np.linalg.eigh((cov + cov.T) / 2)
    return _orthonormal(a_inv @ vecs[:, ::-1][:, :r0])


def whitened_group_init(ws, grams_in, grams_hidden, transposed: Sequence[bool], rank: int, tau: float = 32.0,
                        damp: float = 0.0, steps: int = 0, cg_iters: int = 50,
                        alphas: Sequence[float] = (0.0, 0.5, 1.0)) -> FipsFactors:
    """An activation-aware shared basis for one FiPS group, with every V exactly optimal.

    ws: [n, F, d, p] the group's FCs in FiPS orientation (down/fc2 transposed to [d, p]);
    grams_in: [n, d, d] each block's MLP-input X_b^T X_b; grams_hidden: [n, p, p] each block's
    H_b^T H_b (the input of down/fc2; None if no FC is output-side); transposed: per FC, True
    for down/fc2; rank: r. Returns FipsFactors(u [d, r], v [n, F, r, p]) in float32, U with
    orthonormal columns (zero columns past d when grown), rows of V ordered by decreasing
    energy like `svd_init`'s.

    Objective (output reconstruction error on the calibration inputs, damped grams):
      L(U, V) = sum_b [ sum_{f in}  ||X_b (W_bf - U V_bf)||^2
                      + sum_{f out} ||H_b (W_bf^T - V_bf^T U^T)||^2 ].
    Given U, every V_bf has a closed form (`refit_v`), and the optimal U V_bf depends on
    span(U) only, so L is a function of the subspace. It has no closed-form minimiser in
    general: each block weights its input-side terms by its own X_b, and the output-side terms
    weight the d axis uniformly (error on the model-width output, rows of H_b act on p) while
    the input-side terms weight it by X_b. What is exact, term by term, with G = mean_b G_in_b:

    * input-side with a common gram: sum ||(I - Pi_{S U}) S W_bf||^2 (S^T S = G), a PCA of the
      columns of S W_bf in whitened coordinates z = S x (SVD-LLM / Basis Sharing);
    * output-side: ||(I - P_U) W_bf T_b^T||^2 (T_b^T T_b = G_hid_b, P_U the orthogonal
      projector), a PCA of the columns of W_bf T_b^T in plain coordinates.

    Construction:
    1. For each alpha in `alphas`, a candidate subspace: the top-r PCA subspace of all terms in
       the coordinates y = (G / c)^(alpha/2) x (c = tr(G)/d), i.e. the top eigenvectors of
       A (c sum_in W W^T + sum_out W G_hid W^T) A (a [d, d] matrix; no p x p factorisation),
       mapped back by A^-1 and orthonormalised (QR; span unchanged). alpha = 1 is exact for
       the input-side terms (whitened coordinates, G^(1/2) = Q S with Q orthogonal), alpha = 0
       for the output-side ones; both kinds keep their units (squared outputs x tokens).
    2. V = refit_v(U) for each candidate; keep the candidate with the lowest L (so the result
       is never worse than either exact end point).
    3. `steps` alternating steps (optional): U given V by CG on the normal equations
       (`cg_iters` iterations, warm start), re-orthonormalise, refit V. Each step is
       block-coordinate descent on L, so L never increases. Cost per CG iteration
       ~ 2 n d^2 r. The output-side terms enter everything only through the [d, d] matrix
       sum_out W G_hid W^T, formed once (d p^2 per output-side FC).
    4. Rotate within span(U) so the rows of V are ordered by energy (SVD of the concatenated
       V's; U V unchanged).

    For n = 1, F = 1 this is the optimum (SVD-LLM's for an input-side FC, the hidden-weighted
    PCA for an output-side one) as long as alphas contains 1 resp. 0. For r >= d the span is
    all of R^d, every FC is reconstructed exactly, and the result is `svd_init.init_group`'s
    (U = left singular vectors of W_s, V = diag(S) Vh, up to signs), including its hybrid
    growth: r - d zero columns in U, extra rows of V = the top rows divided by tau, reused
    cyclically.
    """
    ws, g_in, g_h = _check_group(ws, grams_in, grams_hidden, transposed)
    n, f, d, p = ws.shape
    if rank < 1:
        raise ValueError(f"rank {rank} must be >= 1")
    if tau <= 0:
        raise ValueError(f"tau {tau} must be > 0")
    if not alphas:
        raise ValueError("alphas: give at least one coordinate exponent (e.g. (0.0, 0.5, 1.0))")
    g_in, g_h = _damp_all(g_in, damp), _damp_all(g_h, damp)
    k = min(d, n * f * p)
    r0 = min(rank, k)
    if r0 >= d:
        # U = I spans everything and V = W is exact (the pseudo-inverse solution of a singular
        # gram would be another exact-in-the-weighted-norm V, not W).
        u, v = np.eye(d), ws.copy()
    else:
        p_out = _output_side_gram(ws, g_h, transposed)
        p_in = sum(ws[b, i] @ ws[b, i].T for b in range(n) for i in range(f) if not transposed[i])
        g = np.mean(g_in, axis=0)
        c = np.trace(g) / d
        lam, q = np.linalg.eigh(g / c)
        g_eig = (c, np.maximum(lam, 1e-12 * max(float(lam[-1]), 1e-300)), q)
        best = None
        for alpha in alphas:
            u_c = _candidate_basis(g_eig, p_in, p_out, r0, float(alpha))
            v_c = refit_v(u_c, ws, g_in, g_h, transposed)
            err = _error_given_u(u_c, v_c, ws, g_in, p_out, transposed)
            if best is None or err < best[0]:
                best = (err, u_c, v_c)
        _, u, v = best
        for _ in range(steps):
            u = _orthonormal(_u_step(u, v, ws, g_in, p_out, transposed, cg_iters))
            v = refit_v(u, ws, g_in, g_h, transposed)
    # Order by energy: V_cat = A diag(s) B^T, U <- U A, V <- A^T V (U V unchanged, U orthonormal).
    v_cat = np.transpose(v, (2, 0, 1, 3)).reshape(r0, n * f * p)
    a, _, _ = np.linalg.svd(v_cat, full_matrices=False)
    u, v_cat = u @ a, a.T @ v_cat
    if rank > r0:
        rows = np.arange(rank - r0) % r0
        u = np.concatenate([u, np.zeros((d, rank - r0))], axis=1)
        v_cat = np.concatenate([v_cat, v_cat[rows] / tau], axis=0)
    v = v_cat.reshape(rank, n, f, p).transpose(1, 2, 0, 3)
    return FipsFactors(u=jnp.asarray(u, jnp.float32), v=jnp.asarray(v, jnp.float32))
