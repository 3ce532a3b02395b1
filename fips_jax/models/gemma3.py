"""Gemma-3 causal decoder (the text tower; `gemma3_text`, `Gemma3ForCausalLM`).

Gemma-2 (`gemma2.py`) plus three switches of the shared `decoder_common.CausalLM`:
  * every query and key head is RMS-normalised with a (1 + w) norm before RoPE (`qk_norm`);
  * local (sliding-window) and global layers have their own RoPE: base `rope_local_base_freq`
    (10k) without scaling locally, `rope_theta` (1M) with `rope_scaling` (linear x8 on the 4B+
    models) globally;
  * the layer pattern is 5 local : 1 global (`sliding_window_pattern` 6); final logits are
    soft-capped only when `final_logit_softcapping` is set (None by default). Like
    transformers' Gemma3Attention, attention logits are never capped: `attn_logit_softcapping`
    is kept for the config round trip but not applied.
Everything else is Gemma-2's: four (1 + w) norms per block, sqrt(d)-scaled embeddings,
query_pre_attn_scalar, a gelu_tanh-gated MLP and a tied head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from fips_jax.models import decoder_common
from fips_jax.models.gemma2 import Gemma2Config, default_layer_types

GLOBAL_ROPE_THETA = 1_000_000.0
LOCAL_ROPE_THETA = 10_000.0
_ROPE_FIELDS = ("rope_theta", "rope_local_base_freq", "rope_scaling")
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, decoder_common.RopeScaling | None, float]:
    """(global theta, global scaling, local theta) from an HF Gemma-3 text config dict.

    Reads the per-layer-type `rope_parameters` that current transformers writes
    ({"full_attention": {...}, "sliding_attention": {...}}) as well as the original
    `rope_theta` / `rope_scaling` / `rope_local_base_freq` of the released checkpoints.
    """
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = params.get("full_attention") or {}
        theta, scaling = decoder_common.rope_from_hf({"rope_parameters": {"rope_theta": GLOBAL_ROPE_THETA, **full}})
        local_theta, local_scaling = decoder_common.rope_from_hf(
            {"rope_parameters": {"rope_theta": LOCAL_ROPE_THETA, **(params.get("sliding_attention") or {})}}
        )
        if local_scaling is not None:
            raise ValueError(f"gemma3: rope scaling on sliding-window layers not supported: {params}")
        return theta, scaling, local_theta
    theta, scaling = decoder_common.rope_from_hf({**hf, "rope_theta": hf.get("rope_theta", GLOBAL_ROPE_THETA)})
    return theta, scaling, float(hf.get("rope_local_base_freq", LOCAL_ROPE_THETA))


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The text-tower config of a multimodal `gemma3` config.json (its `text_config`, with the
    top-level token ids where the text config lacks them); a `gemma3_text` config as it is."""
    if hf.get("model_type") != "gemma3":
        return hf
    if not isinstance(hf.get("text_config"), dict):
        raise ValueError("gemma3 config.json has no text_config")
    return {**{k: hf[k] for k in _TOKEN_KEYS if k in hf}, **hf["text_config"]}


@dataclasses.dataclass(frozen=True)
class Gemma3Config(Gemma2Config):
    """Gemma-3 text hyper-parameters with HF field names (defaults: HF's `Gemma3TextConfig`).

    rope_theta / rope_scaling: global layers; rope_local_base_freq: sliding-window layers.
    """

    model_type: ClassVar[str] = "gemma3_text"
    hf_architecture: ClassVar[str] = "Gemma3ForCausalLM"
    sliding_window_pattern: ClassVar[int] = 6

    vocab_size: int = 262208
    max_position_embeddings: int = 131072
    rope_theta: float = GLOBAL_ROPE_THETA
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_base_freq: float = LOCAL_ROPE_THETA
    rope_scaling: decoder_common.RopeScaling | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ValueError("gemma3_text: sliding_attention layers need a sliding_window")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "Gemma3Config":
        """From an HF `config.json` dict: model_type "gemma3_text", or "gemma3" (its text tower)."""
        hf = text_config(hf)
        kwargs = cls.hf_kwargs(hf, _ROPE_FIELDS)
        if "layer_types" not in hf:
            pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", cls.sliding_window_pattern))
            num_layers = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
            kwargs["layer_types"] = default_layer_types(num_layers, int(pattern))
        theta, scaling, local_theta = rope_from_hf(hf)
        return cls(**kwargs, rope_theta=theta, rope_scaling=scaling, rope_local_base_freq=local_theta)

    def to_hf_config(self) -> dict[str, Any]:
        """HF `config.json` dict that `transformers.Gemma3ForCausalLM` loads (older releases read
        the legacy rope keys, current ones `rope_parameters`)."""
        full = decoder_common.rope_to_hf(self.rope_theta, self.rope_scaling)
        local = {"rope_type": "default", "rope_theta": self.rope_local_base_freq}
        return {
            **super().to_hf_config(),
            **full,
            "rope_local_base_freq": self.rope_local_base_freq,
            "rope_parameters": {"full_attention": full["rope_parameters"], "sliding_attention": local},
        }

    def decoder_spec(self) -> decoder_common.DecoderSpec:
        return dataclasses.replace(
            super().decoder_spec(), rope_scaling=self.rope_scaling, qk_norm=True,
            local_rope_theta=self.rope_local_base_freq, attn_softcap=None,
        )


@dataclasses.dataclass(frozen=True)
class Gemma3Architecture(decoder_common.CausalLMArchitecture):
    """`base.Architecture` for the Gemma-3 text model. config: Gemma3Config; dtype: compute dtype."""

    name = "gemma3_text"
    config: Gemma3Config
