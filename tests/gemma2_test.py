"""Gemma-2: config round trip, MLP and whole-model parity with transformers (local and global
layers, soft-capping on), staged view."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers as helpers
from fips_jax.models import base
from fips_jax.models.gemma2 import Gemma2Architecture, Gemma2Config

T = 12
TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24,
    # A window shorter than the sequence, so local (0, 2) and global (1) layers differ; caps
    # small enough that tanh bends the random model's logits.
    sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
)
TOKENS = helpers.tokens(TINY["vocab_size"], length=T)  # [2, T]


def test_config_round_trip():
    cfg = Gemma2Config(**TINY)
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert Gemma2Config.from_hf_config(cfg.to_hf_config()) == cfg
    uncapped = Gemma2Config(**{**TINY, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert Gemma2Config.from_hf_config(uncapped.to_hf_config()) == uncapped
    assert [w is None for w in cfg.decoder_spec().layer_windows] == [False, True, False]
    with pytest.raises(ValueError, match="chunked"):
        Gemma2Config(**{**TINY, "layer_types": ("chunked_attention",) * 3})


def test_mlp_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP

    torch.manual_seed(0)
    ref = Gemma2MLP(transformers.Gemma2Config(**Gemma2Config(**TINY).to_hf_config()))
    helpers.assert_mlp_matches(torch, ref, Gemma2Architecture(Gemma2Config(**TINY)))


def test_parity_with_transformers_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = Gemma2Config(**TINY)
    # HF starts the (1 + w) norms at w = 0; perturb so they matter.
    model = helpers.hf_causal_lm(torch, transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**cfg.to_hf_config()),
                                 perturb=0.3, save_to=tmp_path / "hf")
    tokens = TOKENS
    arch, params, want, _, _ = helpers.load_and_check_parity(torch, model, tmp_path / "hf", tokens, hidden_rtol=1e-5)
    assert arch.config == cfg
    assert float(jnp.max(jnp.abs(jax.jit(arch.apply)(params, jnp.asarray(tokens))))) < cfg.final_logit_softcapping
    helpers.assert_hf_round_trip(torch, transformers, arch, params, tmp_path / "ours", tokens, want)


def test_sliding_window_only_hides_keys_beyond_the_window():
    arch = Gemma2Architecture(Gemma2Config(**TINY))
    # Larger random weights than init, so attention is peaked enough for the window to matter.
    params = helpers.random_params(arch, scale=0.16, norm_mean=0.0)
    tokens = jnp.asarray(TOKENS)
    windowed = jax.jit(arch.apply)(params, tokens)
    full = jax.jit(Gemma2Architecture(Gemma2Config(**{**TINY, "sliding_window": None})).apply)(params, tokens)
    diff = np.abs(np.asarray(full - windowed)).max(axis=(0, 2))  # per position
    assert diff[:4].max() < 1e-5  # the first 4 positions see the same keys either way
    assert diff[4:].min() > 1e-3


def test_apply_is_the_staged_composition_and_mlp_in_feeds_the_mlp():
    arch = Gemma2Architecture(Gemma2Config(**TINY))
    params = helpers.random_params(arch, seed=1, norm_mean=0.0)
    tokens = jnp.asarray(TOKENS)
    hidden, ctx = arch.embed(params, tokens)
    np.testing.assert_allclose(
        np.asarray(hidden), np.asarray(params["embed"]["embedding"])[np.asarray(tokens)] * np.sqrt(32), rtol=1e-6
    )
    block = helpers.assert_staged_apply(arch, params, tokens)

    # Silencing block 1's MLP removes exactly post_mlp_norm(mlp(mlp_in)).
    h1, _ = block(params, 0, arch.embed(params, tokens)[0], ctx)
    out, mlp_in = block(params, 1, h1, ctx)
    mlp = base.get_path(params, arch.mlp_path(1))
    silent = base.set_path(params, "blocks_1/mlp/down/kernel", jnp.zeros_like(mlp["down"]["kernel"]))
    residual, _ = block(silent, 1, h1, ctx)
    y = np.asarray(base.mlp_apply(arch.mlp_spec, mlp, mlp_in))
    w = np.asarray(params["blocks_1"]["post_mlp_norm"]["scale"])
    want = y / np.sqrt(np.mean(y**2, -1, keepdims=True) + 1e-6) * (1 + w)
    np.testing.assert_allclose(np.asarray(out - residual), want, atol=1e-4, rtol=1e-4)
    assert arch.mlp_spec.activation == "gelu_tanh" and not arch.mlp_spec.has_bias
    assert "lm_head" not in params  # tied
