"""Masks, updaters and the optax wrapper (fips_jax/sparsity/{masks,updaters,factory}.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fips_jax import sparsity
from fips_jax.sparsity import masks as mk
from fips_jax.sparsity.updaters import GMP, NM, RigL, SparseState, Static

FILTER = sparsity.DEFAULT_FILTER


def _hand_tree():
    # 7 sparse entries; at 50% global keeps round(3.5) = 4 (half to even).
    return {
        "a": {"v": jnp.array([[0.1, -0.9], [0.5, 0.3]]), "u": jnp.array([[5.0, 5.0]])},
        "b": {"v_fc1": jnp.array([2.0, -1.5, 1.2]), "bias": jnp.array([0.0, 1.0])},
    }


def test_global_mask_by_hand():
    params, masks = jax.jit(Static(sparsity=0.5).instant_sparsify)(_hand_tree())
    # Global top-4 of |.|: 2.0, 1.5, 1.2, 0.9 -> only 0.9 survives in a/v.
    np.testing.assert_array_equal(masks["a"]["v"], [[False, True], [False, False]])
    np.testing.assert_array_equal(masks["b"]["v_fc1"], [True, True, True])
    np.testing.assert_array_equal(params["a"]["v"], np.float32([[0.0, -0.9], [0.0, 0.0]]))
    # Leaves outside the filter have no mask and keep their values.
    assert masks["a"]["u"] is None and masks["b"]["bias"] is None
    np.testing.assert_array_equal(params["a"]["u"], [[5.0, 5.0]])


def test_per_tensor_mask_differs_from_global():
    _, masks = jax.jit(Static(sparsity=0.5, scope="per_tensor").instant_sparsify)(_hand_tree())
    # a/v keeps round(2.0) = 2: 0.9, 0.5; b/v_fc1 keeps round(1.5) = 2: 2.0, 1.5.
    np.testing.assert_array_equal(masks["a"]["v"], [[False, True], [True, False]])
    np.testing.assert_array_equal(masks["b"]["v_fc1"], [True, True, False])


def test_ties_go_to_the_earlier_entry():
    tree = {"v": jnp.array([1.0, -1.0, 1.0, 1.0]), "x": {"v": jnp.array([1.0, 1.0])}}
    _, masks = jax.jit(Static(sparsity=0.5).instant_sparsify)(tree)
    # 6 entries, keep 3, all tied: leaf order is v then x/v, row-major inside.
    np.testing.assert_array_equal(masks["v"], [True, True, True, False])
    np.testing.assert_array_equal(masks["x"]["v"], [False, False])


def test_nm_mask_by_hand_and_tile_axis():
    w = jnp.array([[1.0, -3.0, 2.0, 0.5], [0.0, 0.1, -0.2, 0.3]])
    np.testing.assert_array_equal(
        mk.nm_mask(w, 2, 4, axis=1),
        [[False, True, True, False], [False, False, True, True]],
    )
    # Along axis 0 the tiles are the 2 entries of each column (1:2).
    np.testing.assert_array_equal(
        mk.nm_mask(w, 1, 2, axis=0),
        [[True, True, True, True], [False, False, False, False]],
    )
    with pytest.raises(ValueError, match="do not divide"):
        mk.nm_mask(w, 2, 4, axis=0)


def test_realised_sparsity_counts_zeros_in_matching_leaves():
    per_leaf, overall = sparsity.realised_sparsity(
        {"v": jnp.array([0.0, 1.0, 0.0, 2.0]), "v_x": jnp.zeros(2), "u": jnp.zeros(3)}, FILTER
    )
    assert per_leaf == {"v": 0.5, "v_x": 1.0}
    assert overall == pytest.approx(4 / 6)


# ---- training loops ------------------------------------------------------------------------


def _toy_params(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {
        "g0": {
            "u": jax.random.normal(keys[0], (6, 4)),
            "v_fc1": jax.random.normal(keys[1], (4, 12)),
        },
        "g1": {
            "v_fc2": jax.random.normal(keys[2], (8, 12)),
            "bias": jax.random.normal(keys[3], (12,)),
        },
    }


def _jitted_step(tx, updater):
    """One full update (tx.update, apply_updates, post_gradient_update) under one jit."""

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return updater.post_gradient_update(optax.apply_updates(params, updates), state), state

    return step


def _mask_stats(old_masks, new_masks):
    """(kept count per sparse leaf, entries revived or grown in total) as int32 arrays."""
    old, new = jax.tree.leaves(old_masks), jax.tree.leaves(new_masks)
    counts = jnp.stack([m.sum(dtype=jnp.int32) for m in new]) if new else jnp.zeros(0, jnp.int32)
    grown = sum(jnp.sum(n & ~o, dtype=jnp.int32) for o, n in zip(old, new))
    return counts, jnp.asarray(grown, jnp.int32)


def _train(updater, params, steps=100, lr=0.05, seed=1):
    """Jitted steps on a quadratic loss towards a random target.

    Returns (params, opt_state, counts [steps + 1, n_sparse_leaves] of kept entries after init
    and every step, grown [steps] entries newly kept at each step).
    """
    target = jax.tree.map(
        lambda p: jax.random.normal(jax.random.PRNGKey(seed), p.shape), params
    )
    tx = updater.wrap_optax(optax.adamw(lr, weight_decay=0.01))
    opt_state = jax.jit(tx.init)(params)

    def loss(p):
        pairs = zip(jax.tree.leaves(p), jax.tree.leaves(target))
        return sum(jnp.sum((a - b) ** 2) for a, b in pairs)

    @jax.jit
    def step(p, s):
        updates, new_s = tx.update(jax.grad(loss)(p), s, p)
        p = optax.apply_updates(p, updates)
        return updater.post_gradient_update(p, new_s), new_s, _mask_stats(s.masks, new_s.masks)

    counts = [np.asarray(_mask_stats(opt_state.masks, opt_state.masks)[0])]
    grown = []
    for _ in range(steps):
        params, opt_state, (c, g) = step(params, opt_state)
        counts.append(np.asarray(c))
        grown.append(int(g))
    return params, opt_state, np.stack(counts), np.array(grown)


def _check_final(params, masks, s, scope):
    """Pruned entries exactly 0, kept ones nonzero, counts at the target (exact if global)."""
    per_tensor, total, kept = [], 0, 0
    for w, m in zip(jax.tree.leaves(params), mk.flatten_like(params, masks)):
        w = np.asarray(w)
        if m is None:
            assert np.count_nonzero(w == 0) == 0  # dense leaves untouched
            continue
        m = np.asarray(m)
        assert np.all(w[~m] == 0.0)  # every pruned entry exactly 0
        assert np.count_nonzero(w) == m.sum()  # every kept entry trained away from 0
        per_tensor.append((m.sum(), w.size))
        total, kept = total + w.size, kept + m.sum()
    _, overall = sparsity.realised_sparsity(params, FILTER)
    if s == 0.0:
        assert overall == 0.0
        return
    assert overall == pytest.approx(1 - kept / total)
    if scope == "global":
        assert kept == round((1 - s) * total)
    else:
        for k, n in per_tensor:
            assert abs(k - (1 - s) * n) <= 1


def _check_unfiltered_untouched(params, masks, dense_params):
    """Masks never touch leaves outside filter_regex: u and bias follow the unmasked optimiser."""
    assert masks["g0"]["u"] is None and masks["g1"]["bias"] is None
    for group, name in (("g0", "u"), ("g1", "bias")):
        np.testing.assert_allclose(
            params[group][name], dense_params[group][name], rtol=1e-6, atol=1e-6
        )


@pytest.fixture(scope="module")
def dense_run():
    """The same 100 steps with no sparsity: what every unfiltered leaf must match."""
    return _train(sparsity.create_updater("dense"), _toy_params())[0]


@pytest.mark.parametrize(
    "algorithm, scope",
    [
        ("dense", "global"),
        ("static", "global"),
        ("static", "per_tensor"),
        ("gmp", "global"),
        ("gmp", "per_tensor"),
        ("rigl", "global"),
        ("rigl", "per_tensor"),
    ],
)
def test_100_jitted_steps_reach_the_target_and_leave_other_leaves_alone(
    algorithm, scope, dense_run
):
    s = 0.0 if algorithm == "dense" else 0.7
    updater = sparsity.create_updater(
        algorithm, s, t_end=100, update_freq=10, filter_regex=FILTER, scope=scope
    )
    params, opt_state, counts, grown = _train(updater, _toy_params())
    state = sparsity.get_sparse_state(opt_state)
    assert int(state.count) == 100
    _check_final(params, state.masks, s, scope)
    _check_unfiltered_untouched(params, state.masks, dense_run)
    total = counts.sum(axis=1)
    if algorithm == "rigl":
        # Drop-and-grow keeps the active count (per tensor or overall) constant, yet moves.
        assert np.all(total == total[0])
        if scope == "per_tensor":
            assert np.all(counts == counts[0])
        assert grown.sum() > 0 and np.all(grown[np.arange(100) % 10 != 0] == 0)
    elif algorithm == "gmp":
        assert np.all(np.diff(total) <= 0) and grown.sum() == 0
    else:
        assert np.all(total == total[0]) and grown.sum() == 0


@pytest.mark.parametrize("axis", [0, 1])
def test_nm_2_4_every_tile_has_two_nonzeros_after_training(axis, dense_run):
    updater = sparsity.create_updater("nm", n=2, m=4, axis=axis, update_freq=10)
    params, opt_state, counts, grown = _train(updater, _toy_params())
    masks = sparsity.get_sparse_state(opt_state).masks
    _check_final(params, masks, 0.5, "per_tensor")  # exact per tile, so per tensor
    _check_unfiltered_untouched(params, masks, dense_run)
    for w in (params["g0"]["v_fc1"], params["g1"]["v_fc2"]):
        moved = np.moveaxis(np.asarray(w), axis, -1)
        tiles = moved.reshape(moved.shape[:-1] + (-1, 4))
        np.testing.assert_array_equal(np.count_nonzero(tiles, axis=-1), 2)


def test_gradual_nm_ramps_tiles_and_never_revives():
    updater = sparsity.create_updater(
        "nm", n=2, m=4, axis=1, t_end=100, update_freq=10, nm_gradual=True
    )
    params = _toy_params()
    tx = updater.wrap_optax(optax.sgd(0.01))
    state = jax.jit(tx.init)(params)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    per_tile = []
    for _ in range(100):
        prev = np.asarray(state.masks["g1"]["v_fc2"])
        _, state = update(grads, state, params)
        new = np.asarray(state.masks["g1"]["v_fc2"])
        assert not np.any(new & ~prev)
        per_tile.append(int(new.reshape(8, 3, 4).sum(-1).max()))
    # s_i = 0.5 / 3 keeps round(4 * 5/6) = 3 per tile at first, 2 at the end (step 90).
    assert per_tile[0] == 3 and per_tile[-1] == 2
    assert np.all(np.diff(per_tile) <= 0)


def test_gmp_never_unprunes_and_only_changes_on_update_steps():
    updater = GMP(sparsity=0.8, t_end=60, update_freq=5)
    params = _toy_params()
    tx = updater.wrap_optax(optax.adam(0.1))

    @jax.jit
    def step(params, state, grads):
        updates, new_state = tx.update(grads, state, params)
        params = updater.post_gradient_update(optax.apply_updates(params, updates), new_state)
        return params, new_state, _mask_stats(state.masks, new_state.masks)

    state = jax.jit(tx.init)(params)
    rng = np.random.default_rng(0)
    kept = []
    for t in range(60):
        grads = jax.tree.map(lambda p: rng.standard_normal(p.shape, np.float32), params)
        params, state, (counts, revived) = step(params, state, grads)
        assert int(revived) == 0, f"revived at step {t}"
        kept.append(int(counts.sum()))
    kept = np.array(kept)
    # Masks change only on multiples of 5 (count 5, 10, ...), and only shrink.
    changes = np.flatnonzero(np.diff(kept)) + 1
    assert len(changes) > 5 and np.all(changes % 5 == 0)
    n = 4 * 12 + 8 * 12
    # Initial 0.8 / 3 sparsity; the ramp ends at step 55 (last update before 60) at 0.8.
    assert kept[0] == round((1 - 0.8 / 3) * n) and kept[-1] == round(0.2 * n)


def _rigl_hand_case(reference_parity):
    """One 2x4 leaf at 50%; drop fraction ~0.5 at step 1 -> swap round(0.49999 * 4) = 2."""
    updater = RigL(
        sparsity=0.5,
        t_end=10_000,
        drop_fraction=0.5,
        update_freq=1,
        reference_parity=reference_parity,
    )
    params = {"v": jnp.array([[4.0, 3.0, 0.1, 0.2], [2.0, 1.0, 0.3, 0.4]])}
    tx = updater.wrap_optax(optax.adam(0.1))
    state = tx.init(params)
    np.testing.assert_array_equal(
        state.masks["v"], [[True, True, False, False], [True, True, False, False]]
    )
    step = _jitted_step(tx, updater)
    # Step 0 (no mask update), zero grads: only the pruning takes effect.
    params, state = step(params, state, {"v": jnp.zeros((2, 4))})
    # Stale moments everywhere, as if every entry had been active before.
    adam = state.inner_state[0]
    ones = {"v": jnp.ones((2, 4))}
    state = state._replace(inner_state=(adam._replace(mu=ones, nu=ones),) + state.inner_state[1:])
    grads = {"v": jnp.array([[0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 0.5, 7.0]])}
    params, state = step(params, state, grads)
    return params, state


def test_rigl_drops_smallest_grows_largest_gradient_and_resets_moments():
    params, state = _rigl_hand_case(reference_parity=False)
    # Dropped: the two smallest active (2.0 at [1,0], 1.0 at [1,1]).
    # Grown: the two inactive with the largest |grad| (7.0 at [1,3], 5.0 at [0,2]).
    want = np.array([[True, True, True, False], [False, False, False, True]])
    np.testing.assert_array_equal(state.masks["v"], want)
    assert int(state.masks["v"].sum()) == 4
    grown = np.array([[False, False, True, False], [False, False, False, True]])
    v = np.asarray(params["v"])
    assert np.all(v[grown] == 0.0) and np.all(v[~want] == 0.0)
    assert np.all(v[want & ~grown] != 0.0)
    adam = state.inner_state[0]
    for moment in (adam.mu["v"], adam.nu["v"]):
        assert np.all(np.asarray(moment)[grown] == 0.0)
        assert np.all(np.asarray(moment)[~grown] != 0.0)


def test_rigl_reference_parity_keeps_stale_moments():
    _, state = _rigl_hand_case(reference_parity=True)
    adam = state.inner_state[0]
    # 0.9 * 1 + 0.1 * 0 (masked grad) = 0.9: the authors' grown weights inherit old moments.
    assert float(adam.mu["v"][1, 3]) == pytest.approx(0.9)


def test_gmp_instant_sparsify_at_initial_sparsity():
    updater = sparsity.create_updater("gmp", 0.75, t_end=400)
    assert updater.initial_sparsity() == pytest.approx(0.25)
    params, masks = updater.instant_sparsify(_toy_params(), updater.initial_sparsity())
    _, overall = sparsity.realised_sparsity(params, FILTER)
    assert overall == pytest.approx(1 - round(0.75 * 144) / 144)
    _, full = updater.instant_sparsify(_toy_params())
    assert sum(int(m.sum()) for m in jax.tree.leaves(full)) == 36


def test_get_sparse_state_in_a_chain():
    updater = sparsity.create_updater("static", 0.5)
    tx = optax.chain(optax.clip_by_global_norm(1.0), updater.wrap_optax(optax.sgd(0.1)))
    state = tx.init(_toy_params())
    assert isinstance(sparsity.get_sparse_state(state), SparseState)
    with pytest.raises(ValueError, match="found 0"):
        sparsity.get_sparse_state(optax.sgd(0.1).init(_toy_params()))


def test_updates_of_pruned_entries_are_zero():
    updater = Static(sparsity=0.5)
    params = _toy_params()
    tx = updater.wrap_optax(optax.sgd(1.0))
    state = tx.init(params)
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    for u, m in zip(jax.tree.leaves(updates), mk.flatten_like(params, state.masks)):
        if m is not None:
            assert np.all(np.asarray(u)[~np.asarray(m)] == 0.0)
            assert np.all(np.asarray(u)[np.asarray(m)] == -1.0)


def test_create_updater_validation():
    with pytest.raises(ValueError, match="dense, static, gmp, rigl, nm"):
        sparsity.create_updater("magnitude")
    with pytest.raises(ValueError, match="1.0"):
        sparsity.create_updater("gmp", 1.0, t_end=100)
    with pytest.raises(ValueError, match="-0.25"):
        sparsity.create_updater("static", -0.25)
    with pytest.raises(ValueError, match="t_end"):
        sparsity.create_updater("rigl", 0.5)
    with pytest.raises(ValueError, match="0.75"):
        sparsity.create_updater("nm", 0.75, n=2, m=4)
    with pytest.raises(ValueError, match="scope"):
        sparsity.create_updater("static", 0.5, scope="layerwise")
    assert isinstance(sparsity.create_updater("nm", 0.5), NM)
    with pytest.raises(ValueError, match="blk/v: shape"):
        NM(axis=0).instant_sparsify({"blk": {"v": jnp.ones((3, 4))}})


@pytest.mark.parametrize("make", [
    lambda: GMP(sparsity=0.8, t_end=40, update_freq=5),
    lambda: RigL(sparsity=0.6, t_end=30, drop_fraction=0.3, update_freq=5),
])
def test_host_picked_branch_equals_the_device_conditional(make):
    """A loop that picks `mask_update` per step by `host_is_update_step` computes what the
    `lax.cond` step does, including past the last scheduled change: the same masks, and values
    equal up to float rounding (the two programs fuse Adam's arithmetic differently)."""
    updater = make()
    tx = updater.wrap_optax(optax.adam(0.1))

    def run(host):
        params = _toy_params()
        state = tx.init(params)
        rng = np.random.default_rng(3)
        steps = {u: jax.jit(lambda p, s, g, u=u: tx.update(g, s, p, mask_update=u)) for u in (False, True, None)}
        for t in range(50):
            grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
            updates, state = steps[updater.host_is_update_step(t) if host else None](params, state, grads)
            params = updater.post_gradient_update(optax.apply_updates(params, updates), state)
        return params, state

    (p_host, s_host), (p_dev, s_dev) = run(True), run(False)
    for a, b in zip(jax.tree.leaves(s_host.masks), jax.tree.leaves(s_dev.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves((p_host, s_host)), jax.tree.leaves((p_dev, s_dev))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_gmp_stops_updating_after_its_ramp():
    """With 24 steps, a mask update every 3 and the ramp ending at step 9, the updates at 12-21
    could change nothing and are skipped; before that every multiple of 3 updates."""
    updater = GMP(sparsity=0.75, t_end=12, update_freq=3)
    assert updater.last_update_step() == 9
    assert [t for t in range(24) if updater.host_is_update_step(t)] == [3, 6, 9]
    assert [t for t in range(24) if bool(updater.is_update_step(jnp.int32(t)))] == [3, 6, 9]
    assert not Static(sparsity=0.5).host_is_update_step(50)
