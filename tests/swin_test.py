"""Swin: parity with HF transformers (load, single blocks, export), staging, window rules, loader errors.

One tiny config covers every geometry case: image 14 / patch 2 gives a 7x7 grid in stage 0
(windows of 4 need padding to 8, odd blocks shift), an odd-sized patch merging (7 -> 4), and a
4x4 stage 1 where HF's rule disables the shift of its odd block. XLA compiles are the slow part
on small CPUs, so the model functions are jitted once here and shared by the tests.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fips_jax.hf import checkpoint as hf_checkpoint
from fips_jax.hf import swin as hf_swin
from fips_jax.models import base
from fips_jax.models.swin import SwinArchitecture, SwinConfig, relative_position_index, shift_mask, window_geometry

try:  # the HF parity tests build torch models; every other test here runs without torch
    import torch
    import transformers
except ImportError:
    torch = transformers = None
needs_torch = pytest.mark.skipif(torch is None, reason="HF parity checks need torch")

CFG = SwinConfig(image_size=(14, 14), patch_size=(2, 2), embed_dim=8, depths=(2, 2), num_heads=(2, 4),
                 window_size=4, layer_norm_eps=1e-3, num_labels=3)
ARCH = SwinArchitecture(CFG)
EMBED = jax.jit(ARCH.embed)
BLOCK = jax.jit(ARCH.block, static_argnums=1)
HEAD = jax.jit(ARCH.head)
APPLY = jax.jit(ARCH.apply)


def randomize_(model, seed=0):
    """HF's init zeroes the bias tables, biases and position embeddings; draw every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.3 * torch.randn(p.shape, generator=g)
            p.copy_(noise + 1.0 if ("norm" in name and name.endswith("weight")) else noise)


def hf_model(cfg, path):
    hf_cfg = {k: v for k, v in hf_swin.config_to_hf(cfg).items() if k != "model_type"}
    model = transformers.SwinForImageClassification(transformers.SwinConfig(**hf_cfg)).eval()
    randomize_(model)
    model.save_pretrained(path)
    return model


def load(path):
    cfg = hf_swin.config_from_hf(json.loads((path / "config.json").read_text()))
    return cfg, hf_swin.params_from_hf(load_file(path / "model.safetensors"), cfg)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(torch model, checkpoint dir, loaded params)."""
    if torch is None:
        pytest.skip("HF parity checks need torch")
    path = tmp_path_factory.mktemp("swin")
    model = hf_model(CFG, path)
    cfg, params = load(path)
    assert cfg == CFG
    return model, path, params


def pixels(seed=1):
    return torch.randn(2, 3, 14, 14, generator=torch.Generator().manual_seed(seed))


def nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@needs_torch
def test_geometry_rules():
    assert CFG.stage_resolutions() == [(7, 7), (4, 4)]
    assert [CFG.block_stage(i) for i in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert window_geometry((7, 7), 4, shifted=True) == (4, 2)
    assert window_geometry((7, 7), 4, shifted=False) == (4, 0)
    assert window_geometry((4, 9), 4, shifted=True) == (4, 0)  # res <= window: no shift
    hf_index = transformers.models.swin.modeling_swin.SwinRelativePositionBias(1, (4, 4)).relative_position_index
    np.testing.assert_array_equal(relative_position_index(4).reshape(-1), hf_index.numpy())
    mask = shift_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    # Top-left window is untouched by the roll; top-right joins two 8-token column bands.
    assert (mask[0] == 0).all() and int((mask[1] != 0).sum()) == 2 * 8 * 8
    assert int((mask[3] != 0).sum()) == 16 * 16 - 4 * 4 * 4  # four 4-token regions


def test_window_smaller_than_resolution_is_refused():
    with pytest.raises(ValueError, match=r"stage 1 .* resolution \(3, 3\) is smaller than window_size 4"):
        dataclasses.replace(CFG, image_size=(12, 12))


def test_logits_match_hf(checkpoint):
    model, _, params = checkpoint
    x = pixels()
    with torch.no_grad():
        ref = model(x).logits.numpy()
    ours = np.asarray(APPLY(params, nhwc(x)))
    assert ours.shape == ref.shape == (2, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.1


def test_single_blocks_match_hf(checkpoint):
    model, _, params = checkpoint
    stages = model.swin.encoder.layers
    x = torch.randn(2, 7 * 7, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        shifted = stages[0].blocks[1](x, (7, 7))[0].numpy()  # padded 7 -> 8, shift 2, masked
        merged_then_block = stages[1].blocks[0](stages[0].downsample(x, (7, 7)), (4, 4))[0].numpy()
    ours, _ = BLOCK(params, 1, jnp.asarray(x.numpy().reshape(2, 7, 7, 8)), None)
    np.testing.assert_allclose(np.asarray(ours).reshape(2, 49, 8), shifted, atol=1e-5, rtol=0)
    ours, _ = BLOCK(params, 2, jnp.asarray(x.numpy().reshape(2, 7, 7, 8)), None)
    np.testing.assert_allclose(np.asarray(ours).reshape(2, 16, 16), merged_then_block, atol=1e-5, rtol=0)


def test_staged_composition_equals_apply(checkpoint):
    _, _, params = checkpoint
    images = nhwc(pixels(seed=3))
    hidden, ctx = EMBED(params, images)
    shapes = [hidden.shape]
    for i in range(ARCH.num_blocks):
        hidden, mlp_in = BLOCK(params, i, hidden, ctx)
        assert mlp_in.shape == hidden.shape
        shapes.append(hidden.shape)
    assert shapes == [(2, 7, 7, 8)] * 3 + [(2, 4, 4, 16)] * 2
    np.testing.assert_allclose(HEAD(params, hidden, ctx), APPLY(params, images), atol=1e-5, rtol=0)


def test_mlp_in_is_the_mlp_input(checkpoint):
    _, _, params = checkpoint
    assert ARCH.mlp_spec == base.VIT_MLP
    hidden, ctx = EMBED(params, nhwc(pixels(seed=4)))
    for i in range(ARCH.num_blocks):
        path = ARCH.mlp_path(i)
        out, mlp_in = BLOCK(params, i, hidden, ctx)
        # fc2 zeroed: the block returns its residual stream alone, so out - residual is the
        # MLP's contribution, which mlp_apply must reproduce from mlp_in.
        mlp = base.get_path(params, path)
        silenced = base.set_path(params, f"{path}/fc2", jax.tree_util.tree_map(np.zeros_like, mlp["fc2"]))
        residual, _ = BLOCK(silenced, i, hidden, ctx)
        expected = base.mlp_apply(ARCH.mlp_spec, mlp, mlp_in)
        assert float(jnp.abs(expected).max()) > 0.1
        np.testing.assert_allclose(out - residual, expected, atol=1e-5, rtol=0)
        hidden = out


def test_export_reloads_in_transformers(checkpoint, tmp_path, monkeypatch):
    """Through the checkpoint registry, as the pipeline saves and loads."""
    monkeypatch.setitem(hf_checkpoint.FAMILIES, "swin", hf_swin)
    _, path, params = checkpoint
    arch, loaded = hf_checkpoint.load_pretrained(str(path))
    assert arch.config == CFG
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    assert set(hf_swin.params_to_hf(params, CFG)) == set(load_file(path / "model.safetensors"))

    hf_checkpoint.save_pretrained(arch, params, str(tmp_path))
    reloaded, info = transformers.SwinForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = pixels(seed=5)
    with torch.no_grad():
        ref = reloaded.eval()(x).logits.numpy()
    np.testing.assert_allclose(APPLY(params, nhwc(x)), ref, atol=1e-4, rtol=0)


@needs_torch
def test_absolute_position_embeddings(tmp_path):
    cfg = dataclasses.replace(CFG, use_absolute_embeddings=True)
    model = hf_model(cfg, tmp_path)
    loaded_cfg, params = load(tmp_path)
    assert loaded_cfg == cfg and params["pos_embed"].shape == (1, 49, 8)
    assert set(hf_swin.params_to_hf(params, cfg)) == set(load_file(tmp_path / "model.safetensors"))
    x = pixels(seed=6)
    with torch.no_grad():
        ref = model.swin.embeddings(x)[0].numpy()
    ours, _ = jax.jit(SwinArchitecture(cfg).embed)(params, nhwc(x))
    np.testing.assert_allclose(np.asarray(ours).reshape(2, 49, 8), ref, atol=1e-5, rtol=0)


def test_init_shapes_and_logical_axes():
    shapes = jax.eval_shape(ARCH.init, jax.random.key(0))
    assert base.get_path(shapes, "blocks_3/mlp/fc1/kernel").shape == (16, 64)
    assert base.get_path(shapes, "blocks_1/attn/rel_pos_bias").shape == (49, 2)
    assert base.get_path(shapes, "merges_0/reduction/kernel").shape == (32, 16)
    assert "merges_1" not in shapes
    axes = ARCH.logical_axes()
    assert tuple(axes["blocks_0"]["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(axes["blocks_0"]["mlp"]["fc2"]["kernel"]) == ("mlp", "embed")


def test_missing_and_misshaped_tensors_are_named():
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(ARCH.init, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    tensors = hf_swin.params_to_hf(params, CFG)
    missing = "swin.encoder.layers.1.blocks.1.attention.self.relative_position_bias_table"
    bad = "swin.encoder.layers.0.downsample.reduction.weight"
    broken = {k: v for k, v in tensors.items() if k != missing}
    broken[bad] = np.zeros((32, 16), np.float32)  # stored un-transposed by mistake
    # Older checkpoints carry the derived index buffers; they are skipped, not reported.
    broken["swin.encoder.layers.0.blocks.0.attention.self.relative_position_index"] = np.zeros(256, np.int64)
    with pytest.raises(ValueError) as err:
        hf_swin.params_from_hf(broken, CFG)
    msg = str(err.value)
    assert f"missing tensor '{missing}' (for blocks_3/attn/rel_pos_bias, expected shape (49, 4))" in msg
    assert f"tensor '{bad}' (for merges_0/reduction/kernel) has shape (32, 16), expected (16, 32)" in msg
    assert "relative_position_index" not in msg
    back = hf_swin.params_from_hf(lambda k: tensors[k], CFG)
    np.testing.assert_array_equal(back["merges_0"]["reduction"]["kernel"], params["merges_0"]["reduction"]["kernel"])
