"""HF <-> fips_jax mapping for Llama (`LlamaForCausalLM` checkpoints).

A checkpoint family module: `checkpoint.FAMILIES` dispatches on `config.json`'s model_type to a
module with these four functions (plus optional `ignored_keys`). Also holds the decoder-layer
key map that Gemma-2 reuses.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from fips_jax.hf.convert import KeyMapEntry
from fips_jax.models.llama import LlamaArchitecture, LlamaConfig

# Non-persistent rotary buffers that old checkpoints sometimes contain.
ROTARY_BUFFERS = r"\.rotary_emb\.inv_freq$"


def decoder_key_map(
    num_layers: int, norm_names: dict[str, str], attn_bias: bool, mlp_bias: bool, tied: bool
) -> list[KeyMapEntry]:
    """Key map of an HF `*ForCausalLM` decoder with `model.layers.{i}` blocks.

    norm_names: our block norm name -> HF layer norm name, e.g. {"pre_attn_norm": "input_layernorm"}.
    """
    entries = [KeyMapEntry("embed/embedding", "model.embed_tokens.weight")]
    for i in range(num_layers):
        ours, hf = f"blocks_{i}", f"model.layers.{i}"
        entries += [KeyMapEntry(f"{ours}/{n}/scale", f"{hf}.{h}.weight") for n, h in norm_names.items()]
        linears = [("attn", "self_attn", x, f"{x}_proj", attn_bias) for x in "qkvo"]
        linears += [("mlp", "mlp", x, f"{x}_proj", mlp_bias) for x in ("gate", "up", "down")]
        for our_mod, hf_mod, our_fc, hf_fc, bias in linears:
            our_path, hf_path = f"{ours}/{our_mod}/{our_fc}", f"{hf}.{hf_mod}.{hf_fc}"
            entries.append(KeyMapEntry(f"{our_path}/kernel", f"{hf_path}.weight", "transpose"))
            if bias:
                entries.append(KeyMapEntry(f"{our_path}/bias", f"{hf_path}.bias"))
    entries.append(KeyMapEntry("final_norm/scale", "model.norm.weight"))
    if not tied:
        entries.append(KeyMapEntry("lm_head/kernel", "lm_head.weight", "transpose"))
    return entries


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig.from_hf_config(hf)


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    return cfg.to_hf_config()


def key_map(cfg: LlamaConfig) -> list[KeyMapEntry]:
    # HF Llama's post_attention_layernorm is the norm *before* the MLP.
    norms = {"pre_attn_norm": "input_layernorm", "pre_mlp_norm": "post_attention_layernorm"}
    return decoder_key_map(cfg.num_hidden_layers, norms, cfg.attention_bias, cfg.mlp_bias, cfg.tie_word_embeddings)


def ignored_keys(cfg: LlamaConfig) -> tuple[str, ...]:
    """Checkpoint keys that may be present but are not loaded (a tied head is the embedding)."""
    return (ROTARY_BUFFERS,) + ((r"^lm_head\.weight$",) if cfg.tie_word_embeddings else ())


def build_architecture(cfg: LlamaConfig, dtype: Any = jnp.float32) -> LlamaArchitecture:
    return LlamaArchitecture(cfg, dtype=dtype, param_dtype=dtype)
