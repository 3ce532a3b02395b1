"""Mask arithmetic shared by the updaters: leaf selection, top-k by threshold, N:M tiles.

Masks are pytrees shaped like the params: a bool array (True = kept) for every sparse leaf and
None for every dense leaf. Functions here work on flat lists aligned with
`jax.tree.leaves(params)` (None in the same places) so one code path serves both scopes:

- `scope="global"`: one top-k over the raw magnitudes of all sparse leaves concatenated in
  leaf order (no per-tensor normalisation);
- `scope="per_tensor"`: one top-k per leaf, each with its own count.

Counts: a sparsity s over n entries keeps `round((1 - s) * n)` entries, rounding half to even
(Python `round` / `jnp.round`; e.g. s = 0.75, n = 10 keeps round(2.5) = 2). Ties in magnitude
are broken deterministically: the entry earlier in (leaf order, row-major index) wins.

Top-k never sorts: a V group of an 8B model holds 1.4e9-2.7e9 entries, more than int32 ranks can
count, and a global argsort would need several int32 copies of it on one device. Instead
`topk_masks` searches a threshold on the 32-bit order key of the float32 scores with count
reductions (two bits per pass: three candidate counts), then searches the flat index of the one
leaf where the ties run out. The order keys replace the scores (the same memory) and the masks
are bool; it works leaf by leaf on sharded arrays (no concatenation, gather or scatter).
Limit: one top-k (all sparse leaves for the global scope) < 2**32 entries (uint32 counts and
flat indices); each axis of a leaf < 2**31.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fips_jax.models import base

# FiPS makes only the V factors sparse: a path component `v` or one starting with `v_`.
DEFAULT_FILTER = r"(^|/)v(/|$|_)"
SCOPES = ("global", "per_tensor")
# Order keys (uint32) of float32 scores, see `_order_key`: both zeros map to _KEY_ZERO.
_KEY_ZERO = 0x80000000
_ABS_BITS, _INF_BITS = 0x7FFFFFFF, 0x7F800000

PyTree = Any


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """[(slash-joined path, e.g. `params/group_0/v_fc1`, leaf)] in `jax.tree.leaves` order."""
    return [(base.path_str(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


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
    """`num_keep` for a traced sparsity, as a uint32 scalar (n < 2**32: an 8B model's V group
    of 2.7e9 entries overflows int32).

    float32 cannot hold every count above 2**24, so when the traced value equals `exact_at`
    (the updater's final target) the exact Python count is used: budgets stay exact at the end.
    """
    frac = jnp.clip(1.0 - sparsity.astype(jnp.float32), 0.0, 1.0)
    k = jnp.minimum(jnp.round(frac * jnp.float32(n)), jnp.float32(n)).astype(jnp.uint32)
    if exact_at is not None:
        k = jnp.where(sparsity == jnp.float32(exact_at), jnp.uint32(num_keep(exact_at, n)), k)
    return jnp.minimum(k, jnp.uint32(n))


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

    Two sorts: meant for short axes (N:M tiles); `topk_masks` does long top-k without sorting.
    `+ 0.0` maps -0.0 to +0.0 so signed zeros tie instead of sorting apart.
    """
    order = jnp.argsort(-scores + 0.0, axis=axis, stable=True)
    return jnp.argsort(order, axis=axis, stable=True).astype(jnp.int32)


def topk_masks(scores: Sequence[Any], keep: Any, scope: str) -> list[Any]:
    """Keep the `keep` highest scores; None leaves stay None.

    scores: per-leaf float32 arrays (or None); -inf marks entries that must not be kept unless
        `keep` exceeds the finite ones (callers intersect with their candidate set). Scores
        compare by exact value: -0.0 ties with +0.0, NaN ranks below -inf, ties go to the entry
        earlier in (leaf order, row-major index), and subnormals order by value on every backend
        (a float sort on XLA:CPU flushes them to zero and ties them with 0).
    keep: `scope="global"`: one int (or traced integer scalar) over all sparse leaves together;
        `scope="per_tensor"`: a list aligned with `scores` of ints (None for dense leaves).
        Counts outside [0, n] are clipped to it.
    """
    return _select([None if x is None else _as_float32(x) for x in scores], keep, scope, _plain)


def topk_magnitude_masks(leaves: Sequence[Any], active: Sequence[Any], keep: Any, scope: str) -> list[Any]:
    """`topk_masks(magnitude_scores(leaves, active), keep, scope)`, the same masks, without a
    float32 copy of the scores: every pass recomputes |w| (-inf outside `active`) from the leaf
    and its active mask, fused into its count, so a mask update of V needs no V-sized float
    temporary."""
    return _select([None if w is None else (w, a) for w, a in zip(leaves, active)], keep, scope, _magnitude)


def _plain(s: jnp.ndarray) -> jnp.ndarray:
    return s


def _magnitude(item: tuple[Any, Any]) -> jnp.ndarray:
    w, a = item
    return jnp.where(a, jnp.abs(w).astype(jnp.float32), -jnp.inf)


def _shape(item: Any) -> tuple[int, ...]:
    return tuple(jax.tree.leaves(item)[0].shape)


def _select(items: list[Any], keep: Any, scope: str, score: Any) -> list[Any]:
    """Masks of the `keep` top `score(item)` per scope; None items stay None."""
    check_scope(scope)
    where = [i for i, x in enumerate(items) if x is not None]
    if scope == "global":
        groups, keeps = ([where], [keep]) if where else ([], [])
    else:
        groups, keeps = [[i] for i in where], [keep[i] for i in where]
    groups_items = [[items[i] for i in g] for g in groups]
    ks = [_clip_keep(k, _group_size([_shape(x) for x in leaves])) for leaves, k in zip(groups_items, keeps)]
    kept = _topk_groups(groups_items, ks, score)
    out: list[Any] = [None] * len(items)
    for g, masks in zip(groups, kept):
        for i, m in zip(g, masks):
            out[i] = m
    return out


def _as_float32(s: jnp.ndarray) -> jnp.ndarray:
    if s.dtype == jnp.float32:
        return s
    if jnp.issubdtype(s.dtype, jnp.floating) and jnp.dtype(s.dtype).itemsize < 4:
        return s.astype(jnp.float32)  # exact, so the order is unchanged
    raise TypeError(f"top-k scores must be float32 (or a narrower float), got {s.dtype}")


def _order_key(s: jnp.ndarray) -> jnp.ndarray:
    """uint32 order key of float32 `s`: a larger key ranks first in `topk_masks`.

    Non-negative floats order like their bits, negative ones like their flipped bits; then both
    zeros share one key and every NaN gets 0, last, as `jnp.argsort` puts them. Integer tests
    only, so flush-to-zero float compares cannot merge subnormals with zero.
    """
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    magnitude = bits & jnp.uint32(_ABS_BITS)
    key = jnp.where(bits >= jnp.uint32(_KEY_ZERO), ~bits, bits | jnp.uint32(_KEY_ZERO))
    key = jnp.where(magnitude == 0, jnp.uint32(_KEY_ZERO), key)
    return jnp.where(magnitude > jnp.uint32(_INF_BITS), jnp.uint32(0), key)


# A count reduces a predicate in two stages: first over a few axes (at most _FOLD entries per
# output, so XLA:CPU fuses the predicate into that reduction), then the small partial array. One
# reduction over all axes of a large array is rewritten by XLA:CPU into a tree of reduce-windows
# that first writes the predicate out as a full int32 array: 4-7x slower per pass.
_FOLD = 32


def _fold_axes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """How `_count` folds a leaf of `shape`: (leading axes to reduce first, split of the last
    axis into (size // g, g) to reduce first), one of them trivial ((), 1).

    Leading axes come first (no reshape, so a sharded leaf keeps its layout), when their
    product is in [8, _FOLD]; else the largest divisor g <= _FOLD of the last axis, if >= 8."""
    lead, prod = [], 1
    for axis, dim in enumerate(shape[:-1]):
        if prod * dim > _FOLD:
            break
        lead.append(axis)
        prod *= dim
    if prod >= 8:
        return tuple(lead), 1
    g = max((g for g in range(1, _FOLD + 1) if shape and shape[-1] % g == 0), default=1)
    return (), (g if g >= 8 else 1)


def _count(pred: jnp.ndarray) -> jnp.ndarray:
    """uint32 number of True entries; exact because one leaf has < 2**32 entries and a first
    stage sums at most _FOLD of them."""
    if pred.size <= 4096 or pred.ndim == 0:
        return jnp.sum(pred, dtype=jnp.uint32)
    lead, g = _fold_axes(pred.shape)
    if lead:
        partial = jnp.sum(pred, axis=lead, dtype=jnp.int32)
    elif g > 1:
        split = pred.reshape(pred.shape[:-1] + (pred.shape[-1] // g, g))
        partial = jnp.sum(split, axis=-1, dtype=jnp.int32)
    else:
        return jnp.sum(pred, dtype=jnp.uint32)
    # The barrier keeps XLA from merging the two stages back into one reduction.
    return jnp.sum(jax.lax.optimization_barrier(partial), dtype=jnp.uint32)


def _clip_keep(keep: Any, n: int) -> jnp.ndarray:
    """`keep` clipped to [0, n] as a uint32 scalar (n < 2**32)."""
    if isinstance(keep, (int, np.integer)):
        return jnp.uint32(min(max(int(keep), 0), n))
    keep = jnp.asarray(keep)
    if not jnp.issubdtype(keep.dtype, jnp.integer) or keep.ndim:
        raise TypeError(f"keep must be an integer scalar, got {keep.dtype}{list(keep.shape)}")
    if jnp.issubdtype(keep.dtype, jnp.signedinteger):
        keep = jnp.maximum(keep, jnp.zeros((), keep.dtype))
    return jnp.minimum(keep.astype(jnp.uint32), jnp.uint32(n))


def _group_size(shapes: list[tuple[int, ...]]) -> int:
    """Entries in one top-k selection, checked against the limits of its uint32 counts."""
    for shape in shapes:
        if any(dim >= 2**31 for dim in shape):
            raise ValueError(f"top-k: a leaf of shape {shape} has an axis >= 2**31")
    n = sum(math.prod(shape) for shape in shapes)
    if n >= 2**32:
        raise ValueError(f"top-k: one selection over {n} >= 2**32 entries; use scope='per_tensor'")
    return n


# Bits of the threshold decided per pass over the keys: 2**b - 1 candidate thresholds are
# counted in each pass (see `_topk_groups`).
_BITS_PER_PASS = 2


def _pass_widths(bits: int, per_pass: int) -> list[int]:
    """Bits decided by each pass, from the top: e.g. 32, 3 -> [3] * 10 + [2]."""
    return [min(per_pass, bits - i) for i in range(0, bits, per_pass)]


def _pick(values: list[jnp.ndarray], j: jnp.ndarray) -> jnp.ndarray:
    """values[j] for a traced j, as a select chain (no gather)."""
    out = values[0]
    for i, v in enumerate(values[1:], 1):
        out = jnp.where(j == i, v, out)
    return out


# Jitted here, unlike most library functions: eager callers (`tx.init`, `instant_sparsify`
# outside jit) would otherwise retrace on every call; inside a caller's jit it inlines.
@functools.partial(jax.jit, static_argnums=2)
def _topk_groups(groups: list[list[Any]], ks: list[jnp.ndarray], score: Any) -> list[list[jnp.ndarray]]:
    """Per group, bool masks of its `k` highest scores, the group's leaves taken in order.
    A leaf is whatever `score` maps to its float32 scores.

    ks: uint32 counts in [0, group size]. Plain scores (`_plain`) are turned into order keys
    once (the same memory as the scores, which are dead after); any other `score` is recomputed,
    fused into the count, in every pass (behind an optimisation barrier so that XLA cannot hoist
    it into one score-sized array). Passes over the keys: 32 / _BITS_PER_PASS
    (threshold search) + 1 (masks), plus up to ceil(log2(leaf size)) / _BITS_PER_PASS over the
    one leaf per group in which the entries tied at the threshold run out (none when no tie
    is split, as for magnitudes of float weights).
    """
    if score is _plain:
        materialised = [[_order_key(s) for s in leaves] for leaves in groups]
        keys_now = lambda after: materialised  # noqa: E731
        to_key = _plain
    else:
        to_key = lambda item: _order_key(score(item))  # noqa: E731

        def keys_now(after):
            # The barrier takes the previous pass's result too: barriers on the same operands
            # alone would be merged by CSE into one, and the keys computed once, score-sized.
            srcs, _ = jax.lax.optimization_barrier((groups, after))
            return [[to_key(s) for s in leaves] for leaves in srcs]

    # Largest key t per group with count(key >= t) >= k, b bits per pass from the top: the
    # candidates t | j << shift (j = 1 .. 2**b - 1) are counted together and the largest j
    # whose count is >= k is taken (for k = 0 t ends at 2**32 - 1, above every key). Per leaf
    # it also keeps count(key >= t), the counts of the last accepted candidate, and
    # count(key > t), those of the smallest rejected one (every lower bit is accepted after it).
    state = [
        (jnp.uint32(0), [jnp.uint32(math.prod(_shape(s))) for s in leaves], [jnp.uint32(0) for _ in leaves])
        for leaves in groups
    ]
    shift = 32
    for width in _pass_widths(32, _BITS_PER_PASS):
        shift -= width
        new_state = []
        for leaves, k, (t, at_least, above) in zip(keys_now(state), ks, state):
            cands = [t | jnp.uint32(j << shift) for j in range(1, 2**width)]
            counts = [[_count(key >= c) for key in leaves] for c in cands]  # [cand][leaf]
            # Totals fall as j grows, so the accepted candidates are a prefix: j* = their number.
            j = sum((sum(per_leaf) >= k).astype(jnp.int32) for per_leaf in counts)
            new_t = t | (j.astype(jnp.uint32) << jnp.uint32(shift))
            new_state.append((
                new_t,
                [_pick([a] + [c[i] for c in counts], j) for i, a in enumerate(at_least)],
                [_pick([c[i] for c in counts] + [b], j) for i, b in enumerate(above)],
            ))
        state = new_state

    masks = []
    sources = groups if score is not _plain else keys_now(state)
    for leaves, k, (t, at_least, above) in zip(sources, ks, state):
        # Ties to keep: k - count(key > t) <= count(key == t), handed out in leaf order.
        left = k - sum(above)
        group_masks = []
        for src, n_at_least, n_above in zip(leaves, at_least, above):
            n_ties = n_at_least - n_above
            take = jnp.minimum(left, n_ties)
            left = left - take
            cut = _tie_cut(src, t, take, n_ties, to_key)
            key = to_key(src)
            group_masks.append((key > t) | ((key == t) & _index_below(key.shape, cut)))
        masks.append(group_masks)
    return masks


def _tie_cut(src: Any, t: jnp.ndarray, take: jnp.ndarray, ties: jnp.ndarray, to_key: Any = _plain) -> jnp.ndarray:
    """uint32 p such that the entries of `to_key(src)` equal to t with flat index < p are the
    first `take` (take, ties: uint32).

    Searches the flat index, _BITS_PER_PASS bits per pass, only where 0 < take < ties;
    elsewhere the loop runs no pass.
    """
    shape = _shape(src)
    size = math.prod(shape)
    nbits = max(size - 1, 0).bit_length()
    per_pass = _BITS_PER_PASS

    def refine(state):
        b, q = state  # q: the largest index with fewer than `take` ties before it, so far
        width = jnp.minimum(b, per_pass)
        b = b - width
        shift = b.astype(jnp.uint32)
        # Candidates q | j << shift, j = 1 .. 2**width - 1 (those past the width repeat the
        # last one, which changes no count); accepted while fewer than `take` ties lie before.
        j_max = (jnp.uint32(1) << width.astype(jnp.uint32)) - jnp.uint32(1)
        cands = [q | (jnp.minimum(jnp.uint32(j), j_max) << shift) for j in range(1, 2**per_pass)]
        src_now, cands_now = jax.lax.optimization_barrier((src, cands))
        tied_now = to_key(src_now) == t
        j = sum((_count(tied_now & _index_below(shape, c)) < take).astype(jnp.uint32) for c in cands_now)
        j = jnp.minimum(j, j_max)
        return b, q | (j << shift)

    partial = (take > 0) & (take < ties)
    start = (jnp.where(partial, nbits, 0).astype(jnp.int32), jnp.uint32(0))
    _, q = jax.lax.while_loop(lambda state: state[0] > 0, refine, start)
    return jnp.where(take == 0, jnp.uint32(0), jnp.where(partial, q + jnp.uint32(1), jnp.uint32(size)))


def _index_below(shape: tuple[int, ...], p: jnp.ndarray) -> jnp.ndarray:
    """bool[shape]: row-major flat index < p (uint32 p), compared axis by axis on iotas so no
    int array the size of the leaf is built; p >= size gives all True."""
    size = int(np.prod(shape))
    if size == 0:
        return jnp.zeros(shape, bool)
    below, same = jnp.bool_(False), jnp.bool_(True)
    for axis in range(len(shape)):
        stride = int(np.prod(shape[axis + 1 :]))
        q = p // jnp.uint32(stride)
        # Axis 0 saturates at its length (p >= size: every entry below); int32 from there on.
        digit = (jnp.minimum(q, jnp.uint32(shape[0])) if axis == 0 else q % jnp.uint32(shape[axis])).astype(jnp.int32)
        i = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
        below = below | (same & (i < digit))
        same = same & (i == digit)
    return below if shape else p > 0


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
