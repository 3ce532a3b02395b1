"""Mask arithmetic shared by the updaters: leaf selection, top-k by rank, N:M tiles.

Masks are pytrees shaped like the params: a bool array (True = kept) for every sparse leaf and
None for every dense leaf. Functions here work on flat lists aligned with
`jax.tree.leaves(params)` (None in the same places) so one code path serves both scopes:

- `scope="global"`: one top-k over the raw magnitudes of all sparse leaves concatenated in
  leaf order (no per-tensor normalisation);
- `scope="per_tensor"`: one top-k per leaf, each with its own count.

Counts: a sparsity s over n entries keeps `round((1 - s) * n)` entries, rounding half to even
(Python `round` / `jnp.round`; e.g. s = 0.75, n = 10 keeps round(2.5) = 2). Ties in magnitude
are broken deterministically: the entry earlier in (leaf order, row-major index) wins.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# FiPS makes only the V factors sparse: a path component `v` or one starting with `v_`.
DEFAULT_FILTER = r"(^|/)v(/|$|_)"
SCOPES = ("global", "per_tensor")

PyTree = Any


def path_str(path: Sequence[Any]) -> str:
    """Slash-joined key path, e.g. `params/group_0/v_fc1`."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """[(slash-joined path, leaf)] in `jax.tree.leaves` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(path), leaf) for path, leaf in flat]


def select_sparse(params: PyTree, filter_regex: str) -> list[bool]:
    """Which leaves (in leaf order) are sparse: their path matches `filter_regex` (re.search)."""
    pattern = re.compile(filter_regex)
    return [bool(pattern.search(name)) for name, _ in named_leaves(params)]


def flatten_like(params: PyTree, tree: PyTree) -> list[Any]:
    """Leaves of `tree` (a params-shaped tree that may hold None) aligned with params' leaves."""
    return jax.tree.structure(params).flatten_up_to(tree)


def unflatten_like(params: PyTree, leaves: Sequence[Any]) -> PyTree:
    return jax.tree.structure(params).unflatten(list(leaves))


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid scopes: {', '.join(SCOPES)}")


def num_keep(sparsity: float, n: int) -> int:
    """Entries kept out of n at a concrete sparsity: round-half-to-even((1 - s) * n)."""
    return int(round((1.0 - sparsity) * n))


def num_keep_traced(sparsity: jnp.ndarray, n: int, exact_at: float | None = None) -> jnp.ndarray:
    """`num_keep` for a traced sparsity, as an int32 scalar.

    float32 cannot hold every count above 2**24, so when the traced value equals `exact_at`
    (the updater's final target) the exact Python count is used: budgets stay exact at the end.
    """
    k = jnp.round((1.0 - sparsity.astype(jnp.float32)) * n).astype(jnp.int32)
    if exact_at is not None:
        k = jnp.where(sparsity == jnp.float32(exact_at), num_keep(exact_at, n), k)
    return jnp.clip(k, 0, n)


def magnitude_scores(leaves: Sequence[Any], active: Sequence[Any] | None = None) -> list[Any]:
    """|w| in float32 per sparse leaf, -inf where `active` is False; None stays None."""
    if active is None:
        active = [None if w is None else True for w in leaves]
    out = []
    for w, a in zip(leaves, active):
        if w is None:
            out.append(None)
        else:
            out.append(jnp.where(a, jnp.abs(w).astype(jnp.float32), -jnp.inf))
    return out


def descending_rank(scores: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    """Rank of each entry along `axis`, 0 = largest; ties go to the lower index.

    `+ 0.0` maps -0.0 to +0.0 so signed zeros tie instead of sorting apart.
    """
    order = jnp.argsort(-scores + 0.0, axis=axis, stable=True)
    if scores.ndim == 1:
        # Inverting the permutation with a scatter is O(n), cheaper than a second sort for the
        # long global score vector.
        n = scores.shape[0]
        return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return jnp.argsort(order, axis=axis, stable=True).astype(jnp.int32)


def topk_masks(scores: Sequence[Any], keep: Any, scope: str) -> list[Any]:
    """Keep the `keep` highest scores; None leaves stay None.

    scores: per-leaf float arrays (or None); -inf marks entries that must not be kept unless
        `keep` exceeds the finite ones (callers intersect with their candidate set).
    keep: `scope="global"`: one int (or int32 scalar) over all sparse leaves together;
        `scope="per_tensor"`: a list aligned with `scores` of ints (None for dense leaves).
    """
    check_scope(scope)
    if scope == "per_tensor":
        return [
            None if s is None else descending_rank(s.ravel()).reshape(s.shape) < k
            for s, k in zip(scores, keep)
        ]
    sparse = [s for s in scores if s is not None]
    if not sparse:
        return [None] * len(scores)
    ranks = descending_rank(jnp.concatenate([s.ravel() for s in sparse]))
    kept = ranks < keep
    out, start = [], 0
    for s in scores:
        if s is None:
            out.append(None)
        else:
            out.append(kept[start : start + s.size].reshape(s.shape))
            start += s.size
    return out


def nm_mask(w: jnp.ndarray, n_keep: Any, m: int, axis: int, active: Any = True) -> jnp.ndarray:
    """N:M mask: in every tile of `m` consecutive entries along `axis` keep the `n_keep` largest
    |w| among `active` entries (ties to the lower index).

    w: any shape with `w.shape[axis] % m == 0`. n_keep: int or traced int32 scalar <= m.
    Returns bool, shape of w.
    """
    axis = axis % w.ndim
    if w.shape[axis] % m:
        raise ValueError(f"N:M tiles of {m} along axis {axis} do not divide shape {w.shape}")
    scores = jnp.where(active, jnp.abs(w).astype(jnp.float32), -jnp.inf)
    moved = jnp.moveaxis(scores, axis, -1)
    tiles = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
    keep = (descending_rank(tiles) < n_keep) & (tiles > -jnp.inf)
    return jnp.moveaxis(keep.reshape(moved.shape), -1, axis)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """params with every masked-out entry set to exactly 0; leaves with a None mask untouched."""
    leaves = jax.tree.leaves(params)
    out = [
        w if m is None else jnp.where(m, w, jnp.zeros((), w.dtype))
        for w, m in zip(leaves, flatten_like(params, masks))
    ]
    return unflatten_like(params, out)


def realised_sparsity(
    params: PyTree, filter_regex: str = DEFAULT_FILTER
) -> tuple[dict[str, float], float]:
    """Fraction of exact zeros per matching leaf ({path: fraction}) and over all of them.

    Counts values, not masks, so it reports what a saved model really contains. Overall is
    NaN when no leaf matches.
    """
    per_leaf, zeros, total = {}, 0, 0
    pattern = re.compile(filter_regex)
    for name, w in named_leaves(params):
        if not pattern.search(name):
            continue
        arr = np.asarray(w)
        nz = int(arr.size - np.count_nonzero(arr))
        per_leaf[name] = nz / arr.size if arr.size else 0.0
        zeros, total = zeros + nz, total + arr.size
    return per_leaf, (zeros / total if total else float("nan"))
