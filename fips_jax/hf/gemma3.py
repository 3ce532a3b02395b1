"""HF <-> fips_jax mapping for Gemma-3's text model.

Loads `Gemma3ForCausalLM` checkpoints (model_type "gemma3_text": the 1B model) and the text
tower of multimodal `Gemma3ForConditionalGeneration` checkpoints (model_type "gemma3": 4B and
up), whose text weights sit under `language_model.model.` (the released files, and what
transformers 5 writes) or `model.language_model.` (transformers 4.5x); the vision tower and
projector are skipped. Saving always writes a text-only `Gemma3ForCausalLM`.

Gemma-2's layer naming plus per-head q/k norms; norms map with the identity (the model applies
1 + w to the stored w).
"""

from __future__ import annotations

from typing import Any, Iterable

import jax.numpy as jnp

from fips_jax.hf.convert import KeyMapEntry
from fips_jax.hf.gemma import gemma_key_map
from fips_jax.hf.gemma2 import NORMS
from fips_jax.hf.llama import ROTARY_BUFFERS
from fips_jax.models.gemma3 import Gemma3Architecture, Gemma3Config

# Where a multimodal checkpoint keeps the text model's `model.` (embeddings, layers, final norm),
# and what goes before an untied `lm_head.weight` there.
MULTIMODAL_PREFIXES = {"language_model.model.": "language_model.", "model.language_model.": ""}
_VISION = r"^(model\.)?(vision_tower|multi_modal_projector)\."


def config_from_hf(hf: dict[str, Any]) -> Gemma3Config:
    return Gemma3Config.from_hf_config(hf)


def config_to_hf(cfg: Gemma3Config) -> dict[str, Any]:
    return cfg.to_hf_config()


def key_map(cfg: Gemma3Config) -> list[KeyMapEntry]:
    entries = gemma_key_map(cfg, NORMS)
    for i in range(cfg.num_hidden_layers):
        entries += [KeyMapEntry(f"blocks_{i}/attn/{x}_norm/scale", f"model.layers.{i}.self_attn.{x}_norm.weight")
                    for x in "qk"]
    return entries


def checkpoint_key_map(cfg: Gemma3Config, keys: Iterable[str]) -> list[KeyMapEntry]:
    """`key_map` renamed to the layout of a checkpoint holding `keys` (text-only or multimodal)."""
    keys = set(keys)
    entries = key_map(cfg)
    for prefix, head in MULTIMODAL_PREFIXES.items():
        if f"{prefix}embed_tokens.weight" in keys:

            def rename(key: str) -> str:
                return prefix + key.removeprefix("model.") if key.startswith("model.") else head + key

            return [KeyMapEntry(e.flax_path, rename(e.hf_key), e.transform) for e in entries]
    return entries


def ignored_keys(cfg: Gemma3Config) -> tuple[str, ...]:
    tied = (r"^(language_model\.)?lm_head\.weight$",) if cfg.tie_word_embeddings else ()
    return (ROTARY_BUFFERS, _VISION) + tied


def build_architecture(cfg: Gemma3Config, dtype: Any = jnp.float32) -> Gemma3Architecture:
    return Gemma3Architecture(cfg, dtype=dtype, param_dtype=dtype)
