"""FipsMlp: the three forwards agree, packing is exact, and a trained 2:4 mask is the N:M layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax import factors, local_opt, sparsity
from fips_jax.models import base
from fips_jax.models import fips_mlp as fm

GATED = base.MlpSpec(("gate", "up", "down"), (False, False, True), "silu", gated=True, has_bias=False)
GATED_BIAS = base.MlpSpec(("gate", "up", "down"), (False, False, True), "gelu_tanh", gated=True, has_bias=True)
SPECS = {"vit_gelu_bias": base.VIT_MLP, "gated_silu": GATED, "gated_gelu_bias": GATED_BIAS}


def _group(spec, d, r, p, n=2, density=0.25, seed=0, nm_mask=False):
    """Random trained-looking group params {"u", "v": [n, F, r, p], "bias"?} and its mask."""
    rng = np.random.default_rng(seed)
    f = len(spec.fc_names)
    v = rng.standard_normal((n, f, r, p)).astype(np.float32) / np.sqrt(r)
    if nm_mask:  # 2:4 along r by magnitude, as the nm updater with axis=-2 builds it
        mask = np.asarray(sparsity.masks.nm_mask(jnp.asarray(v), 2, 4, axis=-2))
    else:
        mask = rng.random(v.shape) < density
    group = {"u": jnp.asarray(rng.standard_normal((d, r)).astype(np.float32) / np.sqrt(d)),
             "v": jnp.asarray(np.where(mask, v, 0))}
    if spec.has_bias:
        group["bias"] = {name: jnp.asarray(rng.standard_normal((n, d if tr else p)).astype(np.float32) * 0.1)
                         for name, tr in zip(spec.fc_names, spec.transposed)}
    return group, mask


def _outputs(spec, group, x, b=1, nm=None, mask=None):
    """{mode/kernel: block b's output on x}, every variant in one compiled function."""
    variants = {}
    for mode, kernel in (("materialize", "densify"), ("factored", "densify"), ("sparse", "densify"), ("sparse", "gather")):
        variants[f"{mode}/{kernel}"] = fm.from_group(spec, group, b, mode, nm=nm, mask=mask, sparse_kernel=kernel)
    run = jax.jit(lambda vs, x, u: {k: module.apply(v, x, u) for (k, (module, _)), v in zip(variants.items(), vs)})
    out = run([v for _, v in variants.values()], x, group["u"])
    return {k: np.asarray(y) for k, y in out.items()}


# r < d, and r > d (hybrid growth: V has more rows than U has columns of signal).
@pytest.mark.parametrize("name,d,r", [("vit_gelu_bias", 16, 12), ("gated_silu", 16, 24), ("gated_gelu_bias", 16, 12)])
def test_all_modes_agree(name, d, r):
    spec = SPECS[name]
    group, _ = _group(spec, d, r, p=40)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, d)).astype(np.float32))
    out = _outputs(spec, group, x)
    ref = out.pop("materialize/densify")
    # The reference itself: the dense MLP with W = U V_t.
    dense = factors.block_mlp_params(spec, group["u"], group["v"][1], None if "bias" not in group else
                                       {k: v[1] for k, v in group["bias"].items()})
    np.testing.assert_array_equal(ref, np.asarray(base.mlp_apply(spec, dense, x)))
    assert np.abs(ref).max() > 0.1  # a real signal, not all zeros
    for key, y in out.items():
        np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", ["vit_gelu_bias", "gated_silu"])
def test_nm_layout_agrees_and_is_packed_tight(name):
    spec = SPECS[name]
    group, mask = _group(spec, d=16, r=24, p=40, nm_mask=True)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32))
    out = _outputs(spec, group, x, nm=(2, 4), mask=mask)
    ref = out.pop("materialize/densify")
    for key, y in out.items():
        np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5, err_msg=key)
    module, variables = fm.from_group(spec, group, 0, "sparse", nm=(2, 4), mask=mask)
    assert module.packed_k == (12,) * len(spec.fc_names)
    for index in variables[fm.INDEX_COLLECTION].values():
        assert index.dtype == jnp.uint8 and int(index.max()) < 4
    # Packed V holds half of V's entries plus one byte each: 5/8 of the dense float32 V.
    assert fm.held_bytes(variables) == len(spec.fc_names) * (24 * 40 * 4 // 2 + 24 * 40 // 2) + \
        sum(np.size(b[0]) * 4 for b in group.get("bias", {}).values())


def test_pack_is_exact_and_checks_the_nm_axis():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((8, 10)).astype(np.float32)
    v[rng.random(v.shape) < 0.7] = 0
    v[:, 4] = 0  # an empty column
    v[:, 5] = 1.0  # a full column sets K = r
    packed = fm.pack(v)
    assert packed.values.shape == (8, 10) and packed.index.dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda pv: pv.dense())(packed)), v)
    sparse = np.where(np.arange(8)[:, None] == np.arange(10) % 8, v + 2, 0).astype(np.float32)  # one per column
    assert fm.pack(sparse).values.shape == (1, 10)
    np.testing.assert_array_equal(np.asarray(fm.pack(sparse).dense()), sparse)
    # A 2:4 pattern along p (axis -1) is not 2:4 along r: refused, not silently mangled.
    along_p = np.asarray(sparsity.masks.nm_mask(jnp.asarray(rng.standard_normal((8, 12))), 2, 4, axis=-1))
    with pytest.raises(ValueError, match="not 2:4 along r"):
        fm.pack(np.where(along_p, 1.0, 0.0).astype(np.float32), nm=(2, 4))
    with pytest.raises(ValueError, match="outside the mask"):
        fm.pack(v, mask=np.zeros(v.shape, bool))


def _nm_trained(axis, steps=6):
    """A group trained a few steps with the nm updater (tiles along `axis` of v [n, F, r, p])."""
    spec = GATED
    group, _ = _group(spec, d=16, r=16, p=24, density=1.0, seed=4)
    cfg = local_opt.LocalOptConfig(steps=steps, lr=1e-2, algorithm="nm", sparsity=0.5, n=2, m=4, nm_axis=axis,
                                   update_freq=2)
    tx, updater = local_opt.make_optimizer(cfg)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 64, 16)).astype(np.float32))
    y = jnp.asarray(rng.standard_normal((2, 64, 16)).astype(np.float32))
    step = jax.jit(local_opt.make_step(lambda p, x, y: local_opt.mlp_group_loss(p, spec, x, y), tx, updater))
    opt_state = tx.init(group)
    params = updater.post_gradient_update(group, opt_state)
    losses = []
    for _ in range(steps):
        params, opt_state, loss, _ = step(params, opt_state, x, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    return spec, params, np.asarray(sparsity.get_sparse_state(opt_state).masks["v"])


def test_trained_2_4_mask_along_r_is_the_sparse_forward_layout():
    spec, params, mask = _nm_trained(axis=-2)  # axis -2 of v [n, F, r, p] = axis 0 of v_f [r, p]
    n_blocks, f, r, p = mask.shape
    # Exactly 2 of every 4 consecutive rows kept in every column of every V_f.
    np.testing.assert_array_equal(mask.reshape(n_blocks, f, r // 4, 4, p).sum(axis=3), 2)
    v = np.asarray(params["v"])
    assert not np.any(v[~mask])
    x = jnp.asarray(np.random.default_rng(6).standard_normal((5, 16)).astype(np.float32))
    forwards = jax.jit(lambda u, v_b, packed: [fm.factored_forward(spec, u, v_b, None, x)] + [
        fm.sparse_forward(spec, u, packed, None, x, kernel) for kernel in fm.SPARSE_KERNELS])
    for b in range(n_blocks):
        packed = [fm.pack(v[b, t], nm=(2, 4), mask=mask[b, t]) for t in range(f)]
        for t, pv in enumerate(packed):
            # The packed positions are the updater's mask, entry for entry.
            rebuilt = np.zeros((r, p), bool)
            np.put_along_axis(rebuilt, np.asarray(pv.rows()), True, axis=0)
            np.testing.assert_array_equal(rebuilt, mask[b, t])
            np.testing.assert_array_equal(np.asarray(pv.dense()), v[b, t])
        ref, *sparse = forwards(params["u"], params["v"][b], packed)
        for got in sparse:
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_mask_along_p_is_not_the_layout():
    # The updater's default axis (-1, along p) gives masks the along-r N:M forward cannot take.
    group, _ = _group(GATED, d=16, r=16, p=24, density=1.0)
    updater = sparsity.create_updater("nm", n=2, m=4, axis=-1, filter_regex=local_opt.V_FILTER)
    params, masks = updater.instant_sparsify(group)
    mask = np.asarray(masks["v"])
    np.testing.assert_array_equal(mask.reshape(2, 3, 16, 6, 4).sum(-1), 2)
    with pytest.raises(ValueError, match="along r"):
        fm.pack(np.asarray(params["v"][0, 0]), nm=(2, 4), mask=mask[0, 0])


def test_module_init_names_logical_axes():
    spec, d, r, p = base.VIT_MLP, 8, 12, 20
    x, u = jnp.ones((2, d)), jnp.ones((d, r))
    for mode, want_v in (("factored", ("v_fc1", ("rank", "mlp"))), ("sparse", ("v_values_fc2", ("packed_rank", "mlp")))):
        module = fm.FipsMlp(spec, r, p, mode=mode, packed_k=(3, 4))
        variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, u)
        names = nn.get_partition_spec(variables)["params"]
        assert tuple(names[want_v[0]]) == want_v[1]
        assert tuple(names["bias_fc1"]) == ("mlp",) and tuple(names["bias_fc2"]) == ("embed",)
        assert jax.eval_shape(module.apply, nn.meta.unbox(variables), x, u).shape == (2, d)
    with pytest.raises(ValueError, match="mode"):
        fm.FipsMlp(spec, r, p, mode="dense").init(jax.random.PRNGKey(0), x, u)
