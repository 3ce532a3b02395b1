"""Gemma (v1): config reading (the released 2B config.json, legacy "gelu"), MLP and whole-model
parity with transformers (logits, per-block hidden states), the HF round trip, and what makes it
a Gemma: two (1 + w) norms per block, sqrt(d)-scaled embeddings, head_dim ** -0.5 scaling."""

import jax.numpy as jnp
import numpy as np
import pytest

import _helpers as helpers
from fips_jax.models.gemma import GemmaArchitecture, GemmaConfig

try:  # the HF parity tests build torch models; every other test here runs without torch
    import torch
    import transformers
except ImportError:
    torch = transformers = None

T = 12
# head_dim (16) differs from hidden / heads (8), as on the released 7B model (256 vs 192).
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rope_theta=1000.0)
# google/gemma-2b's config.json as released.
HUB_2B = {
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2,
    "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 16384, "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 256000,
}
TOKENS = helpers.tokens(TINY["vocab_size"], length=T)  # [2, T]


def test_config_reads_the_released_2b_and_round_trips():
    cfg = GemmaConfig(**TINY)
    assert GemmaConfig.from_hf_config(cfg.to_hf_config()) == cfg
    hub = GemmaConfig.from_hf_config(HUB_2B)  # "gelu" there means the tanh approximation
    assert (hub.hidden_size, hub.num_hidden_layers, hub.num_key_value_heads, hub.head_dim) == (2048, 18, 1, 256)
    spec = cfg.decoder_spec()
    assert spec.attn_scale == 16 ** -0.5 and spec.layer_windows == (None,) * 3
    assert spec.norm_unit_offset and spec.scale_embeddings and not spec.post_norms
    assert spec.attn_softcap is None and spec.final_softcap is None
    with pytest.raises(ValueError, match="'relu' not supported"):
        GemmaConfig.from_hf_config({**HUB_2B, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="rope scaling"):
        GemmaConfig.from_hf_config({**HUB_2B, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """(torch GemmaForCausalLM, checkpoint dir) for a random tiny model saved with save_pretrained."""
    # HF starts the (1 + w) norms at w = 0; perturb so they matter. Less than Gemma-2/3's tests
    # (0.3): without post-norms the residual stream grows to ~30 there, where float32 rounding
    # alone exceeds 1e-5 (measured at 0.1: hidden states 5e-7, logits 7e-7).
    return helpers.saved_tiny_causal_lm(torch, tmp_path_factory.mktemp("gemma"), "GemmaForCausalLM", "GemmaConfig",
                                        GemmaConfig(**TINY), perturb=0.1)


def test_mlp_matches_transformers(hf_checkpoint):
    model, _ = hf_checkpoint
    helpers.assert_mlp_matches(torch, model.model.layers[1].mlp, GemmaArchitecture(GemmaConfig(**TINY)))


def test_parity_with_transformers_both_ways(hf_checkpoint, tmp_path):
    model, path = hf_checkpoint
    arch, params = helpers.assert_parity_both_ways(torch, transformers, model, path, tmp_path / "ours", TOKENS,
                                                   GemmaConfig(**TINY), "gemma", hidden_rtol=1e-5)
    assert type(model).__name__ == "GemmaForCausalLM"
    assert "lm_head" not in params and "post_attn_norm" not in params["blocks_0"]
    hidden, _ = arch.embed(params, jnp.asarray(TOKENS))
    np.testing.assert_allclose(  # embeddings scaled by sqrt(d)
        np.asarray(hidden), np.asarray(params["embed"]["embedding"])[TOKENS] * np.sqrt(32), rtol=1e-6)
