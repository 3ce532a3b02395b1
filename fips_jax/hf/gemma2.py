"""HF <-> fips_jax mapping for Gemma-2 (`Gemma2ForCausalLM` checkpoints).

Same layer naming as Llama plus two post-norms; RMSNorm weights are stored as HF stores them
(the model applies 1 + w), so every norm maps with the identity transform.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from fips_jax.hf.convert import KeyMapEntry
from fips_jax.hf.llama import ROTARY_BUFFERS, decoder_key_map
from fips_jax.models.gemma2 import Gemma2Architecture, Gemma2Config

NORMS = {
    "pre_attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "pre_mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}


def config_from_hf(hf: dict[str, Any]) -> Gemma2Config:
    return Gemma2Config.from_hf_config(hf)


def config_to_hf(cfg: Gemma2Config) -> dict[str, Any]:
    return cfg.to_hf_config()


def key_map(cfg: Gemma2Config) -> list[KeyMapEntry]:
    return decoder_key_map(cfg.num_hidden_layers, NORMS, cfg.attention_bias, False, cfg.tie_word_embeddings)


def ignored_keys(cfg: Gemma2Config) -> tuple[str, ...]:
    return (ROTARY_BUFFERS,) + ((r"^lm_head\.weight$",) if cfg.tie_word_embeddings else ())


def build_architecture(cfg: Gemma2Config, dtype: Any = jnp.float32) -> Gemma2Architecture:
    return Gemma2Architecture(cfg, dtype=dtype, param_dtype=dtype)
