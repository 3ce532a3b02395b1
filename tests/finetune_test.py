"""Global error minimisation: fine-tuning recovers the dense model, keeps V's budget, trains only
the groups, resumes exactly, and refuses bad losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax import budget, factors, finetune, grouping, local_opt, sparsity
from fips_jax.methods import fips
from fips_jax.models import registry, vit

LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
VIT = dict(model_type="vit", image_size=8, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
           num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu", layer_norm_eps=1e-12, num_labels=10,
           qkv_bias=True)
STEPS = 80
QUIET = lambda msg: None  # noqa: E731


def _compressed(arch, blocks, rank=8, sparsity_=0.5, seed=0):
    """Dense params whose MLPs matter (random init barely uses them: louder MLP kernels and a
    peakier head) and their FiPS groups: a low-rank SVD init pruned to 50%, far from the dense model."""
    params = arch.init(jax.random.PRNGKey(seed))

    def scale(path, x):
        name = jax.tree_util.keystr(path)
        if "mlp" in name and "kernel" in name:
            return x * 3.0
        return x * 4.0 if "head" in name else x

    params = jax.tree_util.tree_map_with_path(scale, params)
    layouts = {f"g{g:02d}": grouping.group_layout(params, arch.mlp_spec, arch.mlp_path, b, group=g)
               for g, b in enumerate(blocks)}
    groups = {k: fips.group_init(arch.mlp_spec, layout, rank, params, 32.0) for k, layout in layouts.items()}
    groups = sparsity.create_updater("static", sparsity_).instant_sparsify(groups)[0]
    return params, layouts, groups


def _student(arch, params, layouts, groups, x):
    return arch.apply(factors.assemble(params, [(layouts[k], groups[k]) for k in layouts]), x)


def _heldout(arch, params, layouts, groups, x):
    """(KL(dense || compressed) per position, top-1 agreement with the dense model), in numpy."""
    s = np.asarray(_student(arch, params, layouts, groups, x), np.float64)
    t = np.asarray(arch.apply(params, x), np.float64)
    log_s = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    log_t = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
    kl = np.mean(np.sum(np.exp(log_t) * (log_t - log_s), -1))
    return kl, np.mean(s.argmax(-1) == t.argmax(-1))


def _get(tree, key_path):
    for k in key_path:
        tree = tree[k.key]
    return tree


def _cfg(**kw):
    return finetune.FinetuneConfig(**{"steps": STEPS, "lr": 3e-2, "weight_decay": 0.0, "update_freq": 5,
                                      "batch": 8, **kw})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    arch = registry.from_hf_config(LLAMA)
    params, layouts, groups = _compressed(arch, [(0, 1)])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (16, 16)).astype(np.int32)
    held = rng.integers(0, 64, (8, 16)).astype(np.int32)
    out, losses = finetune.finetune(arch, params, layouts, groups, tokens, _cfg(),
                                    str(tmp_path_factory.mktemp("llama") / "ck"), checkpoint_every=20, log=QUIET)
    return dict(arch=arch, params=params, layouts=layouts, groups=groups, tokens=tokens, held=held, out=out,
                losses=losses)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    arch = registry.from_hf_config(VIT)
    params, layouts, groups = _compressed(arch, [(0,), (1,)])
    before = jax.tree_util.tree_map(np.array, params)
    rng = np.random.default_rng(1)
    images = rng.standard_normal((32, 8, 8, 3)).astype(np.float32)
    held = rng.standard_normal((32, 8, 8, 3)).astype(np.float32)
    out, losses = finetune.finetune(arch, params, layouts, groups, images, _cfg(),
                                    str(tmp_path_factory.mktemp("vit") / "ck"), checkpoint_every=1000, log=QUIET)
    return dict(arch=arch, params=params, before=before, layouts=layouts, groups=groups, images=images, held=held,
                out=out, losses=losses)


@pytest.mark.parametrize("run", ["llama", "vit_run"])
def test_finetuning_moves_the_compressed_model_towards_the_dense_one(run, request):
    r = request.getfixturevalue(run)
    losses = r["losses"]
    assert len(losses) == STEPS
    assert np.mean(losses[-5:]) < losses[0] / 2, (losses[0], losses[-5:])
    x = r["held"]
    kl0, agree0 = _heldout(r["arch"], r["params"], r["layouts"], r["groups"], x)
    kl1, agree1 = _heldout(r["arch"], r["params"], r["layouts"], r["out"], x)
    assert kl1 < 0.75 * kl0, (kl0, kl1)
    assert agree1 > agree0, (agree0, agree1)


@pytest.mark.parametrize("run", ["llama", "vit_run"])
def test_v_keeps_its_number_of_nonzeros_and_rigl_moves_them(run, request):
    r = request.getfixturevalue(run)
    nnz0, size = finetune.v_nonzeros(r["groups"])
    nnz1, _ = finetune.v_nonzeros(r["out"])
    assert nnz0 == nnz1 == size // 2
    before = np.concatenate([np.asarray(r["groups"][k]["v"]).ravel() != 0 for k in r["layouts"]])
    after = np.concatenate([np.asarray(r["out"][k]["v"]).ravel() != 0 for k in r["layouts"]])
    # Pruned entries are exact zeros: a pruned entry left at, say, -1e-30 by weight decay or a
    # masked update would count above. The budget the pipeline reports is therefore unchanged.
    kept = lambda g: sum(budget.group_kept_params(p["u"], p["v"]) for p in g.values())  # noqa: E731
    assert kept(r["out"]) == kept(r["groups"])
    # RigL did swap entries: the same count, not the same support.
    assert np.sum(before != after) > 0.02 * size


def test_only_group_params_change(vit_run):
    r = vit_run
    # The dense params are untouched (not donated, not updated) ...
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), r["params"], r["before"])
    # ... the result holds exactly the group params, every kind of which was trained ...
    assert jax.tree_util.tree_structure(r["out"]) == jax.tree_util.tree_structure(r["groups"])
    for k in r["layouts"]:
        for name, leaf in jax.tree_util.tree_leaves_with_path(r["groups"][k]):
            new = np.asarray(_get(r["out"][k], name))
            assert not np.array_equal(new, np.asarray(leaf)), (k, jax.tree_util.keystr(name))
    # ... and the compressed model differs from the dense one only at grouped kernels and biases.
    grouped = {path.rsplit("/", 1)[0] for layout in r["layouts"].values() for row in layout.fc_paths for path in row}
    model = factors.assemble(r["params"], [(r["layouts"][k], r["out"][k]) for k in r["layouts"]])
    changed = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(model):
        name = "/".join(str(p.key) for p in path)
        same = np.array_equal(np.asarray(leaf), np.asarray(_get(r["params"], path)))
        if name.rsplit("/", 1)[0] in grouped:
            changed.append(name)
            assert not same, name
        else:
            assert same, name
    assert len(changed) == 2 * 2 * 2  # 2 blocks x (fc1, fc2) x (kernel, bias)


def test_interrupted_run_resumes_to_the_same_params(llama, tmp_path):
    r = llama
    ck = str(tmp_path / "ck")

    def stop(step, loss):
        if step == 30:
            raise local_opt.Interrupted()

    with pytest.raises(local_opt.Interrupted):
        finetune.finetune(r["arch"], r["params"], r["layouts"], r["groups"], r["tokens"], _cfg(), ck,
                          checkpoint_every=20, log=QUIET, on_step=stop)
    logs = []
    out, losses = finetune.finetune(r["arch"], r["params"], r["layouts"], r["groups"], r["tokens"], _cfg(), ck,
                                    checkpoint_every=20, log=logs.append)
    assert any("resumed at step 20" in line for line in logs), logs
    np.testing.assert_allclose(losses, r["losses"], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(r["out"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # The sparsity pattern (RigL's swaps) is the same, not just close.
    np.testing.assert_array_equal(np.asarray(out["g00"]["v"]) != 0, np.asarray(r["out"]["g00"]["v"]) != 0)


def test_losses_on_features_and_labels():
    # A headless ViT (DINOv2-style) outputs final-norm features: kd is their relative squared error.
    head = registry.from_hf_config(VIT)
    headless = vit.ViTArchitecture(vit.ViTConfig(**{**head.config.__dict__, "num_labels": 0}))
    assert finetune.output_kind(head) == "logits" and finetune.output_kind(headless) == "features"
    assert finetune.output_kind(registry.from_hf_config(LLAMA)) == "logits"
    s, t = jnp.asarray([[3.0, 4.0]]), jnp.asarray([[0.0, 4.0]])
    assert float(finetune.output_loss(s, t, "kd", "features")) == pytest.approx(9.0 / 16.0)
    assert float(finetune.output_loss(s, t, "mse", "features")) == pytest.approx(4.5)
    # KL at temperature 2, times 4.
    p, q = jax.nn.softmax(t / 2), jax.nn.softmax(s / 2)
    kl = 4 * float(jnp.sum(p * (jnp.log(p) - jnp.log(q))))
    assert float(finetune.output_loss(s, t, "kd", "logits", 2.0)) == pytest.approx(kl, rel=1e-5)
    assert float(finetune.output_loss(t, t, "kd", "logits")) == pytest.approx(0.0, abs=1e-7)

    # ce on a causal LM is next-token cross-entropy of the student on the minibatch rows.
    arch = registry.from_hf_config(LLAMA)
    params, layouts, groups = _compressed(arch, [(0, 1)])
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (6, 8)), jnp.int32)
    key = jax.random.PRNGKey(7)
    loss, _ = finetune.make_loss(arch, layouts, _cfg(loss="ce"), "logits", 4, key)(groups, 3, tokens, params)
    rows = tokens[local_opt.minibatch_indices(key, 3, 6, 4)]
    logp = jax.nn.log_softmax(_student(arch, params, layouts, groups, rows)[:, :-1])
    expect = -jnp.mean(jnp.take_along_axis(logp, rows[:, 1:, None], -1))
    assert float(loss) == pytest.approx(float(expect), rel=1e-5)


def test_bad_loss_and_missing_labels_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"finetune loss 'kl' not in \('kd', 'mse', 'ce'\)"):
        finetune.FinetuneConfig(steps=10, loss="kl")
    with pytest.raises(ValueError, match="update_freq must be >= 2 for rigl"):
        finetune.FinetuneConfig(steps=10, update_freq=1)
    arch = registry.from_hf_config(VIT)
    params = arch.init(jax.random.PRNGKey(0))
    layouts = {"g00": grouping.group_layout(params, arch.mlp_spec, arch.mlp_path, (0, 1))}
    groups = {"g00": fips.group_init(arch.mlp_spec, layouts["g00"], 4, params, 32.0)}
    images = np.zeros((4, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="'ce' on the classifier vit needs labels"):
        finetune.finetune(arch, params, layouts, groups, images, _cfg(loss="ce"), str(tmp_path), log=QUIET)
    with pytest.raises(ValueError, match=r"labels have shape \(3,\), expected \(4,\)"):
        finetune.finetune(arch, params, layouts, groups, images, _cfg(loss="ce"), str(tmp_path), log=QUIET,
                          labels=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="'ce' needs class logits, but vit outputs features"):
        finetune.finetune(arch, params, layouts, groups, images, _cfg(loss="ce"), str(tmp_path), log=QUIET,
                          outputs="features")
    with pytest.raises(ValueError, match=r"layouts for groups \['g00'\] but params for \['g01'\]"):
        finetune.finetune(arch, params, layouts, {"g01": groups["g00"]}, images, _cfg(), str(tmp_path), log=QUIET)


def test_from_config():
    block = dict(enabled=True, epochs=2.5, batch=8, lr=1e-4, end_lr=0.0, weight_decay=0.05, drop_fraction=0.05,
                 update_freq=50, loss="kd", temperature=2.0)
    cfg = finetune.from_config(block, n_inputs=20)
    assert cfg.steps == round(2.5 * 3) == 8  # ceil(20 / 8) = 3 minibatches an epoch
    assert (cfg.lr, cfg.drop_fraction, cfg.temperature, cfg.batch, cfg.loss) == (1e-4, 0.05, 2.0, 8, "kd")
    assert finetune.from_config({**block, "epochs": 0.01}, 20).steps == 1
    assert finetune.from_config({**block, "enabled": False}, 20) is None
    with pytest.raises(ValueError, match=r"lacks \['temperature'\]"):
        finetune.from_config({k: v for k, v in block.items() if k != "temperature"}, 20)


def test_bfloat16_products_fine_tune_like_float32(llama, tmp_path):
    """compute_dtype=bfloat16 rounds the operands of every dense product (student and teacher)
    and accumulates in float32: same loss curve up to that rounding, same outcome."""
    r = llama
    out, losses = finetune.finetune(r["arch"], r["params"], r["layouts"], r["groups"], r["tokens"],
                                    _cfg(compute_dtype="bfloat16"), str(tmp_path / "ck"), checkpoint_every=1000,
                                    log=QUIET)
    # Step 0: same params, only the rounding differs (8 mantissa bits: ~0.4% per operand).
    np.testing.assert_allclose(losses[0], r["losses"][0], rtol=3e-2)
    assert np.mean(losses[-5:]) < losses[0] / 2, (losses[0], losses[-5:])
    kl0, _ = _heldout(r["arch"], r["params"], r["layouts"], r["groups"], r["held"])
    kl32, _ = _heldout(r["arch"], r["params"], r["layouts"], r["out"], r["held"])
    kl16, _ = _heldout(r["arch"], r["params"], r["layouts"], out, r["held"])
    assert kl16 < 0.75 * kl0 and abs(kl16 - kl32) < 0.25 * kl32, (kl0, kl32, kl16)


def test_bfloat16_compute_is_refused_for_vits_and_unknown_dtypes():
    with pytest.raises(ValueError, match=r"compute_dtype 'float16' not in \('float32', 'bfloat16'\)"):
        finetune.FinetuneConfig(steps=10, compute_dtype="float16")
    with pytest.raises(ValueError, match="compute_dtype='bfloat16' is for the decoder LLMs; vit"):
        finetune.compute_arch(registry.from_hf_config(VIT), "bfloat16")
