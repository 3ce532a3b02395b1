"""HF <-> fips_jax mapping for Qwen3 (`Qwen3ForCausalLM` checkpoints).

Llama's layer naming plus the per-head `self_attn.{q,k}_norm` weights; biases on all four
attention projections only with `attention_bias`. A checkpoint family module.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from fips_jax.hf.convert import KeyMapEntry
from fips_jax.hf.llama import decoder_key_map
from fips_jax.hf import qwen2 as hf_qwen2
from fips_jax.models.qwen3 import Qwen3Architecture, Qwen3Config


def config_from_hf(hf: dict[str, Any]) -> Qwen3Config:
    return Qwen3Config.from_hf_config(hf)


def config_to_hf(cfg: Qwen3Config) -> dict[str, Any]:
    return cfg.to_hf_config()


def key_map(cfg: Qwen3Config) -> list[KeyMapEntry]:
    entries = decoder_key_map(cfg.num_hidden_layers, hf_qwen2.NORMS, cfg.attention_bias, False, cfg.tie_word_embeddings)
    return entries + [KeyMapEntry(f"blocks_{i}/attn/{x}_norm/scale", f"model.layers.{i}.self_attn.{x}_norm.weight")
                      for i in range(cfg.num_hidden_layers) for x in "qk"]


def ignored_keys(cfg: Qwen3Config) -> tuple[str, ...]:
    return hf_qwen2.ignored_keys(cfg)


def build_architecture(cfg: Qwen3Config, dtype: Any = jnp.float32) -> Qwen3Architecture:
    return Qwen3Architecture(cfg, dtype=dtype, param_dtype=dtype)
