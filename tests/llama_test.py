"""Llama: config round trip, RoPE and whole-model parity with transformers, staged view."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers as helpers
from fips_jax.models import base
from fips_jax.models import decoder_common
from fips_jax.models.llama import LlamaArchitecture, LlamaConfig

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that with head_dim 16 some frequencies are kept, some divided, some smoothed.
    "original_max_position_embeddings": 16,
}
TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
)


def _tiny_config(**overrides) -> LlamaConfig:
    theta, scaling = decoder_common.rope_from_hf({"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500.0}})
    return LlamaConfig(**{**TINY, "rope_theta": theta, "rope_scaling": scaling, **overrides})


def _tokens():
    return helpers.tokens(TINY["vocab_size"])


def test_config_round_trip_and_legacy_rope_spelling():
    cfg = _tiny_config(attention_bias=True, eos_token_id=(2, 3))
    hf = cfg.to_hf_config()
    assert LlamaConfig.from_hf_config(hf) == cfg
    # Older config.json files spell it rope_theta + rope_scaling{"type": ...}.
    legacy = {**TINY, "rope_theta": 500.0, "rope_scaling": {**LLAMA3_ROPE, "type": "llama3"}}
    del legacy["rope_scaling"]["rope_type"]
    assert LlamaConfig.from_hf_config(legacy).rope_scaling == cfg.rope_scaling
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig.from_hf_config({**TINY, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_rope_matches_transformers_llama3():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    cfg = _tiny_config()
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_config())
    rotary = modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    ours = decoder_common.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(ours, rotary.inv_freq.numpy(), rtol=1e-6)
    plain = decoder_common.rope_inv_freq(cfg.head_dim, cfg.rope_theta, None)
    assert np.sum(~np.isclose(ours, plain)) >= 2  # the scaling really changes frequencies

    x = np.random.RandomState(1).randn(2, 64, 3, cfg.head_dim).astype(np.float32)  # [B, T, N, hd]
    pos = np.broadcast_to(np.arange(64), (2, 64))
    cos, sin = rotary(torch.tensor(x), torch.tensor(pos))
    ref, _ = modeling_llama.apply_rotary_pos_emb(torch.tensor(x), torch.tensor(x), cos, sin, unsqueeze_dim=2)
    got = decoder_common.apply_rope(jnp.asarray(x), jnp.asarray(pos), ours)
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_parity_with_transformers_both_ways(tmp_path, tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = _tiny_config(tie_word_embeddings=tied, attention_bias=not tied, mlp_bias=not tied)
    model = helpers.hf_causal_lm(torch, transformers.LlamaForCausalLM, transformers.LlamaConfig(**cfg.to_hf_config()),
                                 perturb=0.1, save_to=tmp_path / "hf")
    tokens = _tokens()
    arch, params, want, _, _ = helpers.load_and_check_parity(torch, model, tmp_path / "hf", tokens)
    assert arch.config == cfg
    helpers.assert_hf_round_trip(torch, transformers, arch, params, tmp_path / "ours", tokens, want)


def test_apply_is_the_staged_composition_and_mlp_in_feeds_the_mlp():
    arch = LlamaArchitecture(_tiny_config(mlp_bias=True))
    params = helpers.random_params(arch)
    tokens = jnp.asarray(_tokens())
    block = helpers.assert_staged_apply(arch, params, tokens)

    # Silence block 0's MLP: the output drops by exactly mlp(mlp_in), and mlp_in is the
    # pre-MLP RMSNorm of what remains.
    h0, ctx = arch.embed(params, tokens)
    out, mlp_in = block(params, 0, h0, ctx)
    path = arch.mlp_path(0)
    mlp = base.get_path(params, path)
    silent = base.set_path(params, path, {**mlp, "down": jax.tree_util.tree_map(jnp.zeros_like, mlp["down"])})
    residual, mlp_in_silent = block(silent, 0, h0, ctx)
    np.testing.assert_allclose(np.asarray(mlp_in), np.asarray(mlp_in_silent), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out - residual), np.asarray(base.mlp_apply(arch.mlp_spec, mlp, mlp_in)), atol=1e-5
    )
    r = np.asarray(residual)
    scale = np.asarray(params["blocks_0"]["pre_mlp_norm"]["scale"])
    expect = r / np.sqrt(np.mean(r**2, -1, keepdims=True) + arch.config.rms_norm_eps) * scale
    np.testing.assert_allclose(np.asarray(mlp_in), expect, atol=1e-5)


def test_spec_axes_and_dtypes():
    arch = LlamaArchitecture(_tiny_config(mlp_bias=True))
    assert arch.mlp_spec == base.MlpSpec(("gate", "up", "down"), (False, False, True), "silu", True, True)
    assert arch.mlp_path(3) == "blocks_3/mlp" and arch.num_blocks == 2 and arch.is_causal_lm
    axes = arch.logical_axes()
    assert tuple(axes["blocks_0"]["mlp"]["gate"]["kernel"]) == ("embed", "mlp")
    assert tuple(axes["blocks_0"]["mlp"]["down"]["kernel"]) == ("mlp", "embed")
    assert tuple(axes["blocks_0"]["attn"]["q"]["kernel"]) == ("embed", "heads")
    assert tuple(axes["embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(axes["lm_head"]["kernel"]) == ("embed", "vocab")
    one_layer = LlamaArchitecture(_tiny_config(mlp_bias=True, num_hidden_layers=1))  # halves the PRNG compile
    params = jax.jit(one_layer.init)(jax.random.key(0))
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params))  # unboxed
    assert float(jnp.std(params["blocks_0"]["mlp"]["gate"]["kernel"])) == pytest.approx(0.02, rel=0.2)
    np.testing.assert_array_equal(np.asarray(params["final_norm"]["scale"]), 1.0)
    assert params["blocks_0"]["mlp"]["up"]["kernel"].shape == (32, 48)
    assert params["blocks_0"]["mlp"]["down"]["kernel"].shape == (48, 32)

    # bf16 storage and compute: shapes and dtypes only (no compile needed to check the plumbing).
    half = dataclasses.replace(arch, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    hp = jax.eval_shape(half.init, jax.random.key(0))
    assert {x.dtype for x in jax.tree_util.tree_leaves(hp)} == {jnp.dtype(jnp.bfloat16)}
    out = jax.eval_shape(half.apply, hp, jax.ShapeDtypeStruct((2, 12), jnp.int32))
    assert out.shape == (2, 12, 97) and out.dtype == jnp.bfloat16
