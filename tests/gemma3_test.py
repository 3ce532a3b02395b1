"""Gemma-3 text model: config reading (hub, current transformers and multimodal layouts), MLP
and whole-model parity with transformers over local and global layers (window shorter than the
sequence, linearly scaled global RoPE, final soft-cap), the HF round trip, the text tower of a
multimodal checkpoint and the staged view (FiPS end to end: tests/families_pipeline_test.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import _helpers as helpers
from fips_jax.hf import checkpoint
from fips_jax.hf import gemma3 as hf_gemma3
from fips_jax.models import decoder_common
from fips_jax.models.gemma3 import Gemma3Architecture, Gemma3Config

try:  # the HF parity tests build torch models; every other test here runs without torch
    import torch
    import transformers
except ImportError:
    torch = transformers = None

T = 12
# 7 layers with HF's default pattern: layer 5 is global, the other six local; the window (4)
# is shorter than the sequence (12) so it hides keys; the global layers' RoPE is scaled.
TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=7, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24,
    sliding_window=4, rope_theta=1000.0, rope_local_base_freq=100.0,
    rope_scaling=decoder_common.RopeScaling("linear", 4.0), final_logit_softcapping=3.0,
)
# google/gemma-3-1b-pt's config.json as released (legacy rope keys, no layer_types).
HUB_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": None,
    "bos_token_id": 2, "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144,
}
TOKENS = helpers.tokens(TINY["vocab_size"], length=T)  # [2, T]


def test_config_reads_hub_current_and_multimodal_layouts():
    cfg = Gemma3Config(**TINY)
    assert [t == "full_attention" for t in cfg.layer_types] == [False] * 5 + [True, False]
    assert Gemma3Config.from_hf_config(json.loads(json.dumps(cfg.to_hf_config()))) == cfg
    spec = cfg.decoder_spec()
    assert spec.qk_norm and spec.local_rope_theta == 100.0 and spec.rope_scaling.factor == 4.0
    assert [w for w in spec.layer_windows] == [4] * 5 + [None, 4]

    hub = Gemma3Config.from_hf_config(HUB_1B)
    assert (hub.rope_theta, hub.rope_local_base_freq, hub.rope_scaling) == (1e6, 1e4, None)
    assert hub.layer_types.count("full_attention") == 4 and hub.layer_types[5] == "full_attention"
    # Current transformers writes per-layer-type rope_parameters and layer_types instead.
    current = {k: v for k, v in HUB_1B.items() if not k.startswith(("rope_", "sliding_window_pattern"))}
    current.update(layer_types=list(hub.layer_types), rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert Gemma3Config.from_hf_config(current).rope_scaling == decoder_common.RopeScaling("linear", 8.0)
    # A multimodal config.json: its text_config (sparse, HF defaults fill the rest).
    multimodal = {"model_type": "gemma3", "eos_token_id": [1, 106], "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}
    mm = Gemma3Config.from_hf_config(multimodal)
    assert (mm.hidden_size, mm.vocab_size, mm.rope_theta, mm.eos_token_id) == (2560, 262208, 1e6, (1, 106))
    assert mm.rope_scaling == decoder_common.RopeScaling("linear", 8.0) and len(mm.layer_types) == 34
    with pytest.raises(ValueError, match="sliding_window"):
        Gemma3Config(**{**TINY, "sliding_window": None})
    with pytest.raises(ValueError, match="sliding-window layers"):
        Gemma3Config.from_hf_config({**current, "rope_parameters": {
            "full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}})


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """(torch Gemma3ForCausalLM, checkpoint dir) for a random tiny model saved with save_pretrained."""
    return helpers.saved_tiny_causal_lm(torch, tmp_path_factory.mktemp("gemma3"), "Gemma3ForCausalLM",
                                        "Gemma3TextConfig", Gemma3Config(**TINY), perturb=0.3)


def test_transformers_reads_our_config_as_we_do(hf_checkpoint):
    model, _ = hf_checkpoint
    hf = model.config
    assert list(hf.layer_types) == list(Gemma3Config(**TINY).layer_types)
    assert hf.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert hf.rope_parameters["full_attention"]["rope_theta"] == 1000.0
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == 100.0


def test_mlp_matches_transformers(hf_checkpoint):
    model, _ = hf_checkpoint
    helpers.assert_mlp_matches(torch, model.model.layers[3].mlp, Gemma3Architecture(Gemma3Config(**TINY)))


def test_parity_with_transformers_both_ways(hf_checkpoint, tmp_path):
    model, path = hf_checkpoint
    helpers.assert_parity_both_ways(torch, transformers, model, path, tmp_path / "ours", TOKENS, Gemma3Config(**TINY),
                                    "gemma3_text", hidden_rtol=1e-5)
    assert type(model).__name__ == "Gemma3ForCausalLM"


def test_text_tower_of_a_multimodal_checkpoint(hf_checkpoint, tmp_path):
    """The text weights of a Gemma3ForConditionalGeneration checkpoint, in both key layouts, load
    into the same model; vision tower and projector are skipped."""
    model, path = hf_checkpoint
    text = load_file(path / "model.safetensors")
    vision = {"vision_tower.vision_model.post_layernorm.weight": np.ones(8, np.float32),
              "multi_modal_projector.mm_input_projection_weight": np.zeros((8, 32), np.float32)}
    hf_text = json.loads((path / "config.json").read_text())
    arch, params = checkpoint.load_pretrained(str(path))
    want = np.asarray(arch.apply(params, jnp.asarray(TOKENS)))
    for prefix, tag in (("language_model.model.", "released"), ("model.language_model.", "4.5x")):
        folder = tmp_path / tag
        folder.mkdir()
        renamed = {prefix + k[len("model."):]: v for k, v in text.items()}
        save_file({**renamed, **{(f"model.{k}" if tag == "4.5x" else k): v for k, v in vision.items()}},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({
            "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": hf_text, "vision_config": {"model_type": "siglip_vision_model"}}))
        arch, params = checkpoint.load_pretrained(str(folder))
        assert arch.config == Gemma3Config(**TINY)
        np.testing.assert_allclose(np.asarray(arch.apply(params, jnp.asarray(TOKENS))), want, atol=1e-6)
    # An untied head sits beside the text model in either layout.
    untied = Gemma3Config(**{**TINY, "tie_word_embeddings": False})
    for prefix, head in (("language_model.model.", "language_model.lm_head.weight"),
                         ("model.language_model.", "lm_head.weight")):
        names = {e.flax_path: e.hf_key for e in hf_gemma3.checkpoint_key_map(untied, [prefix + "embed_tokens.weight"])}
        assert names["lm_head/kernel"] == head
        assert names["blocks_6/attn/q_norm/scale"] == prefix + "layers.6.self_attn.q_norm.weight"


def test_local_layers_use_the_window_and_their_own_rope():
    arch = Gemma3Architecture(Gemma3Config(**TINY))
    params = helpers.random_params(arch, scale=0.16, norm_mean=0.0)
    tokens = jnp.asarray(TOKENS)
    ref = np.asarray(jax.jit(arch.apply)(params, tokens))

    def variant(**kw):
        return np.asarray(jax.jit(Gemma3Architecture(Gemma3Config(**{**TINY, **kw})).apply)(params, tokens))

    diff = np.abs(variant(sliding_window=64) - ref).max(axis=(0, 2))  # per position
    assert diff[:4].max() < 1e-5 and diff[4:].min() > 1e-3  # the first 4 positions see every key anyway
    assert np.abs(variant(rope_local_base_freq=1e4) - ref).max() > 1e-3  # local layers use their base
    assert np.abs(variant(rope_scaling=None) - ref).max() > 1e-3  # the global layer its scaled RoPE
    capped = np.abs(variant(final_logit_softcapping=None)).max()
    assert np.abs(ref).max() < 3.0 < capped


def test_qk_norm_params_scaled_embeddings_and_tied_head():
    # The staged view itself is checked against transformers' per-layer hidden states above.
    arch = Gemma3Architecture(Gemma3Config(**TINY))
    params = helpers.random_params(arch, seed=1, norm_mean=0.0)
    assert params["blocks_0"]["attn"]["q_norm"]["scale"].shape == (16,)
    assert arch.logical_axes()["blocks_0"]["attn"]["k_norm"]["scale"] == jax.sharding.PartitionSpec("head_dim")
    tokens = jnp.asarray(TOKENS)
    hidden, _ = arch.embed(params, tokens)
    np.testing.assert_allclose(
        np.asarray(hidden), np.asarray(params["embed"]["embedding"])[np.asarray(tokens)] * np.sqrt(32), rtol=1e-6
    )
    assert arch.mlp_spec.activation == "gelu_tanh" and arch.mlp_spec.gated and not arch.mlp_spec.has_bias
    assert "lm_head" not in params  # tied

