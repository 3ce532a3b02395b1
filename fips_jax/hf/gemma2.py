"""HF <-> fips_jax mapping for Gemma-2 (`Gemma2ForCausalLM` checkpoints).

Gemma's layer naming (`gemma.py`) plus two post-norms; RMSNorm weights are stored as HF stores them
(the model applies 1 + w), so every norm maps with the identity transform.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from fips_jax.hf.convert import KeyMapEntry
from fips_jax.hf.gemma import gemma_key_map, ignored_keys  # noqa: F401  (ignored_keys: Gemma's)
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
    return gemma_key_map(cfg, NORMS)


def build_architecture(cfg: Gemma2Config, dtype: Any = jnp.float32) -> Gemma2Architecture:
    return Gemma2Architecture(cfg, dtype=dtype, param_dtype=dtype)
