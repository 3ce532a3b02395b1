"""HF <-> fips_jax mapping for Qwen2 / Qwen2.5 (`Qwen2ForCausalLM` checkpoints).

Llama's layer naming (`llama.decoder_key_map`) plus the q/k/v biases; a checkpoint family
module (see `checkpoint.FAMILIES`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from fips_jax.hf.convert import KeyMapEntry
from fips_jax.hf.llama import ROTARY_BUFFERS, decoder_key_map
from fips_jax.models.qwen2 import Qwen2Architecture, Qwen2Config

# HF Qwen's post_attention_layernorm is the norm *before* the MLP, as in Llama.
NORMS = {"pre_attn_norm": "input_layernorm", "pre_mlp_norm": "post_attention_layernorm"}


def qkv_bias_entries(num_layers: int) -> list[KeyMapEntry]:
    return [KeyMapEntry(f"blocks_{i}/attn/{x}/bias", f"model.layers.{i}.self_attn.{x}_proj.bias")
            for i in range(num_layers) for x in "qkv"]


def config_from_hf(hf: dict[str, Any]) -> Qwen2Config:
    return Qwen2Config.from_hf_config(hf)


def config_to_hf(cfg: Qwen2Config) -> dict[str, Any]:
    return cfg.to_hf_config()


def key_map(cfg: Qwen2Config) -> list[KeyMapEntry]:
    entries = decoder_key_map(cfg.num_hidden_layers, NORMS, False, False, cfg.tie_word_embeddings)
    return entries + qkv_bias_entries(cfg.num_hidden_layers)


def ignored_keys(cfg: Qwen2Config) -> tuple[str, ...]:
    """Checkpoint keys that may be present but are not loaded (a tied head is the embedding)."""
    return (ROTARY_BUFFERS,) + ((r"^lm_head\.weight$",) if cfg.tie_word_embeddings else ())


def build_architecture(cfg: Qwen2Config, dtype: Any = jnp.float32) -> Qwen2Architecture:
    return Qwen2Architecture(cfg, dtype=dtype, param_dtype=dtype)
