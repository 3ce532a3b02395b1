"""HF <-> fips_jax mapping for Gemma (v1) (`GemmaForCausalLM` checkpoints), and the pieces
Gemma-2/3 reuse.

Llama's layer naming; RMSNorm weights are stored as HF stores them (the model applies 1 + w),
so every norm maps with the identity transform. Gemma-2/3 add two post-norms (`NORMS` there).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from fips_jax.hf.convert import KeyMapEntry
from fips_jax.hf.llama import ROTARY_BUFFERS, decoder_key_map
from fips_jax.models.gemma import GemmaArchitecture, GemmaConfig

NORMS = {"pre_attn_norm": "input_layernorm", "pre_mlp_norm": "post_attention_layernorm"}


def config_from_hf(hf: dict[str, Any]) -> GemmaConfig:
    return GemmaConfig.from_hf_config(hf)


def config_to_hf(cfg: GemmaConfig) -> dict[str, Any]:
    return cfg.to_hf_config()


def gemma_key_map(cfg: GemmaConfig, norms: dict[str, str]) -> list[KeyMapEntry]:
    """Llama's decoder key map with Gemma's `norms` (module name -> HF name), no MLP bias."""
    return decoder_key_map(cfg.num_hidden_layers, norms, cfg.attention_bias, False, cfg.tie_word_embeddings)


def key_map(cfg: GemmaConfig) -> list[KeyMapEntry]:
    return gemma_key_map(cfg, NORMS)


def ignored_keys(cfg: GemmaConfig) -> tuple[str, ...]:
    return (ROTARY_BUFFERS,) + ((r"^lm_head\.weight$",) if cfg.tie_word_embeddings else ())


def build_architecture(cfg: GemmaConfig, dtype: Any = jnp.float32) -> GemmaArchitecture:
    return GemmaArchitecture(cfg, dtype=dtype, param_dtype=dtype)
