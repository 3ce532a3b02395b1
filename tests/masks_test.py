"""Sort-free top-k of fips_jax/sparsity/masks.py against a stable-argsort reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from fips_jax.sparsity import masks as mk

# Few distinct values so most entries tie: both zeros, -inf, NaN (last in argsort order) and
# a subnormal (numpy orders it by value; a float sort on XLA:CPU flushes it to zero).
VALUES = np.float32([0.0, -0.0, 0.5, 1.0, 2.0, -np.inf, np.nan, 1e-45, -1.0])
SHAPES = [(3, 5), None, (7,), (2, 3, 4), None, (), (1, 9)]


def _reference(scores, keep, scope):
    """Top-k by a stable argsort over the concatenation, as masks.py did before (which, on
    XLA:CPU, differed only in tying subnormals with zero)."""

    def top(flat, k):
        # -s + 0.0 makes -0.0 tie with +0.0; numpy sorts NaN last, as jnp.argsort does.
        order = np.argsort(-flat + np.float32(0.0), kind="stable")
        kept = np.zeros(flat.size, bool)
        kept[order[: max(0, min(k, flat.size))]] = True
        return kept

    if scope == "per_tensor":
        return [
            None if s is None else top(s.ravel(), k).reshape(s.shape) for s, k in zip(scores, keep)
        ]
    sparse = [s for s in scores if s is not None]
    kept = top(np.concatenate([s.ravel() for s in sparse]), keep)
    out, start = [], 0
    for s in scores:
        out.append(None if s is None else kept[start : start + s.size].reshape(s.shape))
        start += 0 if s is None else s.size
    return out


def _scores(seed):
    rng = np.random.default_rng(seed)
    return [None if shape is None else rng.choice(VALUES, size=shape) for shape in SHAPES]


def _check(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            np.testing.assert_array_equal(np.asarray(g), w)


def _keeps(scores):
    sizes = [s.size for s in scores if s is not None]
    flat = np.concatenate([s.ravel() for s in scores if s is not None])
    n, n_finite = sum(sizes), int(np.isfinite(flat).sum())
    return sorted({0, 1, n // 3, n // 2, n_finite, n_finite + 1, n - 1, n, n + 5, -3})


# One compile each for every seed and keep below: keep is traced.
_global = jax.jit(lambda s, k: mk.topk_masks(s, k, "global"))
_per_tensor = jax.jit(lambda s, k: mk.topk_masks(s, k, "per_tensor"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_topk_matches_stable_argsort(seed):
    scores = _scores(seed)
    for keep in _keeps(scores):
        _check(_global(scores, jnp.int32(keep)), _reference(scores, keep, "global"))


def test_eager_with_python_int_keep():
    scores = _scores(5)
    sparse = [None if s is None else jnp.asarray(s) for s in scores]
    keeps = _keeps(scores)
    for keep in [keeps[0], keeps[len(keeps) // 2], keeps[-1]]:
        _check(mk.topk_masks(sparse, keep, "global"), _reference(scores, keep, "global"))
    per_leaf = [None if s is None else s.size // 2 for s in scores]
    want = _reference(scores, per_leaf, "per_tensor")
    _check(mk.topk_masks(sparse, per_leaf, "per_tensor"), want)


def test_per_tensor_topk_matches_stable_argsort():
    for seed in range(3):
        scores = _scores(seed)
        rng = np.random.default_rng(seed)
        keeps = [None if s is None else int(rng.integers(-1, s.size + 2)) for s in scores]
        keeps[0], keeps[2] = 0, scores[2].size  # none and all
        traced = [None if k is None else jnp.int32(k) for k in keeps]
        _check(_per_tensor(scores, traced), _reference(scores, keeps, "per_tensor"))


def test_ties_resolve_inside_a_large_leaf():
    # Tied entries run out deep inside a leaf with a non-power-of-two size, so the flat-index
    # bisection has to land on an exact position; positive-only scores, like |w|.
    rng = np.random.default_rng(3)
    ties = rng.choice(np.float32([0.0, 0.25, 0.5]), size=(37, 53))
    scores = [ties, rng.random((11, 2), np.float32)]
    for keep in [1, 400, 777, 1024, 1500, 1960, 1961, 1983]:
        _check(_global(scores, jnp.int32(keep)), _reference(scores, keep, "global"))


def test_signed_zero_infinities_and_nan_order():
    s = jnp.array([-0.0, np.nan, -np.inf, 0.0, np.inf, -1.0, -np.nan, 1e-45, -1e-45], jnp.float32)
    # Keep 3: +inf, the positive subnormal, then the first zero: -0.0 ties with +0.0.
    _check(mk.topk_masks([s], 3, "global"), [np.array([1, 0, 0, 0, 1, 0, 0, 1, 0], bool)])
    # Keep 7: every non-NaN entry; both NaNs come last, the first of them at 8.
    _check(mk.topk_masks([s], 7, "global"), [~np.isnan(np.asarray(s))])
    _check(mk.topk_masks([s], 8, "global"), [np.array([1, 1, 1, 1, 1, 1, 0, 1, 1], bool)])


def _primitives(jaxpr):
    """Primitive names in `jaxpr` and every jaxpr nested in its equations (loops, jits)."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _primitives(sub)


def test_global_topk_neither_sorts_nor_concatenates():
    scores = [jnp.ones((4, 8)), None, jnp.ones((16,))]
    jaxpr = jax.make_jaxpr(lambda s, k: mk.topk_masks(s, k, "global"))(scores, jnp.int32(9))
    used = set(_primitives(jaxpr.jaxpr))
    assert not used & {"sort", "concatenate", "gather", "scatter"}, used
    # The check itself can see a sort (nm_mask still ranks its short tiles by sorting).
    assert "sort" in set(_primitives(jax.make_jaxpr(mk.descending_rank)(jnp.ones((4, 8))).jaxpr))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_scores_give_the_same_masks(axis_type):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
    rng = np.random.default_rng(4)
    scores = [rng.choice(VALUES[:6], size=(8, 24)), rng.choice(VALUES[:6], size=(16, 8))]
    specs = [P("x", None), P(None, "x")]
    sharded = [jax.device_put(s, NamedSharding(mesh, p)) for s, p in zip(scores, specs)]
    got = _global(sharded, jnp.int32(150))
    _check(got, _reference(scores, 150, "global"))


def test_limits_raise_before_any_work():
    # Shapes only (eval_shape traces without allocating).
    topk = lambda *s: mk.topk_masks(list(s), 5, "global")  # noqa: E731
    with pytest.raises(ValueError, match="2\\*\\*31"):
        jax.eval_shape(topk, jax.ShapeDtypeStruct((2**31,), jnp.float32))
    # A Llama-3.1-8B group of 8 blocks: one V leaf of 2.69e9 > 2**31 entries traces fine.
    out = jax.eval_shape(topk, jax.ShapeDtypeStruct((8, 3, 7819, 14336), jnp.float32))
    assert out[0].shape == (8, 3, 7819, 14336) and out[0].dtype == jnp.bool_
    with pytest.raises(ValueError, match="2\\*\\*32"):
        jax.eval_shape(topk, *[jax.ShapeDtypeStruct((2**30,), jnp.float32)] * 4)
    with pytest.raises(TypeError, match="integer"):
        mk.topk_masks([jnp.ones(3)], jnp.float32(1.0), "global")


@pytest.mark.parametrize("algorithm", ["gmp", "rigl"])
def test_mask_updates_of_an_8b_group_trace_past_int32(algorithm):
    """Llama-3.1-8B, a group of 8 blocks: V [8, 3, 7819, 14336] has 2.69e9 entries; the init and
    the mask-update step of GMP and RigL trace (shapes only) with every count past int32."""
    from fips_jax import local_opt  # pylint: disable=import-outside-toplevel

    tx, _ = local_opt.make_optimizer(local_opt.LocalOptConfig(steps=100, algorithm=algorithm, update_freq=50))
    params = {"u": jax.ShapeDtypeStruct((4096, 7819), jnp.float32),
              "v": jax.ShapeDtypeStruct((8, 3, 7819, 14336), jnp.float32)}
    state = jax.eval_shape(tx.init, params)
    updates, _ = jax.eval_shape(tx.update, params, state, params)
    assert updates["v"].shape == params["v"].shape


def test_large_leaves_with_many_ties_match_argsort():
    """Leaves big enough for every way `_count` folds a leaf (leading axes, a split last axis,
    none), scores with many ties among continuous ones, so that the threshold falls on a tie
    inside a leaf at some keeps; keeps from 0 to n, global and per tensor."""
    rng = np.random.default_rng(7)
    shapes = [(6, 3, 37, 64), None, (101, 96), (4099,), (2, 5000), (3, 5)]
    assert mk._fold_axes((6, 3, 37, 64)) == ((0, 1), 1) and mk._fold_axes((101, 96)) == ((), 32)
    assert mk._fold_axes((4099,)) == ((), 1) and mk._fold_axes((2, 5000)) == ((), 25)
    ties = np.float32([0.0, -0.0, 0.125, 0.5, 3.0, -np.inf])
    scores = []
    for shape in shapes:
        if shape is None:
            scores.append(None)
            continue
        s = np.abs(rng.standard_normal(shape)).astype(np.float32)
        tied = rng.random(shape) < 0.6
        scores.append(np.where(tied, rng.choice(ties, size=shape), s))
    n = sum(s.size for s in scores if s is not None)
    flat = np.concatenate([s.ravel() for s in scores if s is not None])
    # Keeps at which the threshold is each tied value: the first kept, the middle, the last.
    order = np.sort(-flat + np.float32(0.0), kind="stable")
    at_ties = [int(np.searchsorted(order, -v, side=side)) + off for v in ties[2:5]
               for side, off in (("left", 1), ("left", 17), ("right", -1))]
    keeps = sorted({0, 1, n - 1, n, *at_ties, *rng.integers(0, n + 1, size=4).tolist()})
    for keep in keeps:
        _check(_global(scores, jnp.int32(keep)), _reference(scores, keep, "global"))
    for _ in range(3):
        per_leaf = [None if s is None else int(rng.integers(0, s.size + 1)) for s in scores]
        per_leaf[0], per_leaf[2] = 0, scores[2].size
        _check(_per_tensor(scores, [None if k is None else jnp.int32(k) for k in per_leaf]),
               _reference(scores, per_leaf, "per_tensor"))


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_magnitude_topk_is_topk_of_the_magnitude_scores(scope):
    """topk_magnitude_masks (|w| recomputed in each pass) selects what topk_masks selects on
    the materialised magnitude scores, ties, NaN, -0.0 and inactive entries included."""
    rng = np.random.default_rng(7)
    leaves = [None if shape is None else jnp.asarray(rng.choice(VALUES, size=shape)) for shape in SHAPES]
    active = [None if w is None else jnp.asarray(rng.random(w.shape) < 0.7) for w in leaves]
    n_sparse = sum(w.size for w in leaves if w is not None)
    for keep in (0, 5, n_sparse // 2, n_sparse):
        k = keep if scope == "global" else [None if w is None else min(keep, w.size) for w in leaves]
        want = mk.topk_masks(mk.magnitude_scores(leaves, active), k, scope)
        got = jax.jit(lambda ws, a, k=k: mk.topk_magnitude_masks(ws, a, k, scope))(leaves, active)
        _check(got, [None if w is None else np.asarray(w) for w in want])


def test_magnitude_topk_builds_no_score_sized_temporary():
    """The passes of topk_magnitude_masks recompute the order keys from w and its active mask:
    XLA must not merge them into one key array the size of w (4 bytes per entry). What remains
    is the bool mask being built (1 byte per entry) and small per-pass counts."""
    w = jax.ShapeDtypeStruct((8, 256, 1024), jnp.float32)
    active = jax.ShapeDtypeStruct(w.shape, jnp.bool_)
    fn = jax.jit(lambda w_, a_: mk.topk_magnitude_masks([w_], [a_], jnp.int32(1000), "global"))
    temp = fn.lower(w, active).compile().memory_analysis().temp_size_in_bytes
    n = 8 * 256 * 1024
    assert temp < 2 * n, f"temp {temp} bytes for {n} entries"
