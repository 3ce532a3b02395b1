"""Local error minimisation: the losses, assembly, and that training beats the SVD init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax import factors, grouping, local_opt, svd_init
from fips_jax.models import base

GATED = base.MlpSpec(("gate", "up", "down"), (False, False, True), "silu", gated=True, has_bias=False)
D, P, N, F, K = 16, 24, 2, 3, 4


def _target(seed, invisible):
    """A group whose MLP weights are U* C with C 75% sparse (rank K): a known low-rank-plus-sparse
    target. With `invisible`, gate/up also carry large rows orthogonal to the inputs' subspace,
    which the data-agnostic SVD ranks first but the data never excites."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    c = rng.standard_normal((K, N * F * P)) * (rng.random((K, N * F * P)) < 0.25)
    w = (q[:, :K] @ c).reshape(D, N, F, P)
    w[:, :, 2] *= 3  # down on a par with gate/up, so global magnitude pruning keeps some of each
    if invisible:
        w[:, :, :2] += (q[:, K:] @ rng.standard_normal((D - K, N * 2 * P)) * 1.5).reshape(D, N, 2, P)
    noise = 0.05 if invisible else 1.0
    x = rng.standard_normal((N, 512, K)) @ q[:, :K].T + noise * rng.standard_normal((N, 512, D))
    teacher = {name: {"kernel": jnp.stack([jnp.asarray(w[:, b, f].T if tr else w[:, b, f], jnp.float32)
                                           for b in range(N)])}
               for f, (name, tr) in enumerate(zip(GATED.fc_names, GATED.transposed))}
    x = jnp.asarray(x, jnp.float32)
    return jnp.asarray(w.reshape(D, -1), jnp.float32), x, local_opt.mlp_targets(GATED, teacher, x)


def _loss(params, step, x, y):
    return local_opt.mlp_group_loss(params, GATED, x, y)


@pytest.mark.parametrize("algorithm,rank,invisible,prune_end,update_freq", [
    ("dense", 8, True, 1.0, 10),   # dense: the SVD spends rank on directions the data never sees
    # Sparse: the SVD factors are dense and pruning them costs accuracy. GMP ends its ramp at 3/4
    # of the run to leave steps for recovery at the final sparsity (it reaches ~11x here).
    ("gmp", 6, False, 0.75, 5),
    ("rigl", 6, False, 1.0, 10),
    ("static", 6, False, 1.0, 10),
])
def test_300_steps_beat_the_svd_init_tenfold(tmp_path, algorithm, rank, invisible, prune_end, update_freq):
    lr = 3e-2
    w, x, y = _target(0, invisible)
    fac = svd_init.init_group(w, rank, N, F)
    p0 = {"u": fac.u, "v": fac.v}
    cfg = local_opt.LocalOptConfig(steps=300, lr=lr, end_lr=lr / 100, weight_decay=0.0, algorithm=algorithm,
                                   sparsity=0.0 if algorithm == "dense" else 0.75, update_freq=update_freq, prune_end=prune_end)
    _, updater = local_opt.make_optimizer(cfg)
    init_loss = float(_loss(updater.instant_sparsify(p0)[0], 0, x, y)[0])
    p1, losses = local_opt.train(p0, _loss, (x, y), cfg, str(tmp_path / "ck"), checkpoint_every=1000, log=lambda m: None)
    assert len(losses) == 300
    assert losses[-1] < init_loss / 10, (init_loss, losses[-1])
    v = np.asarray(p1["v"])
    if algorithm == "dense":
        assert np.all(v != 0)
    else:  # exactly the target sparsity, global over the group's V
        assert np.count_nonzero(v) == round(0.25 * v.size)


def test_group_loss_is_the_mean_of_block_mses():
    w, x, y = _target(1, False)
    fac = svd_init.init_group(w, 4, N, F)
    params = {"u": fac.u, "v": fac.v}
    mean, per_block = local_opt.mlp_group_loss(params, GATED, x, y)
    for b in range(N):
        mlp = {name: {"kernel": (fac.u @ fac.v[b, f]).T if tr else fac.u @ fac.v[b, f]}
               for f, (name, tr) in enumerate(zip(GATED.fc_names, GATED.transposed))}
        expect = np.mean((np.asarray(base.mlp_apply(GATED, mlp, x[b])) - np.asarray(y[b])) ** 2)
        assert float(per_block[b]) == pytest.approx(expect, rel=1e-5)
    assert float(mean) == pytest.approx(float(per_block.mean()), rel=1e-6)


def test_assemble_puts_u_v_into_the_dense_layout_with_biases():
    rng = np.random.default_rng(2)
    spec = base.VIT_MLP
    params = {f"blocks_{b}": {"mlp": {"fc1": {"kernel": rng.standard_normal((D, P)).astype(np.float32),
                                              "bias": np.zeros(P, np.float32)},
                                      "fc2": {"kernel": rng.standard_normal((P, D)).astype(np.float32),
                                              "bias": np.zeros(D, np.float32)}}} for b in range(2)}
    layout = grouping.group_layout(params, spec, lambda b: f"blocks_{b}/mlp", (0, 1))
    fac = svd_init.init_group(grouping.concat_group(params, layout), 2 * D, 2, 2)
    group = factors.init_group_params(fac, params, layout, spec)
    group["bias"]["fc2"] = group["bias"]["fc2"] + 1.0
    out = factors.assemble(params, [(layout, group)])
    for b in range(2):  # rank >= d: exact, and the trained bias replaces the dense one
        np.testing.assert_allclose(out[f"blocks_{b}"]["mlp"]["fc2"]["kernel"], params[f"blocks_{b}"]["mlp"]["fc2"]["kernel"], atol=1e-4)
        np.testing.assert_array_equal(out[f"blocks_{b}"]["mlp"]["fc2"]["bias"], np.ones(D))


def test_minibatches_are_a_function_of_the_step():
    key = jax.random.PRNGKey(0)
    a = local_opt.minibatch_indices(key, jnp.int32(7), 100, 32)
    b = local_opt.minibatch_indices(key, jnp.int32(7), 100, 32)
    np.testing.assert_array_equal(a, b)
    # One epoch (3 batches of 32 from 100) has no repeated position.
    epoch = np.concatenate([local_opt.minibatch_indices(key, jnp.int32(s), 100, 32) for s in range(3)])
    assert len(set(epoch.tolist())) == 96


def test_bfloat16_matmuls_track_float32():
    """compute_dtype=bfloat16 rounds the matmul operands only: loss and gradients within ~1%."""
    w, x, y = _target(3, False)
    fac = svd_init.init_group(w, 2, N, F)  # below the target's rank 4: a loss far above bf16 rounding
    params = {"u": fac.u, "v": fac.v}
    grad = jax.value_and_grad(lambda p, dt: local_opt.mlp_group_loss(p, GATED, x, y, dt)[0])
    (l32, g32), (l16, g16) = grad(params, jnp.float32), grad(params, jnp.bfloat16)
    assert l16.dtype == jnp.float32 and g16["v"].dtype == jnp.float32
    assert float(l16) == pytest.approx(float(l32), rel=2e-2)
    for k in ("u", "v"):
        rel = float(jnp.linalg.norm(g16[k] - g32[k]) / jnp.linalg.norm(g32[k]))
        assert rel < 3e-2, (k, rel)


def test_train_reuses_one_compile_for_the_same_loss_and_shapes(tmp_path):
    w, x, y = _target(4, False)
    fac = svd_init.init_group(w, 6, N, F)
    cfg = local_opt.LocalOptConfig(steps=6, lr=1e-2, update_freq=2)
    local_opt._compiled_step.cache_clear()
    for i in range(2):
        local_opt.train({"u": fac.u, "v": fac.v}, _loss, (x, y), cfg, str(tmp_path / f"ck{i}"), log=lambda m: None)
    info = local_opt._compiled_step.cache_info()
    assert (info.misses, info.hits) == (2, 2)  # one step with and one without the mask update
    assert local_opt._compiled_step(_loss, cfg, False, None)._cache_size() == 1


@pytest.mark.parametrize("n_tokens,batch", [(100, 32), (64, 64), (40, 64)])
def test_host_batches_take_the_tokens_minibatch_indices_gives(n_tokens, batch):
    """HostBatches gathers on the host exactly the positions the in-step gather took, across
    epochs, in the arrays' own dtype."""
    key = jax.random.PRNGKey(3)
    x = np.arange(2 * n_tokens * 3, dtype=np.float32).reshape(2, n_tokens, 3).astype(jnp.bfloat16)
    y = np.arange(2 * n_tokens * 3, dtype=np.float32).reshape(2, n_tokens, 3)
    feed = local_opt.HostBatches((x, y), key, batch)
    for step in range(9):
        idx = np.asarray(local_opt.minibatch_indices(key, jnp.int32(step), n_tokens, min(batch, n_tokens)))
        np.testing.assert_array_equal(feed.indices(step), idx)
        xb, yb = feed(step)
        assert xb.dtype == jnp.bfloat16 and xb.shape == (2, min(batch, n_tokens), 3)
        np.testing.assert_array_equal(np.asarray(xb), x[:, idx])
        np.testing.assert_array_equal(np.asarray(yb), y[:, idx])


def test_train_fed_from_the_host_matches_the_in_step_gather(tmp_path):
    """The same run with the minibatch gathered inside the step (device-resident data) and fed
    from host arrays: the same losses and params."""
    w, x, y = _target(5, False)
    fac = svd_init.init_group(w, 3, N, F)
    p0 = {"u": fac.u, "v": fac.v}
    cfg = local_opt.LocalOptConfig(steps=6, algorithm="gmp", sparsity=0.5, update_freq=2)
    key, batch = jax.random.PRNGKey(1), 128

    def in_step(p, step, x_, y_):
        idx = local_opt.minibatch_indices(key, step, x_.shape[1], batch)
        return local_opt.mlp_group_loss(p, GATED, x_[:, idx], y_[:, idx])

    def fed(p, step, xb, yb):
        return local_opt.mlp_group_loss(p, GATED, xb, yb)

    quiet = dict(checkpoint_every=1000, log=lambda m: None)
    pa, la = local_opt.train(p0, in_step, (x, y), cfg, str(tmp_path / "a"), **quiet)
    feed = local_opt.HostBatches((np.asarray(x), np.asarray(y)), key, batch)
    pb, lb = local_opt.train(p0, fed, (), cfg, str(tmp_path / "b"), feed=feed, **quiet)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("biased", [False, True])
def test_block_remat_gives_the_loss_and_gradients_of_the_group_at_once(compute_dtype, biased):
    spec = GATED if not biased else base.MlpSpec(("fc1", "fc2"), (False, True), "gelu", gated=False, has_bias=True)
    f = len(spec.fc_names)
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {"u": jax.random.normal(k[0], (D, 12)), "v": 0.1 * jax.random.normal(k[1], (3, f, 12, P))}
    if biased:
        params["bias"] = {"fc1": jax.random.normal(k[4], (3, P)), "fc2": jax.random.normal(k[2], (3, D))}
    x = jax.random.normal(k[2], (3, 64, D)).astype(jnp.bfloat16)
    y = jax.random.normal(k[3], (3, 64, D)).astype(jnp.bfloat16)
    grad = jax.jit(jax.value_and_grad(lambda p, r: local_opt.mlp_group_loss(p, spec, x, y, compute_dtype, r)[0],
                                      ), static_argnums=1)
    for a, b in zip(jax.tree.leaves(grad(params, False)), jax.tree.leaves(grad(params, True))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
