"""Qwen2/2.5 and Qwen3: config round trips, whole-model and block parity with transformers
(tied and untied, q/k/v biases, sliding-window layers, per-head q/k norms), the HF round trip,
the staged view and random models from the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers as helpers
from fips_jax.models import base, registry
from fips_jax.models.qwen2 import Qwen2Architecture, Qwen2Config
from fips_jax.models.qwen3 import Qwen3Architecture, Qwen3Config

try:  # the HF parity tests build torch models; every other test here runs without torch
    import torch
    import transformers
except ImportError:
    torch = transformers = None

TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500.0,
)
# head_dim 12 != hidden_size // heads (8): an explicit head_dim must be honoured, as Qwen3's is.
CONFIGS = {
    "qwen2_tied": Qwen2Config(**TINY, tie_word_embeddings=True),
    # Layers >= 1 slide over 4 keys, shorter than the sequence, so the windows matter.
    "qwen2_sliding": Qwen2Config(**TINY, sliding_window=4,
                                 layer_types=("full_attention", "sliding_attention", "sliding_attention")),
    "qwen3_tied": Qwen3Config(**TINY, head_dim=12, tie_word_embeddings=True),
    "qwen3_bias": Qwen3Config(**TINY, head_dim=12, attention_bias=True),
}
HF_CLASSES = {Qwen2Config: ("Qwen2Config", "Qwen2ForCausalLM"), Qwen3Config: ("Qwen3Config", "Qwen3ForCausalLM")}


def _tokens(length=12):
    return helpers.tokens(TINY["vocab_size"], length=length)


def test_config_round_trips_and_hf_sliding_window_rules():
    for cfg in CONFIGS.values():
        assert type(cfg).from_hf_config(cfg.to_hf_config()) == cfg
    # HF: the window exists only with use_sliding_window, from max_window_layers on.
    hf = {**TINY, "sliding_window": 4, "max_window_layers": 2}
    assert Qwen2Config.from_hf_config(hf).layer_types == ("full_attention",) * 3
    assert Qwen2Config.from_hf_config(hf).sliding_window is None
    on = Qwen2Config.from_hf_config({**hf, "use_sliding_window": True})
    assert on.layer_types == ("full_attention", "full_attention", "sliding_attention") and on.sliding_window == 4
    assert [w is None for w in on.decoder_spec().layer_windows] == [True, True, False]
    # Qwen3's head_dim defaults to HF's 128, not hidden_size // heads.
    assert Qwen3Config.from_hf_config(TINY).head_dim == 128 and Qwen2Config.from_hf_config(TINY).head_dim == 8
    with pytest.raises(ValueError, match="gelu"):
        Qwen2Config.from_hf_config({**TINY, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="chunked"):
        Qwen3Config(**TINY, layer_types=("chunked_attention",) * 3)
    with pytest.raises(ValueError, match="need a sliding_window"):
        Qwen2Config(**TINY, layer_types=("sliding_attention",) * 3)


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """(config, torch model, checkpoint folder) for a random tiny model saved with save_pretrained."""
    if torch is None:
        pytest.skip("HF parity checks need torch")
    cfg = CONFIGS[request.param]
    cfg_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[type(cfg)])
    path = tmp_path_factory.mktemp(request.param)
    model = helpers.hf_causal_lm(torch, model_cls, cfg_cls(**cfg.to_hf_config()), perturb=0.1, save_to=path / "hf")
    return cfg, model, path


def test_parity_with_transformers_both_ways(hf_checkpoint):
    cfg, model, path = hf_checkpoint
    tokens = _tokens()
    arch, params, want, logits_err, blocks_err = helpers.load_and_check_parity(torch, model, path / "hf", tokens)
    print(f"\n{cfg.MODEL_TYPE}: max |logits - HF| = {logits_err:.2e}; blocks {blocks_err:.2e}", end="")
    assert arch.config == cfg and arch.name == cfg.MODEL_TYPE
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    reloaded = helpers.assert_hf_round_trip(torch, transformers, arch, params, path / "ours", tokens, want)
    assert type(reloaded) is type(model)


def test_qk_norm_matches_transformers_attention_module():
    if torch is None:
        pytest.skip("HF parity checks need torch")
    from transformers.models.qwen3 import modeling_qwen3

    cfg = CONFIGS["qwen3_bias"]
    hf_cfg = transformers.Qwen3Config(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    ref = modeling_qwen3.Qwen3Attention(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = np.random.RandomState(2).randn(2, 12, 32).astype(np.float32)
    # Our block normalises its input first (scale 1 below); the reference gets that normalised input.
    xs = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.rms_norm_eps)
    pos = torch.arange(12)[None].expand(2, 12)
    cos, sin = modeling_qwen3.Qwen3RotaryEmbedding(hf_cfg)(torch.tensor(xs), pos)
    mask = torch.full((12, 12), float("-inf")).triu(1)[None, None].expand(2, 1, 12, 12)
    with torch.no_grad():
        want, _ = ref(torch.tensor(xs), (cos, sin), mask)

    arch = Qwen3Architecture(cfg)
    attn = {n: {"kernel": getattr(ref, f"{n}_proj").weight.detach().numpy().T,
                "bias": getattr(ref, f"{n}_proj").bias.detach().numpy()} for n in "qkvo"}
    attn.update({f"{n}_norm": {"scale": getattr(ref, f"{n}_norm").weight.detach().numpy()} for n in "qk"})
    params = jax.tree_util.tree_map(np.asarray, helpers.random_params(arch))
    params["blocks_0"]["attn"] = attn
    params["blocks_0"]["pre_attn_norm"]["scale"] = np.ones(32, np.float32)
    params["blocks_0"]["mlp"]["down"]["kernel"] = np.zeros((48, 32), np.float32)  # block output - x == attention
    _, ctx = arch.embed(params, jnp.zeros((2, 12), jnp.int32))
    got, _ = arch.block(params, 0, jnp.asarray(x), ctx)
    np.testing.assert_allclose(np.asarray(got) - x, want.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2_sliding", "qwen3_bias"])
def test_apply_is_the_staged_composition_and_mlp_in_feeds_the_mlp(name):
    cfg = CONFIGS[name]
    arch = registry.from_hf_config(cfg.to_hf_config())
    assert arch.config == cfg and type(arch) is {"qwen2": Qwen2Architecture, "qwen3": Qwen3Architecture}[cfg.MODEL_TYPE]
    params = helpers.random_params(arch)
    tokens = jnp.asarray(_tokens())
    block = helpers.assert_staged_apply(arch, params, tokens)
    h0, ctx = arch.embed(params, tokens)
    out, mlp_in = block(params, 0, h0, ctx)
    mlp = base.get_path(params, arch.mlp_path(0))
    silent = base.set_path(params, "blocks_0/mlp/down/kernel", jnp.zeros_like(mlp["down"]["kernel"]))
    residual, _ = block(silent, 0, h0, ctx)
    np.testing.assert_allclose(
        np.asarray(out - residual), np.asarray(base.mlp_apply(arch.mlp_spec, mlp, mlp_in)), atol=1e-5
    )


def test_params_axes_and_registry_random_models():
    for model_type, arch_cls in (("qwen2", Qwen2Architecture), ("qwen3", Qwen3Architecture)):
        hf = {**TINY, "model_type": model_type, "num_hidden_layers": 1, "head_dim": 12, "tie_word_embeddings": True}
        model_cfg = {"source": "random", "path": "", "dtype": "float32", "tokenizer": "bytes", "hf_config": hf}
        arch, params, tok = registry.load_model(model_cfg, seed=0)
        assert isinstance(arch, arch_cls) and tok.vocab_size == 256 and "lm_head" not in params
        attn = params["blocks_0"]["attn"]
        axes = arch.logical_axes()["blocks_0"]["attn"]
        assert attn["q"]["kernel"].shape == (32, 48) and attn["k"]["kernel"].shape == (32, 24)
        assert tuple(axes["q"]["kernel"]) == ("embed", "heads")
        if model_type == "qwen2":
            assert {n for n in attn if "bias" in attn[n]} == {"q", "k", "v"}  # not o
            assert tuple(axes["k"]["bias"]) == ("kv_heads",)
        else:
            assert not any("bias" in attn[n] for n in "qkvo")
            assert attn["q_norm"]["scale"].shape == attn["k_norm"]["scale"].shape == (12,)
            np.testing.assert_array_equal(np.asarray(attn["k_norm"]["scale"]), 1.0)
            assert tuple(axes["q_norm"]["scale"]) == ("head_dim",)
        assert registry.to_hf_config(arch)["model_type"] == model_type
        logits = jax.jit(arch.apply)(params, jnp.asarray(_tokens(length=5)))
        assert logits.shape == (2, 5, 97) and bool(jnp.all(jnp.isfinite(logits)))
