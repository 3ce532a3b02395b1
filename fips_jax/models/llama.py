"""Llama-3 causal decoder: GQA, RoPE (incl. "llama3" frequency scaling), RMSNorm, SiLU-gated MLP.

`LlamaConfig` mirrors the HF `LlamaConfig` fields the forward pass depends on (same names), so
`from_hf_config`/`to_hf_config` are plain renames; the linen module is the shared
`decoder_common.CausalLM`.

    arch = LlamaArchitecture(LlamaConfig(...))
    params = arch.init(jax.random.key(0))
    logits = arch.apply(params, tokens)          # tokens [B, T] int -> [B, T, vocab]
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fips_jax.models import decoder_common

# HF activation names accepted for the MLP (all the same SiLU).
_SILU_NAMES = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama hyper-parameters with HF field names. head_dim defaults to hidden_size // heads."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: decoder_common.RopeScaling | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        # Fill derived defaults here so that equal models compare equal.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """From an HF `config.json` dict (model_type "llama")."""
        act = hf.get("hidden_act", "silu")
        if act not in _SILU_NAMES:
            raise ValueError(f"llama hidden_act {act!r} not supported; expected one of {_SILU_NAMES}")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"llama pretraining_tp={hf['pretraining_tp']} not supported (only 1)")
        theta, scaling = decoder_common.rope_from_hf(hf)
        kwargs = decoder_common.hf_field_kwargs(cls, hf, ("rope_theta", "rope_scaling"))
        return cls(**kwargs, rope_theta=theta, rope_scaling=scaling)

    def to_hf_config(self) -> dict[str, Any]:
        """HF `config.json` dict that `transformers.LlamaForCausalLM` loads."""
        return decoder_common.hf_config_dict(self, "llama", "LlamaForCausalLM", ("hidden_act", "silu"),
                                             self.rope_scaling)

    def decoder_spec(self) -> decoder_common.DecoderSpec:
        return decoder_common.spec_from_hf_fields(self, "silu", rope_scaling=self.rope_scaling,
                                                  attn_bias=self.attention_bias, mlp_bias=self.mlp_bias)


@dataclasses.dataclass(frozen=True)
class LlamaArchitecture(decoder_common.CausalLMArchitecture):
    """`base.Architecture` for Llama. config: LlamaConfig; dtype: compute dtype; param_dtype: storage."""

    name = "llama"
    config: LlamaConfig
