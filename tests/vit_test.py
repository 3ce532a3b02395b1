"""ViT/DeiT: parity with HF transformers (load and export), staging, and loader errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fips_jax.hf import checkpoint
from fips_jax.hf import vit as hf_vit
from fips_jax.models import base
from fips_jax.models.vit import ViTArchitecture, ViTConfig

try:  # the HF parity tests build torch models; every other test here runs without torch
    import torch
    import transformers
except ImportError:
    torch = transformers = None

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    image_size=16, patch_size=4, num_labels=5, layer_norm_eps=1e-6,
)
HF_CLASSES = {
    "vit": ("ViTConfig", "ViTForImageClassification"),
    "deit_teacher": ("DeiTConfig", "DeiTForImageClassificationWithTeacher"),
    "deit": ("DeiTConfig", "DeiTForImageClassification"),
}


def randomize_(model, seed=0):
    """HF's init leaves biases, LayerNorms and (for DeiT) the tokens at 0/1, where wrong
    wiring can go unnoticed; draw every tensor instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.3 * torch.randn(p.shape, generator=g)
            p.copy_(noise + 1.0 if ("layernorm" in name and name.endswith("weight")) else noise)


@pytest.fixture(scope="module", params=list(HF_CLASSES))
def hf_checkpoint(request, tmp_path_factory):
    """(variant, torch model, checkpoint dir) for a random tiny model saved with save_pretrained."""
    if torch is None:
        pytest.skip("HF parity checks need torch")
    cfg_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[request.param])
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**TINY)).eval()
    randomize_(model)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def load(path):
    cfg = hf_vit.config_from_hf(json.loads((path / "config.json").read_text()))
    tensors = load_file(path / "model.safetensors")
    return cfg, hf_vit.params_from_hf(tensors, cfg)


def pixels(seed=1, batch=2):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def test_config_reflects_hf_class(hf_checkpoint):
    variant, _, path = hf_checkpoint
    cfg, _ = load(path)
    expected = {"vit": (False, False), "deit": (True, False), "deit_teacher": (True, True)}[variant]
    assert (cfg.dist_token, cfg.dist_head) == expected
    assert cfg.seq_len == 16 + (1 if variant == "vit" else 2)
    assert hf_vit.config_from_hf(hf_vit.config_to_hf(cfg)) == cfg


def test_logits_match_hf(hf_checkpoint):
    _, model, path = hf_checkpoint
    cfg, params = load(path)
    x = pixels()
    with torch.no_grad():
        ref = model(x).logits.numpy()
    ours = np.asarray(hf_vit.build_architecture(cfg).apply(params, nhwc(x)))
    assert ours.shape == ref.shape == (2, 5)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero outputs


def test_embed_and_each_block_match_hf_hidden_states(hf_checkpoint):
    _, model, path = hf_checkpoint
    cfg, params = load(path)
    arch = hf_vit.build_architecture(cfg)
    x = pixels(seed=2)
    with torch.no_grad():
        ref = [h.numpy() for h in model(x, output_hidden_states=True).hidden_states]
    hidden, ctx = arch.embed(params, nhwc(x))
    np.testing.assert_allclose(hidden, ref[0], atol=1e-5, rtol=0)
    for i in range(arch.num_blocks):
        # Feed HF's own block input so each block is checked on its own.
        hidden, _ = arch.block(params, i, jnp.asarray(ref[i]), ctx)
        np.testing.assert_allclose(hidden, ref[i + 1], atol=1e-5, rtol=0)


def test_export_reloads_in_transformers(hf_checkpoint, tmp_path, monkeypatch):
    """Through the checkpoint registry, as the pipeline saves and loads."""
    monkeypatch.setitem(checkpoint.FAMILIES, "vit", hf_vit)
    monkeypatch.setitem(checkpoint.FAMILIES, "deit", hf_vit)
    variant, model, path = hf_checkpoint
    arch, params = checkpoint.load_pretrained(str(path))
    cfg, direct = load(path)
    assert arch.config == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, direct)
    assert set(hf_vit.params_to_hf(params, cfg)) == set(load_file(path / "model.safetensors"))

    checkpoint.save_pretrained(arch, params, str(tmp_path))
    reloaded, info = getattr(transformers, HF_CLASSES[variant][1]).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = pixels(seed=3)
    with torch.no_grad():
        ref = reloaded.eval()(x).logits.numpy()
    np.testing.assert_allclose(arch.apply(params, nhwc(x)), ref, atol=1e-4, rtol=0)


# --- Architecture contract (no torch needed beyond the module-level skip) ---------------

# Same widths and image size as TINY so eagerly dispatched ops reuse their compiled kernels.
CFG = ViTConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, image_size=(16, 16),
                patch_size=(4, 4), num_labels=5, layer_norm_eps=1e-6, dist_token=True, dist_head=True)


def random_params(arch, seed=0):
    """Params drawn in numpy on `init`'s abstract shapes: XLA compiles of a random init are
    slow on small CPUs, and zero biases would hide wiring errors."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(arch.init, jax.random.key(0))
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def test_init_is_unboxed_and_named():
    arch = ViTArchitecture(CFG)
    shapes = jax.eval_shape(arch.init, jax.random.key(0))
    leaves = jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert base.get_path(shapes, "blocks_1/mlp/fc1/kernel").shape == (32, 64)
    assert base.get_path(shapes, "blocks_1/mlp/fc2/kernel").shape == (64, 32)
    assert arch.mlp_spec == base.VIT_MLP
    axes = arch.logical_axes()
    assert tuple(axes["blocks_0"]["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(axes["blocks_0"]["mlp"]["fc2"]["kernel"]) == ("mlp", "embed")
    assert tuple(axes["blocks_0"]["attn"]["query"]["kernel"]) == ("embed", "heads")


def test_staged_composition_equals_apply():
    arch = ViTArchitecture(CFG)
    params = random_params(arch)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    hidden, ctx = arch.embed(params, images)
    assert hidden.shape == (2, 4 * 4 + 2, 32)
    for i in range(arch.num_blocks):
        hidden, mlp_in = arch.block(params, i, hidden, ctx)
        assert mlp_in.shape == hidden.shape
    logits = arch.head(params, hidden, ctx)
    assert logits.shape == (2, 5)
    np.testing.assert_allclose(logits, arch.apply(params, images), atol=1e-6, rtol=0)
    block = jax.jit(arch.block, static_argnums=1)
    np.testing.assert_allclose(block(params, 1, hidden, ctx)[0], arch.block(params, 1, hidden, ctx)[0], atol=1e-5)


def test_mlp_in_is_the_mlp_input():
    arch = ViTArchitecture(CFG)
    params = random_params(arch)
    hidden, ctx = arch.embed(params, jax.random.normal(jax.random.key(1), (2, 16, 16, 3)))
    for i in range(arch.num_blocks):
        path = arch.mlp_path(i)
        out, mlp_in = arch.block(params, i, hidden, ctx)
        # With fc2 zeroed the block returns its residual stream alone, so the difference is
        # exactly the MLP's contribution, which mlp_apply must reproduce from mlp_in.
        mlp = base.get_path(params, path)
        silenced = base.set_path(params, f"{path}/fc2", jax.tree_util.tree_map(jnp.zeros_like, mlp["fc2"]))
        residual, mlp_in_2 = arch.block(silenced, i, hidden, ctx)
        np.testing.assert_allclose(mlp_in_2, mlp_in, atol=0, rtol=0)
        expected = base.mlp_apply(arch.mlp_spec, mlp, mlp_in)
        assert float(jnp.abs(expected).max()) > 0.1
        np.testing.assert_allclose(out - residual, expected, atol=1e-5, rtol=0)
        hidden = out


def test_wrong_image_size_is_rejected():
    arch = ViTArchitecture(dataclasses.replace(CFG, image_size=(16, 12)))
    assert arch.config.seq_len == 4 * 3 + 2
    with pytest.raises(ValueError, match=r"\[B, 16, 12, 3\]"):
        arch.apply(random_params(arch), jnp.zeros((1, 12, 16, 3)))


def test_missing_misshaped_and_unexpected_tensors_are_named():
    cfg = dataclasses.replace(CFG, num_layers=1)
    params = random_params(ViTArchitecture(cfg))
    tensors = hf_vit.params_to_hf(params, cfg)
    missing = "deit.encoder.layer.0.intermediate.dense.weight"
    bad = "deit.embeddings.position_embeddings"
    broken = {k: v for k, v in tensors.items() if k != missing}
    broken[bad] = np.zeros((1, 9, 32), np.float32)
    broken["deit.encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
    broken["deit.pooler.dense.weight"] = np.zeros((32, 32), np.float32)  # ignored, not an error
    with pytest.raises(ValueError) as err:
        hf_vit.params_from_hf(broken, cfg)
    msg = str(err.value)
    assert f"missing tensor '{missing}' (for blocks_0/mlp/fc1/kernel, expected shape (64, 32))" in msg
    assert f"tensor '{bad}' (for pos_embed) has shape (1, 9, 32), expected (1, 18, 32)" in msg
    assert "unexpected tensor 'deit.encoder.layer.0.extra.weight'" in msg and "pooler" not in msg
    # A bare getter reports the same missing and mis-shaped tensors.
    with pytest.raises(ValueError, match=f"missing tensor '{missing}'"):
        hf_vit.params_from_hf(lambda k: broken[k], cfg)
    with pytest.raises(ValueError, match=f"tensor '{bad}'"):
        hf_vit.params_from_hf({**tensors, bad: broken[bad]}, cfg)
    # And the intact set loads back to the same values.
    back = hf_vit.params_from_hf(tensors.__getitem__, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
